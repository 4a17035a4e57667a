"""load_model: local directories (GPT-2 and Llama layouts), existing bridges, clear errors."""

from __future__ import annotations

import pytest

import circuitfind as cf
from circuitfind.errors import ModelLoadError
from circuitfind.testing import make_tiny_model_dir


@pytest.mark.parametrize("arch, kv", [("gpt2", None), ("llama", 2)])
def test_local_directory_loads_with_hooks(tmp_path, arch, kv):
    path = make_tiny_model_dir(tmp_path / arch, arch=arch, n_kv_heads=kv)
    model = cf.load_model(path, device="cpu")
    assert model.cfg.use_split_qkv_input and model.cfg.use_attn_result and model.cfg.use_hook_mlp_in
    graph = cf.ComputeGraph.from_model(model)
    assert graph.n_kv_heads == (kv or graph.n_heads)
    assert cf.load_model(model) is model  # an existing bridge is accepted as is
    cf.PatchingEngine(model)  # every hook the engine needs is there


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        cf.load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="not a directory"):
        cf.load_model(tmp_path / "missing")


def test_offline_hub_name_gives_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read once at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ModelLoadError) as err:
        cf.load_model("circuitfind-test/not-a-cached-model")
    text = str(err.value)
    assert "circuitfind-test/not-a-cached-model" in text and "directory" in text
