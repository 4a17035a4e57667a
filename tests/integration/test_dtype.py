"""``--dtype`` / ``dtype=``: the dtype a user asks for reaches the loaded model, the plan and
the bench grid's cells, and a dtype that is not one of the four is refused before any work
with the choices listed."""

from __future__ import annotations

import json

import pytest
import torch

import circuitfind as cf
import circuitfind.api as api_module
import circuitfind.models as models_module
from circuitfind.benchmark.grid import _Models, load_config, run_cell
from circuitfind.errors import ConfigError
from circuitfind.models import DTYPES, dtype_name, parse_dtype
from circuitfind.testing import make_tiny_model_dir

CHOICES = "float32, float16, bfloat16, float64"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("dtype") / "model", arch="llama",
                               n_kv_heads=2)


@pytest.fixture
def loads(monkeypatch):
    """The dtype of every model :func:`circuitfind.models.load_model` returns, in order."""
    seen: list[torch.dtype] = []
    original = models_module.load_model

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        seen.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(models_module, "load_model", spy)
    monkeypatch.setattr(api_module, "load_model", spy)
    return seen


def test_names_and_aliases():
    assert tuple(DTYPES) == tuple(CHOICES.split(", "))
    assert parse_dtype(None) == torch.float32
    assert parse_dtype("BF16") == parse_dtype("torch.bfloat16") == torch.bfloat16
    assert parse_dtype(torch.float64) == torch.float64 and parse_dtype("half") == torch.float16
    assert dtype_name(torch.float16) == "float16"
    for bad in ("int8", "float8", torch.int64):
        with pytest.raises(ConfigError, match=CHOICES):
            parse_dtype(bad)


def test_cli_dtype_reaches_the_model_the_circuit_and_the_plan(run, tiny_dir, tmp_path, loads):
    out = tmp_path / "run"
    found = run("discover", "--model", str(tiny_dir), "--task", "induction", "--edges", "10",
                "--examples", "4", "--no-view", "--dtype", "bfloat16", "--out", str(out))
    assert found.returncode == 0, found.stderr
    assert loads == [torch.bfloat16]
    meta = json.loads((out / "circuit.json").read_text())["metadata"]
    assert meta["dtype"] == "bfloat16"
    # evaluate loads the model in the circuit's own dtype unless told otherwise
    assert run("evaluate", str(out / "circuit.json"), "--examples", "4").returncode == 0
    assert run("evaluate", str(out / "circuit.json"), "--examples", "4",
               "--dtype", "float64").returncode == 0
    checked = run("check", "--model", str(tiny_dir), "--task", "induction", "--examples", "4",
                  "--dtype", "float16", "--json")
    assert checked.returncode == 0, checked.stderr
    assert loads == [torch.bfloat16, torch.bfloat16, torch.float64, torch.float16]
    plans = {}
    for dtype in ("float16", "float64"):
        planned = run("plan", "--model", str(tiny_dir), "--seq-len", "8", "--examples", "4",
                      "--dtype", dtype, "--json")
        assert planned.returncode == 0, planned.stderr
        plans[dtype] = json.loads(planned.stdout)
    assert plans["float16"]["dtype_bytes"] == 2 and plans["float64"]["dtype_bytes"] == 8
    assert plans["float64"]["weights"] == 4 * plans["float16"]["weights"]


@pytest.mark.parametrize("command", [
    ["discover", "--task", "induction", "--out", "x"],
    ["evaluate", "c.json"],
    ["check", "--task", "induction"],
    ["tune", "--task", "induction"],
    ["plan", "--model", "m", "--seq-len", "8"],
])
def test_cli_refuses_an_unknown_dtype_listing_the_choices(run, command, loads):
    result = run(*command, "--dtype", "int8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"'int8' is not one of {CHOICES}" in result.stderr
    assert loads == []  # refused before anything was loaded


def test_python_api_dtype(tiny_dir, loads):
    circuit = cf.discover(str(tiny_dir), "induction", n_examples=4, n_edges=10,
                          dtype="float64")
    assert circuit.metadata["dtype"] == "float64"
    scores = cf.score_edges(str(tiny_dir), "induction", n_examples=4, dtype="bfloat16")
    assert scores.dtype == torch.float32 and torch.isfinite(scores).any()
    assert cf.check(str(tiny_dir), "induction", n_examples=4, dtype="float16").n_examples == 4
    assert loads == [torch.float64, torch.bfloat16, torch.float16]
    plan = cf.plan(str(tiny_dir), None, "eap_ig", examples=4, seq_len=8, dtype="bfloat16")
    assert plan.dtype_bytes == 2
    for call in (lambda: cf.discover(str(tiny_dir), "induction", dtype="int8"),
                 lambda: cf.score_edges(str(tiny_dir), "induction", dtype="int8"),
                 lambda: cf.check(str(tiny_dir), "induction", dtype="int8"),
                 lambda: cf.plan(str(tiny_dir), None, seq_len=8, dtype="int8")):
        with pytest.raises(ConfigError, match=CHOICES):
            call()
    assert len(loads) == 3  # refused before loading


def test_bench_config_dtype_reaches_its_cells(tiny_dir):
    grid = {"models": [str(tiny_dir)], "tasks": ["induction"], "algorithms": ["eap"],
            "examples": 4, "fractions": [0.5, 1.0],
            "grid": [{}, {"dtype": "bfloat16"}]}
    config = load_config(grid)
    assert [c.dtype for c in config.cells] == ["float32", "bfloat16"]
    assert [c.label for c in config.cells] == ["eap", "eap @bfloat16"]  # two leaderboard rows
    assert "@" not in config.cells[0].key  # float32 cells keep the keys they had
    cell = config.cells[1]
    record = run_cell(cell, config, _Models(None).get(cell.model, cell.dtype))
    assert record["dtype"] == "bfloat16" and record["n_examples"] == 4
    with pytest.raises(ConfigError, match=f"dtype: .*{CHOICES}"):
        load_config({**grid, "dtype": "int8"})
