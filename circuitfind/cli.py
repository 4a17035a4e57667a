"""The ``circuitfind`` command line (typer).

Commands: ``discover`` (find a circuit, write circuit.json / circuit.graphml / circuit.svg /
report.md), ``render`` (draw a saved circuit), ``tasks`` and ``algorithms`` (list the
registries). Errors circuitfind raises on purpose are printed as one line, with exit code 2 and
no traceback.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from circuitfind.algorithms import ALGORITHMS
from circuitfind.errors import CircuitFindError, ConfigError, OutputExistsError
from circuitfind.registry import normalize_name

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="circuitfind: automated circuit discovery for transformer language models.")

RUN_FILES = ("circuit.json", "circuit.graphml", "circuit.svg", "report.md")
CHECKPOINT_DIR = ".checkpoint"


def _default_model(task: str) -> str:
    """The zoo organism of ``task`` (for offline runs without --model)."""
    from circuitfind.zoo import default_organism

    name = default_organism(task)
    if name is None:
        raise ConfigError(f"The task {task!r} has no built-in model organism; pass --model "
                          "(a Hugging Face hub name or a local model directory).")
    return f"zoo:{name}"


@app.command()
def discover(
    task: str = typer.Option(..., "--task", "-t", help="Task name (see `circuitfind tasks`)."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Hub name (gpt2), local Hugging Face directory, or zoo:NAME. Default: the task's "
             "zoo organism (offline)."),
    algorithm: str = typer.Option("eap", "--algorithm", "-a",
                                  help="Algorithm (see `circuitfind algorithms`)."),
    edges: Optional[int] = typer.Option(None, "--edges", "-n", help="Keep the top N edges."),
    threshold: Optional[float] = typer.Option(None, "--threshold",
                                              help="Keep edges with |score| >= X (path-patching: "
                                                   "its selection threshold)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    n_examples: int = typer.Option(64, "--examples", help="Clean/corrupted pairs to build."),
    seed: int = typer.Option(0, "--seed", help="Data seed."),
    signed: bool = typer.Option(False, "--signed", help="Rank by signed score, not |score|."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Keep dangling edges."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    ablation: str = typer.Option(
        "resample", "--ablation",
        help="What a removed edge carries: resample (the task's corrupted run), zero, mean or "
             "mean-positional (means over the corrupted examples)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
) -> None:
    """Discover a circuit and write circuit.json, circuit.graphml, circuit.svg and report.md."""
    from circuitfind.api import discover as run_discover
    from circuitfind.graphs.render import render
    from circuitfind.patching.spec import Ablation

    if edges is not None and threshold is not None:
        raise ConfigError("pass either --edges or --threshold, not both.")
    spec = Ablation.parse(ablation)
    _check_out(out, overwrite)
    model_name = model or _default_model(task)
    typer.echo(f"discovering: model={model_name} task={task} algorithm={algorithm} "
               f"ablation={spec.kind}", err=True)
    params: dict[str, object] = {}
    checkpoint = out / CHECKPOINT_DIR / f"{normalize_name(algorithm)}.pt"
    if "checkpoint" in inspect.signature(ALGORITHMS.get(algorithm).__init__).parameters:
        # long runs checkpoint inside --out; rerunning the same command resumes
        params["checkpoint"] = str(checkpoint)
        if checkpoint.exists():
            typer.echo(f"resuming from {checkpoint}", err=True)
    circuit = run_discover(model_name, task, algorithm=algorithm, n_edges=edges,
                           threshold=threshold, n_examples=n_examples, seed=seed,
                           absolute=not signed, prune=not no_prune, device=device,
                           algorithm_params=params, ablation=spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        circuit.to_json(tmp / "circuit.json", indent=1)
        circuit.to_graphml(tmp / "circuit.graphml")
        render(circuit, tmp / "circuit.svg")
        (tmp / "report.md").write_text(report_markdown(circuit), encoding="utf-8")
        out.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:  # each file replaced atomically; all written before any moves
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # the run is complete
    faith = circuit.metadata["faithfulness"]
    typer.echo(f"{circuit.n_edges} edges; normalized faithfulness {faith['faithfulness']:.4f} "
               f"(m(C)={faith['metric_circuit']:.4f}, m(M)={faith['metric_full']:.4f}, "
               f"m(∅)={faith['metric_empty']:.4f} {faith['metric_unit']}); "
               f"KL {faith['kl_div']:.4f} nats")
    typer.echo(f"wrote {', '.join(str(out / f) for f in RUN_FILES)}")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory.")
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{str(out)!r} already holds a run ({', '.join(existing)}); pass "
                                "--overwrite to replace it or choose another --out.")


def report_markdown(circuit) -> str:  # type: ignore[no-untyped-def]
    """The run report (Markdown): provenance, faithfulness, and the top edges by |score|."""
    md = circuit.metadata
    f = md.get("faithfulness", {})
    lines = [f"# circuitfind: {md.get('task')} on {md.get('model')}", "",
             "| field | value |", "| --- | --- |"]
    rows = [("model", md.get("model")), ("task", md.get("task")),
            ("metric", f"{md.get('metric')} ({md.get('metric_unit')})"),
            ("algorithm", md.get("algorithm")),
            ("algorithm parameters", json.dumps(md.get("algorithm_params", {}))),
            ("ablation (what removed edges carry)", _ablation_kind(md)),
            ("examples / seed", f"{md.get('n_examples')} / {md.get('seed')}"),
            ("selection", json.dumps(md.get("selection", {}))),
            ("edges (selected → after pruning)", f"{md.get('selected_edges')} → {circuit.n_edges}"
                                                  f" of {f.get('n_total_edges')}"),
            ("wall time", f"{md.get('wall_time_s')} s"),
            ("versions", ", ".join(f"{k} {v}" for k, v in md.get("versions", {}).items()))]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Faithfulness", "", "| quantity | value |", "| --- | --- |",
              f"| normalized faithfulness (m(C) − m(∅)) / (m(M) − m(∅)) | {_fmt(f.get('faithfulness'))} |",
              f"| m(C), circuit | {_fmt(f.get('metric_circuit'))} {f.get('metric_unit', '')} |",
              f"| m(M), full model | {_fmt(f.get('metric_full'))} {f.get('metric_unit', '')} |",
              f"| m(∅), empty circuit | {_fmt(f.get('metric_empty'))} {f.get('metric_unit', '')} |",
              f"| KL(full ‖ circuit) at metric positions | {_fmt(f.get('kl_div'))} nats |", ""]
    ref = md.get("reference")
    if ref:
        lines += ["## Against the reference circuit", "",
                  f"Reference: {ref.get('source')} ({ref.get('n_edges')} edges). ROC AUC of the "
                  "algorithm's |scores| over all edges (Conmy et al. 2023; ties count one half):",
                  "", "| level | ROC AUC |", "| --- | ---: |",
                  f"| edges | {_fmt(ref.get('edge_auc'))} |",
                  f"| nodes (max |score| of incident edges) | {_fmt(ref.get('node_auc'))} |", ""]
    search = md.get("path_patching")
    if search:
        lines += ["## Path-patching levels", "",
                  f"Senders selected where |effect| > {_fmt(search.get('threshold_abs'))} "
                  f"{md.get('metric_unit', '')} (effect: metric change when the sender is "
                  "corrupted only along its direct paths into the level's receivers).", "",
                  "| level | receivers | selected senders (effect) |", "| ---: | --- | --- |"]
        for i, level in enumerate(search.get("levels", [])):
            receivers = ", ".join(f"`{r}`" for r in level["receivers"])
            senders = ", ".join(f"`{s}` ({v:+.4f})" for s, v in level["senders"].items())
            lines.append(f"| {i} | {receivers} | {senders or 'none'} |")
        lines.append("")
    if circuit.scores is not None and circuit.n_edges:
        scores = circuit.edge_scores()
        top = sorted(scores.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:25]
        lines += ["## Top edges by |score|", "",
                  f"Score: estimated change of the metric ({md.get('metric_unit')}) when the edge "
                  "is corrupted.", "", "| edge | score |", "| --- | ---: |"]
        lines += [f"| `{name}` | {value:+.5f} |" for name, value in top]
        lines.append("")
    lines += ["Files: `circuit.json` (lossless, all edge scores), `circuit.graphml`, "
              "`circuit.svg`.", ""]
    return "\n".join(lines)


def _ablation_kind(metadata: dict) -> str:  # type: ignore[type-arg]
    """The ablation a circuit was found with (``resample`` for circuits that predate the field)."""
    value = metadata.get("ablation") or "resample"
    return str(value.get("kind", "resample") if isinstance(value, dict) else value)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "undefined (m(M) = m(∅))" if math.isnan(value) else f"{value:.4f}"
    return str(value)


@app.command()
def evaluate(
    circuit_path: Path = typer.Argument(..., help="circuit.json or circuit.graphml."),
    task: Optional[str] = typer.Option(None, "--task", "-t",
                                       help="Task (default: the circuit's own task)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model (default: the circuit's own model)."),
    n_examples: int = typer.Option(64, "--examples", help="Clean/corrupted pairs to build."),
    seed: int = typer.Option(1, "--seed", help="Data seed (default 1: fresh prompts)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    ablation: Optional[str] = typer.Option(
        None, "--ablation",
        help="resample, zero, mean or mean-positional (default: the ablation the circuit was "
             "found with)."),
) -> None:
    """Evaluate a saved circuit: normalized faithfulness and KL divergence on fresh data."""
    from circuitfind.api import build_data
    from circuitfind.evaluation.faithfulness import evaluate as run_evaluate
    from circuitfind.graphs.circuit import Circuit
    from circuitfind.models import load_model
    from circuitfind.patching.spec import Ablation

    circuit = Circuit.load(circuit_path)
    spec = Ablation.parse(ablation or _ablation_kind(circuit.metadata))
    task = task or circuit.metadata.get("task")
    model = model or circuit.metadata.get("model")
    if not task or not model:
        raise ConfigError("The circuit file does not name its task and model; pass --task and "
                          "--model.")
    loaded = load_model(model, device=device)
    data = build_data(loaded, task, n=n_examples, seed=seed)
    report = run_evaluate(loaded, circuit, data, ablation=spec)
    typer.echo(f"{circuit.n_edges} edges on {task} ({n_examples} examples, seed {seed}, "
               f"{spec.kind} ablation): "
               f"normalized faithfulness {report.faithfulness:.4f}; m(C)={report.metric_circuit:.4f}, "
               f"m(M)={report.metric_full:.4f}, m(∅)={report.metric_empty:.4f} "
               f"{report.metric_unit}; KL {report.kl_div:.4f} nats")


@app.command()
def render(
    circuit_path: Path = typer.Argument(..., help="circuit.json or circuit.graphml."),
    out: Path = typer.Argument(..., help="Output file: .svg, .pdf, .png or .dot."),
) -> None:
    """Draw a saved circuit with Graphviz."""
    from circuitfind.graphs.circuit import Circuit

    path = Circuit.load(circuit_path).render(out)
    typer.echo(f"wrote {path}")


@app.command()
def tasks() -> None:
    """List the registered tasks."""
    from circuitfind.tasks import TASKS

    for name, cls in TASKS.items():
        typer.echo(f"{name:<18} {cls.description}  [{cls.metric_name}, {cls.metric_unit}]")


@app.command()
def algorithms() -> None:
    """List the registered algorithms."""
    from circuitfind.algorithms import ALGORITHMS

    for name, cls in ALGORITHMS.items():
        typer.echo(f"{name:<18} {cls.description}")


def main() -> None:
    """Console entry point: run the app, turning circuitfind errors into one-line messages."""
    try:
        code = app(standalone_mode=False)
    except CircuitFindError as err:
        typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
