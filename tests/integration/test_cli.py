"""The CLI end to end on a tiny model, and its bad-input messages (exit code != 0, no traceback)."""

from __future__ import annotations

import dataclasses
import json
import shlex
import tempfile

import pytest

from circuitfind.graphs.render import _FALLBACK_SAID, RENDERERS
from circuitfind.outputs import DATA_FILES
from circuitfind.testing import make_tiny_model_dir


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
    for name in ("circuit.json", "circuit.graphml", "circuit.svg", "report.md", "circuit.dot"):
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


def test_acdc_discover_is_killed_resumed_and_refuses_a_foreign_checkpoint(run, tiny_dir, tmp_path,
                                                                         ctrl_c):
    from circuitfind.patching.engine import PatchingEngine

    base = ["discover", "--model", str(tiny_dir), "--task", "induction", "--examples", "6",
            "--algorithm", "acdc", "--threshold", "0.001"]
    whole = run(*base, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    expected = json.loads((tmp_path / "whole" / "circuit.json").read_text())
    assert expected["metadata"]["acdc"]["threshold"] == 0.001
    assert "ACDC" in (tmp_path / "whole" / "report.md").read_text()

    out_dir = tmp_path / "resumed"
    with ctrl_c(PatchingEngine, "run", 6):
        first = run(*base, "--out", str(out_dir))
    assert first.returncode == 130 and "rerun the same command" in first.stderr
    assert (out_dir / ".checkpoint" / "acdc.pt").exists()
    foreign = run(*base[:-1], "0.002", "--out", str(out_dir))
    assert foreign.returncode == 2 and "different run" in foreign.stderr
    second = run(*base, "--out", str(out_dir))
    assert second.returncode == 0 and "resuming" in second.stderr, second.stderr
    got = json.loads((out_dir / "circuit.json").read_text())
    assert got["edges"] == expected["edges"] and got["scores"] == expected["scores"]
    bad = run(*base[:-1], "-1", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "threshold" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------ outputs and drawing
def _small_circuit_file(tmp_path):
    import torch

    from circuitfind.graphs import ComputeGraph, select_top_n

    graph = ComputeGraph(2, 4)
    scores = torch.randn(graph.n_senders, graph.n_receivers,
                         generator=torch.Generator().manual_seed(0))
    circuit = select_top_n(graph, scores, 25, metadata={"model": "tiny", "task": "ioi"})
    return circuit.save(tmp_path / "c.json")


def test_discover_without_dot_draws_with_matplotlib(run, tiny_dir, tmp_path, without_dot):
    _FALLBACK_SAID.clear()
    out_dir = tmp_path / "run"
    result = run("discover", "--model", str(tiny_dir), "--task", "induction", "--edges", "20",
                 "--examples", "8", "--out", str(out_dir))
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "matplotlib" in line]
    assert len(notes) == 1 and "dot" in notes[0]
    svg = (out_dir / "circuit.svg").read_text()
    assert 'id="figure_1"' in svg and "input" in svg  # a matplotlib drawing with its text
    assert (out_dir / "circuit.dot").read_text().startswith("digraph")


def test_a_failed_drawing_keeps_the_run(run, tiny_dir, tmp_path, monkeypatch):
    def broken(scene, fmt):
        raise RuntimeError("no fonts\nat all")

    originals = {name: RENDERERS.get(name) for name in RENDERERS.names()}
    for name, renderer in originals.items():
        monkeypatch.setitem(RENDERERS._items, name, dataclasses.replace(renderer, draw=broken))
    out_dir = tmp_path / "run"
    result = run("discover", "--model", str(tiny_dir), "--task", "induction", "--edges", "20",
                 "--examples", "8", "--out", str(out_dir))
    assert result.returncode == 0, result.stderr
    assert "faithfulness" in result.stdout
    for name in DATA_FILES:
        assert (out_dir / name).stat().st_size > 0
    assert not (out_dir / "circuit.svg").exists()
    assert "Traceback" not in result.stderr
    notes = [line for line in result.stderr.splitlines() if "circuitfind render" in line]
    assert len(notes) == 1 and "RuntimeError: no fonts at all" in notes[0]
    # the command the note gives draws it later
    for name, renderer in originals.items():
        monkeypatch.setitem(RENDERERS._items, name, renderer)
    command = shlex.split(notes[0].split("Draw it later with: ")[1])
    assert command[:2] == ["circuitfind", "render"]
    later = run(*command[1:])
    assert later.returncode == 0, later.stderr
    assert (out_dir / "circuit.svg").read_bytes().startswith(b"<?xml")


def test_render_command_paper_options(run, tmp_path, without_dot):
    path = _small_circuit_file(tmp_path)
    for suffix in (".pdf", ".png", ".svg", ".dot"):
        result = run("render", str(path), str(tmp_path / f"c{suffix}"), "--collapse-qkv",
                     "--top", "10", "--edge-colour", "sign", "--head-labels", "layer.head",
                     "--landscape", "--no-title", "--fixed-order")
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.pdf").read_bytes().startswith(b"%PDF")
    svg = (tmp_path / "c.svg").read_text()
    assert "1.0" in svg and "edges" not in svg  # L.H labels, no title
    assert "rankdir=LR" in (tmp_path / "c.dot").read_text()


@pytest.mark.parametrize("args, message", [
    (["--renderer", "graphviz"], "--renderer matplotlib"),
    (["--renderer", "plotly"], "graphviz, matplotlib"),
    (["--edge-colour", "rainbow"], "'rainbow' is not one of receiver, sign"),
    (["--top", "-2"], "Invalid value for '--top'"),
])
def test_render_command_bad_input(run, tmp_path, without_dot, args, message):
    path = _small_circuit_file(tmp_path)
    result = run("render", str(path), str(tmp_path / "c.svg"), *args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "c.svg").exists()
    assert "RenderOptions" not in result.stderr and "top_n" not in result.stderr


def test_render_command_bad_paths(run, tmp_path):
    path = _small_circuit_file(tmp_path)
    result = run("render", str(path), str(tmp_path / "c.jpeg"))
    assert result.returncode == 2 and "'.pdf', '.png', '.svg'" in result.stderr
    result = run("render", str(path), str(tmp_path / "missing" / "c.svg"))
    assert result.returncode == 2 and "does not exist" in result.stderr


@pytest.mark.parametrize("case, message", [
    ("file", "not a directory"),
    ("unwritable", "not writable"),
    ("graphviz", "--renderer matplotlib"),
    ("plotly", "graphviz, matplotlib"),
])
def test_discover_rejects_outputs_before_any_work(run, tmp_path, monkeypatch, without_dot,
                                                  case, message):
    import circuitfind.api

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(circuitfind.api, "load_model", no_work)
    out_dir, extra = tmp_path / "runs" / "x", []
    if case == "file":
        (tmp_path / "runs").write_text("a file")
    elif case == "unwritable":
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    else:
        extra = ["--renderer", case]
    result = run("discover", "--task", "induction", "--out", str(out_dir), *extra)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out_dir.exists()


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
    assert refused.returncode == 2 and "instead of --edges" in refused.stderr


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
    assert bad.returncode == 2 and "'onnx' is not one of mib" in bad.stderr
