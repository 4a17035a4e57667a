"""``memory_budget`` reaches the engine from every entry point, and changes no result."""

from __future__ import annotations

import pytest

import circuitfind as cf
from circuitfind.benchmark.grid import load_config
from circuitfind.errors import ConfigError
from circuitfind.testing import ToyTask
from tolerances import assert_close


@pytest.mark.parametrize("algorithm", ["eap", "exact", "eap_ig"])
def test_score_edges_chunks_within_a_small_budget_with_the_same_scores(tiny_models, algorithm):
    model = tiny_models("llama_gqa")
    data = ToyTask(positions=2).build(model.tokenizer, 6, seed=3)
    roomy = cf.score_edges(model, data=data, algorithm=algorithm)
    tight = cf.score_edges(model, data=data, algorithm=algorithm, memory_budget="1.5MiB")
    engine = cf.PatchingEngine(model, memory_budget="1.5MiB")  # caches and weights included
    assert engine.rows_per_pass(data.seq_len, None, data.n) < 6 * 4
    assert engine.attribution_plan(data.n, data.seq_len, 5)[:2] != (6, 5)
    assert_close(model, tight, roomy)  # chunks round Llama's float32 steps differently


def test_discover_and_evaluate_take_a_budget(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 4, seed=1)
    circuit = cf.discover(model, data=data, n_edges=10, memory_budget="4MiB")
    report = cf.evaluate(model, circuit, data, memory_budget=2**22)
    assert report.faithfulness == pytest.approx(circuit.metadata["faithfulness"]["faithfulness"])
    with pytest.raises(ConfigError, match="4GiB"):
        cf.discover(model, data=data, n_edges=10, memory_budget="lots")


def test_bench_configs_take_a_memory_key():
    base = {"models": ["zoo:induction-2l"], "tasks": ["induction"], "algorithms": ["eap"]}
    assert load_config({**base, "memory": "512MiB"}).memory_budget == 512 * 2**20
    assert load_config(base).memory_budget is None  # the weights plus 2 GiB
    with pytest.raises(ConfigError, match="memory"):
        load_config({**base, "memory": "a lot"})


def test_cli_memory_option(run, tmp_path):
    ok = run("discover", "--task", "induction", "--edges", "5", "--examples", "4",
             "--memory", "64MiB", "--out", str(tmp_path / "run"), "--renderer", "matplotlib")
    assert ok.returncode == 0, ok.stderr
    bad = run("discover", "--task", "induction", "--edges", "5", "--memory", "64 parsecs",
              "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "4GiB" in bad.stderr
    assert not (tmp_path / "bad").exists()
