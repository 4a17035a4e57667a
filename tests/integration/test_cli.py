"""The CLI end to end on a tiny model, and its bad-input messages (exit code != 0, no traceback)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest

from circuitfind.cli import main
from circuitfind.testing import make_tiny_model_dir


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys, monkeypatch):
    """Run ``circuitfind ARGS`` in-process through the console entry point (fast)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def invoke(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["circuitfind", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return invoke


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("cli") / "model", arch="gpt2")


def test_lists(run):
    out = run("tasks")
    assert out.returncode == 0
    for name in ("ioi", "greater_than", "induction", "gendered_pronoun"):
        assert name in out.stdout
    out = run("algorithms")
    assert out.returncode == 0 and "eap" in out.stdout and "exact" in out.stdout


def test_discover_writes_four_files_and_refuses_to_overwrite(run, tiny_dir, tmp_path):
    out_dir = tmp_path / "run"
    args = ["discover", "--model", str(tiny_dir), "--task", "induction", "--edges", "20",
            "--examples", "8", "--out", str(out_dir)]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    assert "faithfulness" in first.stdout
    for name in ("circuit.json", "circuit.graphml", "circuit.svg", "report.md"):
        assert (out_dir / name).stat().st_size > 0
    meta = json.loads((out_dir / "circuit.json").read_text())["metadata"]
    assert meta["algorithm"] == "eap" and meta["task"] == "induction"
    before = (out_dir / "circuit.json").read_bytes()
    second = run(*args)
    assert second.returncode != 0 and "--overwrite" in second.stderr
    assert "Traceback" not in second.stderr
    assert (out_dir / "circuit.json").read_bytes() == before
    third = run(*args, "--overwrite", "--algorithm", "exact")
    assert third.returncode == 0, third.stderr
    assert json.loads((out_dir / "circuit.json").read_text())["metadata"]["algorithm"] == "exact"


@pytest.mark.parametrize("extra, message", [
    (["--task", "ioj"], "Did you mean 'ioi'"),
    (["--task", "ioi", "--algorithm", "eapp"], "Did you mean 'eap'"),
    (["--task", "ioi"], "single-token"),
    (["--task", "induction", "--edges", "10", "--threshold", "0.1"], "not both"),
    (["--task", "induction", "--edges", "100000"], "between 0 and"),
])
def test_bad_input_is_one_clear_message(run, tiny_dir, tmp_path, extra, message):
    out = run("discover", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), *extra)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_path_that_is_not_a_model(run, tmp_path):
    out = run("discover", "--model", str(tmp_path), "--task", "ioi", "--out", str(tmp_path / "x"))
    assert out.returncode != 0 and "config.json" in out.stderr and "Traceback" not in out.stderr


def test_evaluate_a_saved_circuit(run, tiny_dir, tmp_path):
    out_dir = tmp_path / "run"
    first = run("discover", "--model", str(tiny_dir), "--task", "induction", "--edges", "20",
                "--examples", "8", "--algorithm", "exact", "--out", str(out_dir))
    assert first.returncode == 0, first.stderr
    assert not (out_dir / ".checkpoint").exists()  # removed once the run is complete
    result = run("evaluate", str(out_dir / "circuit.json"), "--examples", "8", "--seed", "0")
    assert result.returncode == 0, result.stderr
    saved = json.loads((out_dir / "circuit.json").read_text())["metadata"]["faithfulness"]
    assert f"normalized faithfulness {saved['faithfulness']:.4f}" in result.stdout


def test_ablation_is_recorded_and_reused(run, tiny_dir, tmp_path):
    out_dir = tmp_path / "run"
    found = run("discover", "--model", str(tiny_dir), "--task", "induction", "--edges", "20",
                "--examples", "8", "--ablation", "mean-positional", "--out", str(out_dir))
    assert found.returncode == 0, found.stderr
    meta = json.loads((out_dir / "circuit.json").read_text())["metadata"]
    assert meta["ablation"] == {"kind": "mean_positional"}
    assert "| ablation (what removed edges carry) | mean_positional |" in (
        out_dir / "report.md").read_text()
    again = run("evaluate", str(out_dir / "circuit.json"), "--examples", "8", "--seed", "0")
    assert again.returncode == 0, again.stderr  # the recorded ablation by default
    assert "mean_positional ablation" in again.stdout
    assert f"normalized faithfulness {meta['faithfulness']['faithfulness']:.4f}" in again.stdout
    zero = run("evaluate", str(out_dir / "circuit.json"), "--examples", "8", "--seed", "0",
               "--ablation", "zero")
    assert zero.returncode == 0 and "zero ablation" in zero.stdout
    bad = run("discover", "--model", str(tiny_dir), "--task", "induction", "--ablation",
              "gaussian", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "resample, zero, mean, mean_positional" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_path_patching_from_the_cli(run, tiny_dir, tmp_path):
    out_dir = tmp_path / "run"
    found = run("discover", "--model", str(tiny_dir), "--task", "induction", "--algorithm",
                "path-patching", "--threshold", "0.02", "--examples", "8", "--out", str(out_dir))
    assert found.returncode == 0, found.stderr
    meta = json.loads((out_dir / "circuit.json").read_text())["metadata"]
    assert meta["algorithm"] == "path_patching" and meta["algorithm_params"]["threshold"] == 0.02
    assert meta["path_patching"]["levels"][0]["receivers"] == ["logits"]
    assert "| 0 | `logits` |" in (out_dir / "report.md").read_text()
    refused = run("discover", "--model", str(tiny_dir), "--task", "induction", "--algorithm",
                  "path-patching", "--edges", "10", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "instead of n_edges" in refused.stderr
