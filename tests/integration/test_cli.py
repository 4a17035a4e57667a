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
    (["--task", "mine.jsonl"], "does not exist. A task is a registered name without a suffix"),
    (["--task", "ioi", "--metric", "kl"], "apply to prompt files"),
])
def test_bad_input_is_one_clear_message(run, tiny_dir, tmp_path, extra, message):
    out = run("discover", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), *extra)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_prompt_file_lists_every_problem(run, tiny_dir, tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("clean,corrupted,answer,wrong\nw1 w2,w3 w4, w5, w5\n,w3, w6, w7\n"
                    "w1 w2,w3, w5 w6, w7\n")
    out = run("discover", "--model", str(tiny_dir), "--task", str(path), "--out",
              str(tmp_path / "x"))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "line 2: answer equal to wrong" in out.stderr and "line 3: empty clean" in out.stderr
    path.write_text("clean,corrupted,answer,wrong\nw1 w2,w3, w5 w6, w7\n")
    out = run("discover", "--model", str(tiny_dir), "--task", str(path), "--out",
              str(tmp_path / "x"))
    assert "line 2: the continuation ' w5 w6' is 2 tokens ['w5', 'w6']" in out.stderr
    assert "--first-token" in out.stderr
    out = run("discover", "--model", str(tiny_dir), "--task", str(path), "--first-token",
              "--edges", "5", "--out", str(tmp_path / "x"))
    assert out.returncode == 0, out.stderr
    result = run("evaluate", str(tmp_path / "x" / "circuit.json"))  # finds the file again
    assert result.returncode == 0 and "(1 examples" in result.stdout, result.stderr


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


def test_export_mib_folder_per_cell_and_round_trip(run, tiny_dir, tmp_path):
    import circuitfind as cf

    out_dir = tmp_path / "run"
    first = run("discover", "--model", str(tiny_dir), "--task", "induction", "--edges", "20",
                "--examples", "8", "--out", str(out_dir))
    assert first.returncode == 0, first.stderr
    result = run("export", str(out_dir / "circuit.json"), "--format", "mib", "--out",
                 str(tmp_path / "submission"))
    assert result.returncode == 0, result.stderr
    written = tmp_path / "submission" / f"induction_{tiny_dir.name.replace('_', '-')}" / \
        "importances.json"
    assert written.is_file() and str(written) in result.stdout
    cfg = json.loads(written.read_text())["cfg"]
    assert cfg["d_model"] == json.loads((tiny_dir / "config.json").read_text())["n_embd"]
    assert cf.import_mib(written) == cf.Circuit.load(out_dir / "circuit.json")
    default = run("export", str(out_dir / "circuit.json"), "--format", "mib")
    assert default.returncode == 0 and (out_dir / "mib").is_dir()
    bad = run("export", str(out_dir / "circuit.json"), "--format", "onnx")
    assert bad.returncode == 2 and "Unknown export format 'onnx'" in bad.stderr
