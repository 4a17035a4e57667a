"""The ``circuitfind`` command line (typer).

Commands: ``discover`` (find a circuit, write circuit.json / circuit.graphml / circuit.svg /
report.md), ``render`` (draw a saved circuit), ``export`` (MIB circuit-track JSON), ``tasks``
and ``algorithms`` (list the registries). Errors circuitfind raises on purpose are printed as one
line, with exit code 2 and no traceback.
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
    from circuitfind.models import zoo_source
    from circuitfind.zoo import default_organism

    name = default_organism(task)
    if name is None:
        raise ConfigError(f"The task {task!r} has no built-in model organism; pass --model "
                          "(a Hugging Face hub name or a local model directory).")
    return zoo_source(name)


@app.command()
def discover(
    task: str = typer.Option(..., "--task", "-t",
                             help="Task name (see `circuitfind tasks`) or a prompt file "
                                  "(.jsonl, .csv, .json; see the README)."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="Hub name (gpt2), local Hugging Face directory, or zoo:NAME. Default: the task's "
             "zoo organism (offline)."),
    algorithm: str = typer.Option("eap", "--algorithm", "-a",
                                  help="Algorithm (see `circuitfind algorithms`)."),
    edges: Optional[int] = typer.Option(None, "--edges", "-n", help="Keep the top N edges."),
    threshold: Optional[float] = typer.Option(None, "--threshold",
                                              help="Keep edges with |score| >= X."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    n_examples: Optional[int] = typer.Option(
        None, "--examples", help="Clean/corrupted pairs to build (default: 64; every row of a "
                                 "prompt file)."),
    seed: int = typer.Option(0, "--seed", help="Data seed."),
    metric: Optional[str] = typer.Option(
        None, "--metric", help="Prompt files: logit_diff (default), prob_diff, log_prob or kl."),
    first_token: bool = typer.Option(
        False, "--first-token", help="Prompt files: score multi-token answers by their first "
                                     "token."),
    signed: bool = typer.Option(False, "--signed", help="Rank by signed score, not |score|."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Keep dangling edges."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    param: Optional[list[str]] = typer.Option(
        None, "--param", "-p",
        help="Algorithm hyperparameter KEY=VALUE (repeatable), e.g. --param steps=10 "
             "--param interpolation=activations for eap-ig."),
) -> None:
    """Discover a circuit and write circuit.json, circuit.graphml, circuit.svg and report.md."""
    from circuitfind.api import discover as run_discover
    from circuitfind.graphs.render import render

    from circuitfind.tasks import get_task

    if edges is not None and threshold is not None:
        raise ConfigError("pass either --edges or --threshold, not both.")
    _check_out(out, overwrite)
    task_obj = get_task(task, metric=metric, first_token=first_token)  # fail fast, before loading
    model_name = model or _default_model(task_obj.name if task_obj.source is None else task)
    typer.echo(f"discovering: model={model_name} task={task} algorithm={algorithm}", err=True)
    params = parse_params(param or [])
    checkpoint = out / CHECKPOINT_DIR / f"{normalize_name(algorithm)}.pt"
    if "checkpoint" in inspect.signature(ALGORITHMS.get(algorithm).__init__).parameters:
        # long runs checkpoint inside --out; rerunning the same command resumes
        params["checkpoint"] = str(checkpoint)
        if checkpoint.exists():
            typer.echo(f"resuming from {checkpoint}", err=True)
    circuit = run_discover(model_name, task_obj, algorithm=algorithm, n_edges=edges,
                           threshold=threshold, n_examples=n_examples, seed=seed,
                           absolute=not signed, prune=not no_prune, device=device,
                           algorithm_params=params)
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


def parse_params(items: list[str]) -> dict[str, object]:
    """``["steps=10", "interpolation=inputs"]`` -> ``{"steps": 10, "interpolation": "inputs"}``.

    Values are read as JSON where they parse (numbers, true/false, null), else as strings.

    Raises:
        ConfigError: an item without ``=``.
    """
    params: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param takes KEY=VALUE (e.g. --param steps=10); got {item!r}.")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return params


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
            ("task description", md.get("task_description") or ""),
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


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "undefined (m(M) = m(∅))" if math.isnan(value) else f"{value:.4f}"
    return str(value)


@app.command()
def evaluate(
    circuit_path: Path = typer.Argument(..., help="circuit.json or circuit.graphml."),
    task: Optional[str] = typer.Option(None, "--task", "-t",
                                       help="Task name or prompt file (default: the circuit's "
                                            "own task)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model (default: the circuit's own model)."),
    n_examples: Optional[int] = typer.Option(
        None, "--examples", help="Clean/corrupted pairs to build (default: 64; every row of a "
                                 "prompt file)."),
    seed: int = typer.Option(1, "--seed", help="Data seed (default 1: fresh prompts; a prompt "
                                               "file's rows are used in file order)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ..."),
) -> None:
    """Evaluate a saved circuit: normalized faithfulness and KL divergence on fresh data."""
    from circuitfind.api import build_data
    from circuitfind.evaluation.faithfulness import evaluate as run_evaluate
    from circuitfind.graphs.circuit import Circuit
    from circuitfind.models import load_model

    from circuitfind.tasks import get_task

    circuit = Circuit.load(circuit_path)
    md = circuit.metadata
    if task:
        task_obj = get_task(task)
    elif md.get("task_source"):  # the circuit's own prompt file, read the way discover read it
        task_obj = get_task(md["task_source"], **md.get("task_arguments", {}))
    else:
        task_obj = get_task(md["task"]) if md.get("task") else None
    model = model or md.get("model")
    if task_obj is None or not model:
        raise ConfigError("The circuit file does not name its task and model; pass --task and "
                          "--model.")
    loaded = load_model(model, device=device)
    data = build_data(loaded, task_obj, n=n_examples, seed=seed)
    report = run_evaluate(loaded, circuit, data)
    typer.echo(f"{circuit.n_edges} edges on {task_obj.name} ({data.n} examples, seed {seed}): "
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


EXPORT_FORMATS = ("mib",)


@app.command()
def export(
    circuit_path: Path = typer.Argument(..., help="circuit.json or circuit.graphml of a run."),
    format: str = typer.Option(..., "--format", "-f",
                               help="Export format: mib (MIB circuit-track JSON)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="Submission directory (one folder {task}_{model} per cell is written inside it), "
             "or a .json file. Default: mib/ beside the circuit file."),
    d_model: Optional[int] = typer.Option(
        None, "--d-model", help="The model's hidden size (default: read from the model's "
                                "config)."),
    task_name: Optional[str] = typer.Option(None, "--task-name",
                                            help="Task part of the folder name (default: the "
                                                 "circuit's task)."),
    model_name: Optional[str] = typer.Option(None, "--model-name",
                                             help="Model part of the folder name (default: the "
                                                  "circuit's model)."),
) -> None:
    """Export a saved circuit (kept edges and all edge scores) for the MIB circuit track."""
    from circuitfind.graphs.circuit import Circuit
    from circuitfind.graphs.mib import export_mib

    fmt = format.strip().lower()
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"Unknown export format {format!r}; choose one of "
                          f"{list(EXPORT_FORMATS)}.")
    circuit = Circuit.load(circuit_path)
    target = out if out is not None else circuit_path.parent / "mib"
    path = export_mib(circuit, target, d_model=d_model, task=task_name, model=model_name)
    typer.echo(f"wrote {path} ({circuit.n_edges} kept edges; all edge scores)")


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
