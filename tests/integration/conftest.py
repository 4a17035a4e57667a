"""Tiny random models for integration tests (built once per session, in float64)."""

from __future__ import annotations

import pytest
import torch

from circuitfind.testing import tiny_model

MODEL_SPECS = {
    "gpt2": dict(arch="gpt2", n_layers=2, n_heads=4, seed=0),
    "llama": dict(arch="llama", n_layers=2, n_heads=4, seed=1),
    "llama_gqa": dict(arch="llama", n_layers=3, n_heads=4, n_kv_heads=2, seed=2),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> float64 TransformerBridge, built lazily."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            cache[name] = tiny_model(path, dtype=torch.float64, **MODEL_SPECS[name])
        return cache[name]

    return get
