"""AtP*'s QK fix has fast paths that the families of test_backward_rules.py take (clean sides
and bias offsets turned back by the half-split rotation; 1/sigma, biases and Qwen3's head
norms applied to the scores). Each is pinned here to the general path it replaces, on the
same engine: rotation matrices (``half_split_factors`` -> ``None``) and, for Qwen3, the
patched projections normed in place (``qk_norm_parts`` -> ``None``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from circuitfind.algorithms import AtPStar
from circuitfind.patching import PatchingEngine
from circuitfind.testing import ToyTask, tiny_model
from tolerances import float32_atol

FAMILIES = {
    "gpt_neox": dict(arch="gpt_neox", n_layers=2, seed=7),  # partial rotary, biases
    "qwen2": dict(arch="qwen2", n_layers=2, n_kv_heads=2, seed=5),  # grouped, biases
    "qwen3": dict(arch="qwen3", n_layers=2, n_kv_heads=2, seed=6),  # q/k norms
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fast_paths_equal_the_general_ones(tmp_path, name, dtype):
    model = tiny_model(tmp_path, dtype=dtype, **FAMILIES[name])
    data = ToyTask(seq_len=8, positions=2).build(model.tokenizer, 3, seed=1)
    engine = PatchingEngine(model)
    lay = engine.runner.arch
    qk = torch.tensor([rec.kind in ("q", "k") for rec in engine.graph.receivers])

    def score() -> torch.Tensor:  # a new corrupted tensor: the engine's memo never hits
        fresh = dataclasses.replace(data, corrupted=data.corrupted.clone())
        return AtPStar(grad_drop=False).score(engine, fresh).double()[:, qk]

    fast = score()
    lay.half_split_factors = lambda q: None  # rotation matrices
    lay.qk_norm_parts = lambda layer: None  # Qwen3: norms on the patched projections
    general = score()
    assert general.abs().max() > 1e-3
    # float32 models: both paths round in float32 (a few ulps of the largest score apart)
    atol = float32_atol(general) if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(fast, general, atol=atol, rtol=0)
