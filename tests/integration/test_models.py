"""load_model: local directories (GPT-2 and Llama layouts), existing bridges, clear errors."""

from __future__ import annotations

import pytest

import circuitfind as cf
from circuitfind.errors import ConfigError, ModelLoadError, UnknownNameError
from circuitfind.models import resolve_model_source, zoo_name, zoo_source
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


def test_one_resolver_for_every_kind_of_model_source(tmp_path):
    path = make_tiny_model_dir(tmp_path / "m", arch="gpt2")
    assert resolve_model_source("gpt2").kind == "hub"
    assert resolve_model_source("openai-community/gpt2").kind == "hub"
    local = resolve_model_source(path)
    assert local.kind == "local" and local.location == str(path.resolve())
    zoo = resolve_model_source("zoo:induction-2l")
    assert (zoo.kind, zoo.display_name) == ("zoo", "zoo:induction-2l")
    assert zoo.location.endswith("induction-2l")
    assert zoo_name("zoo:ioi-small") == "ioi-small" and zoo_name("gpt2") is None
    assert zoo_source("ioi-small") == zoo_source("zoo:ioi-small") == "zoo:ioi-small"
    bridge = cf.load_model(path, device="cpu")
    assert resolve_model_source(bridge).kind == "bridge"
    with pytest.raises(UnknownNameError, match="Did you mean 'ioi-small'"):
        resolve_model_source("zoo:ioi-smal")
    with pytest.raises(ConfigError, match="got int"):
        resolve_model_source(3)
