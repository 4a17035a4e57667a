"""The ``circuitfind`` command line (typer).

Commands: ``check`` (does the model do the task?), ``compare`` (two circuits' overlap),
``discover`` (find a circuit, write circuit.json / circuit.graphml / report.md, then
draw circuit.dot / circuit.svg), ``render`` (draw a saved circuit), ``export`` (MIB
circuit-track JSON), ``evaluate``, ``tune``, ``bench`` (a benchmark grid on an Optuna
storage), ``leaderboard`` (tables and figures from it), ``tasks`` and ``algorithms`` (list the
registries). Errors circuitfind raises on purpose are printed as one
line, in the command line's words (``--overwrite``, not ``overwrite=True``), with exit code 2
and no traceback; usage errors (an unknown command or option, a missing or malformed value, a
number out of range, a value not among an option's choices) print click's short usage message,
also with exit code 2. Values the command line can check without a model are checked here,
before anything is loaded. Notes (the matplotlib fallback, a drawing that failed while the
results were saved) are printed as one line on stderr and do not change the exit code.

Progress: every long command takes ``--no-progress``. Without it, a bar is drawn only when
stderr is a terminal (never under ``TQDM_DISABLE``); in a log each phase is one line
(:mod:`circuitfind._progress`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from typer.core import TyperCommand

from circuitfind._progress import quiet
from circuitfind.algorithms import ALGORITHMS
from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.benchmark.leaderboard import SORT_KEYS
from circuitfind.errors import CircuitFindError, ConfigError
from circuitfind.graphs.render import EDGE_COLOUR_MODES, HEAD_LABELS
from circuitfind.models import DTYPES
from circuitfind.outputs import ablation_kind, report_markdown  # noqa: F401  (report re-exported)
from circuitfind.patching.spec import DEFAULT_ABLATION
from circuitfind.registry import normalize_name

if TYPE_CHECKING:
    from circuitfind.tasks.base import Task

_WRAPPED_DEFAULT = re.compile(r"\[default: \(([^()]*)\)(?=[;\]])")


class _Command(TyperCommand):
    """A command whose usage line names its arguments plainly (``render [OPTIONS] CIRCUIT
    OUT``; typer writes required ones as ``{CIRCUIT}``), whose help writes a described
    default plainly (``[default: 100, unless --threshold is given]``; typer wraps it in
    parentheses) and shows the range an option really accepts: typer has only closed ranges
    (``0<=x<=1``), so an option that also refuses its lower end (callback :func:`_above_zero`)
    shows it open (``0<x<=1``)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Parse as typer does, but name the refused value in a coercion error: typer's
        ``Input should be greater than or equal to 0`` becomes ``... greater than or equal to
        0; got -3.``"""
        try:
            return super().parse_args(ctx, args)
        except typer.BadParameter as exc:
            errors = getattr(exc.__cause__, "errors", None)
            found = errors() if callable(errors) else []
            if found and "input" in found[0]:
                exc.message = f"{exc.message.rstrip('.')}; got {found[0]['input']}."
            raise

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]

    @staticmethod
    def help_record(param: Any, ctx: Any) -> tuple[str, str] | None:
        """``(flags, help)`` of ``param`` as the help shows it (``None``: not shown)."""
        record = param.get_help_record(ctx)
        if record is None:
            return None
        text = _WRAPPED_DEFAULT.sub(r"[default: \1", record[1])
        callback = getattr(param, "callback", None)
        if getattr(callback, "__wrapped__", callback) is _above_zero:  # typer wraps it
            text = _open_below(text, getattr(param, "min", None))
        return record[0], text

    def format_options(self, ctx: Any, formatter: Any) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"argument": [], "option": []}
        for param in self.get_params(ctx):
            record = self.help_record(param, ctx)
            if record is not None and param.param_type_name in sections:
                sections[param.param_type_name].append(record)
        for title, kind in (("Arguments", "argument"), ("Options", "option")):
            if sections[kind]:
                with formatter.section(title):
                    formatter.write_dl(sections[kind])


def _one_of(allowed: tuple[str, ...]) -> Callable[[Optional[str]], Optional[str]]:
    """An option callback that reads a value case-insensitively and refuses one outside
    ``allowed`` as a usage error (``Invalid value for '--sort': 'size' is not one of cpr, cmd,
    auroc, time.``)."""

    def check(value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        if value.strip().lower() not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}.")
        return value.strip().lower()

    return check


def _above_zero(value: Optional[float]) -> Optional[float]:
    """An option callback refusing 0 (typer's ``min=0`` admits it) as a usage error; the
    option's help then shows its range open at 0 (``0<x<=1``, ``x>0``; :class:`_Command`).
    ``None`` (an optional option left out) passes."""
    if value is not None and value <= 0:
        raise typer.BadParameter(f"give a number above 0; got {value}.")
    return value


def _open_below(help_text: str, low: Any) -> str:
    """``help_text`` with typer's closed lower bound ``low`` written open: ``0<=x<=1`` becomes
    ``0<x<=1`` and ``x>=0`` becomes ``x>0``."""
    if low is None:
        return help_text
    return re.sub(rf"(?<![\d.]){re.escape(str(low))}<=x(?=<=)", f"{low}<x",
                  re.sub(rf"x>={re.escape(str(low))}(?![\d.])", f"x>{low}", help_text))


def _choices(allowed: tuple[str, ...]) -> str:
    """The metavar of an option with fixed choices: ``[receiver|sign]``."""
    return "[" + "|".join(allowed) + "]"


def _switch_progress_off(ctx: typer.Context, no_progress: bool) -> bool:
    """``--no-progress``: no bars or phase lines (the model's loading bars included) until the
    command ends."""
    if no_progress:
        ctx.with_resource(quiet())
    return no_progress


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="circuitfind: automated circuit discovery for transformer language models.")

CHECKPOINT_DIR = ".checkpoint"
NO_PROGRESS_OPTION = typer.Option(
    False, "--no-progress", callback=_switch_progress_off,
    help="No progress bars or phase lines (bars are drawn only when stderr is a terminal and "
         "TQDM_DISABLE is unset; in a log each phase is one line).")
MEMORY_OPTION = typer.Option(
    None, "--memory",
    show_default="the model's weights plus 2GiB",
    help="Memory budget of the run on its device, the model's weights and caches included, "
         "e.g. 24GiB: examples, masks and gradient runs are chunked to fit (see `circuitfind "
         "plan`); results do not depend on it.")
DEVICE_OPTION = typer.Option(None, "--device", show_default="cuda when available, else cpu",
                             help="cpu, cuda, cuda:1 ...")
PARAM_DEFAULT = "the algorithm's own"
DTYPE_CHOICES = tuple(DTYPES)


def _dtype_option(default: str = "float32") -> Any:
    """``--dtype``: the dtype the model loads in, one of :data:`DTYPE_CHOICES` (a usage error
    lists them)."""
    return typer.Option(
        None, "--dtype", metavar=_choices(DTYPE_CHOICES), callback=_one_of(DTYPE_CHOICES),
        show_default=default,
        help="The dtype the model loads in: float32, float16, bfloat16 or float64 (activations, "
             "caches and gradients follow it; metrics and scores are accumulated wider).")


RENDERER_OPTION = typer.Option(
    None, "--renderer",
    help="graphviz or matplotlib (default: graphviz when its `dot` binary is on the PATH, "
         "else matplotlib).")


def _default_model(task: str) -> str:
    """The zoo organism of ``task`` (for offline runs without --model)."""
    from circuitfind.models import zoo_source
    from circuitfind.zoo import default_organism

    name = default_organism(task)
    if name is None:
        raise ConfigError(f"The task {task!r} has no built-in model organism; pass --model "
                          "(a Hugging Face hub name or a local model directory).")
    return zoo_source(name)


@app.command(cls=_Command)
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
    edges: Optional[int] = typer.Option(None, "--edges", "-n", min=0, show_default="100, unless "
                                        "--threshold is given", help="Keep the top N edges."),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", show_default="none: --edges decides",
        help="Keep edges with |score| >= X; for acdc its threshold τ (e.g. 0.01 nats of KL), for "
             "path-patching its selection threshold."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    n_examples: Optional[int] = typer.Option(
        None, "--examples", min=1, help="Clean/corrupted pairs to build (default: 64; every row "
                                        "of a prompt file)."),
    seed: int = typer.Option(0, "--seed", help="Data seed."),
    metric: Optional[str] = typer.Option(
        None, "--metric", help="Prompt files: logit_diff (default), prob_diff, log_prob or kl."),
    first_token: bool = typer.Option(
        False, "--first-token", help="Prompt files: score multi-token answers by their first "
                                     "token."),
    signed: bool = typer.Option(False, "--signed", help="Rank by signed score, not |score|."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Keep dangling edges."),
    device: Optional[str] = DEVICE_OPTION,
    ablation: str = typer.Option(
        DEFAULT_ABLATION, "--ablation",
        help="What a removed edge carries: resample (the task's corrupted run), zero, mean or "
             "mean-positional (means over the corrupted examples)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    param: Optional[list[str]] = typer.Option(
        None, "--param", "-p", metavar="KEY=VALUE", show_default=PARAM_DEFAULT,
        help="Algorithm hyperparameter KEY=VALUE (repeatable), e.g. -p steps=10 "
             "-p interpolation=activations (eap-ig), -p mode=batched -p objective=metric (acdc). "
             "Values are read as JSON where they parse, else as strings."),
    renderer: Optional[str] = RENDERER_OPTION,
    no_view: bool = typer.Option(
        False, "--no-view",
        help="Do not write view.html (the interactive viewer) nor measure the faithfulness "
             "curve its size slider shows (one more batched pass)."),
    memory: Optional[str] = MEMORY_OPTION,
    dtype: Optional[str] = _dtype_option(),
    no_progress: bool = NO_PROGRESS_OPTION,
) -> None:
    """Discover a circuit; write circuit.json, circuit.graphml, report.md, then circuit.svg
    and view.html."""
    from circuitfind.api import discover as run_discover
    from circuitfind.graphs.render import resolve_renderer
    from circuitfind.outputs import check_output_dir, write_run

    from circuitfind.patching.spec import Ablation, parse_memory
    from circuitfind.tasks import get_task

    if edges is not None and threshold is not None:
        raise ConfigError("pass either --edges or --threshold, not both.")
    spec = Ablation.parse(ablation)
    parse_memory(memory)  # a malformed size fails before loading
    budget = memory
    params = parse_params(param or [])
    checkpointed = ALGORITHMS.get(algorithm).supports_checkpoint  # an unknown name fails here
    check_output_dir(out, overwrite)  # bad output paths and renderers fail before any work
    resolve_renderer(renderer, announce=False)  # the fallback note comes when it draws
    task_obj = get_task(task, metric=metric, first_token=first_token)  # fail fast, before loading
    model_name = model or _default_model(task_obj.name if task_obj.source is None else task)
    typer.echo(f"discovering: model={model_name} task={task} algorithm={algorithm} "
               f"ablation={spec.kind}" + (f" dtype={dtype}" if dtype else ""), err=True)
    context = None
    if checkpointed:
        # long runs checkpoint inside --out; rerunning the same command resumes
        checkpoint = out / CHECKPOINT_DIR / f"{normalize_name(algorithm)}.pt"
        context = RunContext(checkpoint=checkpoint, progress=not no_progress)
        if checkpoint.exists():
            typer.echo(f"resuming from {checkpoint}", err=True)
    try:
        circuit = run_discover(model_name, task_obj, algorithm=algorithm, n_edges=edges,
                               threshold=threshold, n_examples=n_examples, seed=seed,
                               absolute=not signed, prune=not no_prune, device=device,
                               algorithm_params=params, context=context, ablation=spec,
                               memory_budget=budget, curve=not no_view, dtype=dtype)
    except KeyboardInterrupt:
        if context is not None and context.path is not None and context.path.exists():
            typer.secho(f"interrupted; progress saved in {context.path}: rerun the same "
                        "command to resume", err=True)
        raise
    files = write_run(circuit, out, overwrite=overwrite, renderer=renderer, view=not no_view)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # the run is complete
    faith = circuit.metadata["faithfulness"]
    typer.echo(f"{circuit.n_edges} edges; normalized faithfulness {faith['faithfulness']:.4f} "
               f"(m(C)={faith['metric_circuit']:.4f}, m(M)={faith['metric_full']:.4f}, "
               f"m(∅)={faith['metric_empty']:.4f} {faith['metric_unit']}); "
               f"KL {faith['kl_div']:.4f} nats")
    typer.echo(f"wrote {', '.join(str(path) for path in files.written)}")


def parse_params(items: list[str]) -> dict[str, object]:
    """``["steps=10", "interpolation=inputs"]`` -> ``{"steps": 10, "interpolation": "inputs"}``.

    Values are read as JSON where they parse (numbers, true/false, null), else as strings.

    Raises:
        ConfigError: an item without ``=``.
    """
    params: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param expects KEY=VALUE (e.g. -p mode=batched); got {item!r}.")
        try:
            params[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip().replace("-", "_")] = value
    return params


@app.command(cls=_Command)
def evaluate(
    circuit_path: Path = typer.Argument(..., metavar="CIRCUIT",
                                        help="circuit.json or circuit.graphml."),
    task: Optional[str] = typer.Option(None, "--task", "-t",
                                       help="Task name or prompt file (default: the circuit's "
                                            "own task)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model (default: the circuit's own model)."),
    n_examples: Optional[int] = typer.Option(
        None, "--examples", min=1, help="Clean/corrupted pairs to build (default: 64; every row "
                                        "of a prompt file)."),
    seed: int = typer.Option(1, "--seed", help="Data seed (default 1: fresh prompts; a prompt "
                                               "file's rows are used in file order)."),
    device: Optional[str] = DEVICE_OPTION,
    ablation: Optional[str] = typer.Option(
        None, "--ablation",
        help="resample, zero, mean or mean-positional (default: the ablation the circuit was "
             "found with)."),
    memory: Optional[str] = MEMORY_OPTION,
    dtype: Optional[str] = _dtype_option("the circuit's own, else float32"),
    no_progress: bool = NO_PROGRESS_OPTION,
) -> None:
    """Evaluate a saved circuit: normalized faithfulness and KL divergence on fresh data."""
    from circuitfind.api import build_data
    from circuitfind.evaluation.faithfulness import evaluate as run_evaluate
    from circuitfind.graphs.circuit import Circuit
    from circuitfind.models import load_model
    from circuitfind.patching.spec import Ablation, parse_memory
    from circuitfind.tasks import get_task

    parse_memory(memory)  # a malformed size fails before loading
    budget = memory
    circuit = Circuit.load(circuit_path)
    spec = Ablation.parse(ablation or ablation_kind(circuit.metadata))
    md = circuit.metadata
    task_obj: Task | None
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
    loaded = load_model(model, device=device, dtype=dtype or md.get("dtype"))
    data = build_data(loaded, task_obj, n=n_examples, seed=seed)
    report = run_evaluate(loaded, circuit, data, ablation=spec, memory_budget=budget)
    typer.echo(f"{circuit.n_edges} edges on {task_obj.name} ({data.n} examples, seed {seed}, "
               f"{spec.kind} ablation): "
               f"normalized faithfulness {report.faithfulness:.4f}; m(C)={report.metric_circuit:.4f}, "
               f"m(M)={report.metric_full:.4f}, m(∅)={report.metric_empty:.4f} "
               f"{report.metric_unit}; KL {report.kl_div:.4f} nats")


@app.command(cls=_Command)
def tune(
    task: str = typer.Option(..., "--task", "-t", help="Task name (see `circuitfind tasks`)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model (default: the task's zoo organism)."),
    algorithm: str = typer.Option("acdc", "--algorithm", "-a", help="A pruning algorithm."),
    target: float = typer.Option(0.9, "--target", min=0, max=1, callback=_above_zero,
                                 help="Normalized faithfulness to reach."),
    trials: int = typer.Option(20, "--trials", min=0,
                               help="Trials this worker runs (0: create only)."),
    low: Optional[float] = typer.Option(
        None, "--low", min=0, callback=_above_zero, show_default="from the single-edge effects",
        help="Smallest threshold tried (log scale); give --high too."),
    high: Optional[float] = typer.Option(
        None, "--high", min=0, callback=_above_zero,
        show_default="from the single-edge effects", help="Largest threshold tried."),
    storage: str = typer.Option("sqlite:///tune.db", "--storage",
                                help="Optuna storage URL shared by all workers."),
    study: str = typer.Option("circuitfind-tune", "--study", help="Study name."),
    n_examples: int = typer.Option(64, "--examples", min=1,
                                   help="Clean/corrupted pairs to build."),
    seed: int = typer.Option(0, "--seed", help="Data seed."),
    sampler_seed: Optional[int] = typer.Option(None, "--sampler-seed", show_default="--seed",
                                               help="This worker's sampler seed."),
    device: Optional[str] = DEVICE_OPTION,
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", metavar="KEY=VALUE",
                                              show_default=PARAM_DEFAULT,
                                              help="Other hyperparameters KEY=VALUE."),
    dtype: Optional[str] = _dtype_option(),
    no_progress: bool = NO_PROGRESS_OPTION,
) -> None:
    """Search a pruning algorithm's threshold for the smallest circuit reaching a faithfulness
    target, as an Optuna study (run the same command on several machines to share it)."""
    from circuitfind.benchmark.tune import tune as run_tune

    if (low is None) != (high is None):
        given = f"--low {low}" if high is None else f"--high {high}"
        raise ConfigError("Give both --low and --high, or neither (then the threshold range "
                          f"comes from the single-edge effects); got only {given}.")
    if low is not None and high is not None and not 0 < low < high:
        raise ConfigError(f"--low must be above 0 and below --high; got --low {low}, "
                          f"--high {high}.")
    params = parse_params(param or [])
    if "threshold" in params:
        raise ConfigError("tune searches the threshold itself; leave out -p threshold=...")
    result = run_tune(model or _default_model(task), task, algorithm=algorithm, target=target,
                      n_trials=trials, low=low, high=high, storage=storage, study_name=study,
                      n_examples=n_examples, seed=seed, algorithm_params=params,
                      device=device, sampler_seed=sampler_seed, dtype=dtype)
    typer.echo(f"{result.n_trials} trials in study {study!r}; {result.explanation}")


@app.command(cls=_Command)
def bench(
    config: Path = typer.Argument(..., metavar="CONFIG",
                                  help="Grid config (TOML; see benchmarks/configs/)."),
    storage: str = typer.Option("sqlite:///bench.db", "--storage",
                                help="Optuna storage URL shared by all workers (SQLite, or "
                                     "PostgreSQL/MySQL across machines)."),
    study: Optional[str] = typer.Option(None, "--study",
                                        help="Study name (default: the config's `study`, else "
                                             "its file name)."),
    device: Optional[str] = DEVICE_OPTION,
    threads: Optional[int] = typer.Option(None, "--threads", min=1, show_default="torch's default",
                                          help="torch CPU threads of this worker."),
    heartbeat: Optional[int] = typer.Option(
        None, "--heartbeat", min=1, show_default="1",
        help="Seconds between heartbeats of a running cell."),
    grace_period: Optional[int] = typer.Option(
        None, "--grace-period", min=1, show_default="twice the median cell time, 5 to 60 s",
        help="Seconds without a heartbeat after which a cell's worker counts as dead and the "
             "cell is run again."),
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="Run again the cells whose last run raised."),
    create_only: bool = typer.Option(
        False, "--create-only",
        help="Create the study and queue its cells, run nothing (once, before starting "
             "workers on a fresh SQLite file)."),
    rerun: Optional[list[str]] = typer.Option(
        None, "--rerun", metavar="PATTERN", show_default="none: finished cells are kept",
        help="Run again the finished cells whose key matches this glob (repeatable; keys look "
             "like 'model=zoo:ioi-small task=ioi algorithm=eap seed=0 examples=default "
             "ablation=resample'; '*' matches any text) and whose result is older than "
             "--rerun-before; the new records replace the old on the leaderboard."),
    rerun_before: Optional[str] = typer.Option(
        None, "--rerun-before", metavar="TIME", show_default="none; required with --rerun",
        help="With --rerun: ISO 8601 time (local unless it has an offset) before which the "
             "results to replace were made, e.g. a fix's commit time (git show -s "
             "--format=%cI COMMIT). Cells finished later are kept, so the same command "
             "restarted runs no cell twice."),
    no_progress: bool = NO_PROGRESS_OPTION,
    out: Optional[Path] = typer.Option(
        None, "--out", show_default="none: no leaderboard",
        help="When the grid is complete, also write the study's leaderboard (tables and "
             "figures, as `circuitfind leaderboard`) to this directory."),
) -> None:
    """Run a benchmark grid (models x tasks x algorithms x seeds); start the same command as
    often as you like, on one storage, to share the cells. Exit code 1 if any cell failed.
    With --out, the worker that sees the grid complete writes its leaderboard: one command from
    a config to tables and figures."""
    import optuna
    import torch

    from circuitfind.benchmark.grid import bench as run_bench

    if threads is not None:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = run_bench(config, storage=storage, study_name=study, device=device,
                       progress=not no_progress, heartbeat_interval=heartbeat,
                       grace_period=grace_period, retry_failed=retry_failed,
                       create_only=create_only, rerun=tuple(rerun or ()),
                       rerun_before=rerun_before)
    for s in result.skipped:
        typer.echo(f"skipped: {s['task']} on {s['model']} (seeds "
                   f"{', '.join(map(str, s['seeds']))}): {s['reason']}", err=True)
    typer.echo(f"study {result.study_name!r} in {result.storage}: {result.completed} of "
               f"{result.n_cells} cells done ({result.executed} by this worker), "
               f"{len(result.failed)} failed, {result.pending} queued, "
               f"{len(result.skipped)} task/model pairs skipped; {result.wall_time_s:.1f} s")
    for f in result.failed:
        typer.secho(f"failed: {f['cell']}: {f['error']}", err=True, fg=typer.colors.RED)
    if out is not None and not create_only:
        if result.pending:
            typer.echo(f"leaderboard not written: {result.pending} cells are still queued or "
                       "running on other workers; run `circuitfind leaderboard` when they end.",
                       err=True)
        elif result.completed:
            from circuitfind.benchmark.leaderboard import leaderboard as write_leaderboard

            files = write_leaderboard(result.storage, out, studies=[result.study_name])
            typer.echo(f"leaderboard written to {out} ({len(files.written)} files)")
    if not result.ok:
        raise typer.Exit(1)


@app.command(cls=_Command)
def leaderboard(
    storage: str = typer.Option(..., "--storage", help="Optuna storage URL of the bench runs."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    study: Optional[list[str]] = typer.Option(
        None, "--study", metavar="NAME", help="Study to include (repeatable; default: every bench study)."),
    sort: str = typer.Option("cpr", "--sort", metavar=_choices(tuple(SORT_KEYS)),
                             callback=_one_of(tuple(SORT_KEYS)),
                             help="Order of rows within a task/model: cpr, cmd, auroc or time."),
) -> None:
    """Leaderboard tables (Markdown, CSV, JSON) and faithfulness-curve figures (PNG, PDF)."""
    from circuitfind.benchmark.leaderboard import leaderboard as run_leaderboard

    files = run_leaderboard(storage, out, studies=study or None, sort=sort)
    typer.echo(f"{len(files.rows)} rows; wrote {', '.join(str(p) for p in files.written)}")


@app.command(cls=_Command)
def render(
    circuit_path: Path = typer.Argument(..., metavar="CIRCUIT",
                                        help="circuit.json or circuit.graphml."),
    out: Path = typer.Argument(..., metavar="OUT", help="Output file: .svg, .pdf, .png or .dot."),
    renderer: Optional[str] = RENDERER_OPTION,
    edge_colour: str = typer.Option(
        "receiver", "--edge-colour", "--edge-color", metavar=_choices(EDGE_COLOUR_MODES),
        callback=_one_of(EDGE_COLOUR_MODES),
        help="Colour edges by 'receiver' kind (q/k/v/MLP/logits) or by score 'sign' (helps or "
             "hurts the metric)."),
    collapse_qkv: bool = typer.Option(False, "--collapse-qkv",
                                      help="One edge per sender and head instead of per q/k/v."),
    min_score: Optional[float] = typer.Option(None, "--min-score", min=0,
                                              show_default="every edge drawn",
                                              help="Hide edges with |score| below X."),
    top: Optional[int] = typer.Option(None, "--top", min=0, show_default="every edge",
                                      help="Draw only the top N edges by |score|."),
    head_labels: str = typer.Option("name", "--head-labels", metavar=_choices(HEAD_LABELS),
                                    callback=_one_of(HEAD_LABELS),
                                    help="'name' (a3.h7) or 'layer.head' (3.7)."),
    landscape: bool = typer.Option(False, "--landscape", help="Layers left to right."),
    no_title: bool = typer.Option(False, "--no-title", help="Leave out the title line."),
    fixed_order: bool = typer.Option(
        False, "--fixed-order",
        help="Every head keeps its slot and every layer its row (figures of one model line up)."),
) -> None:
    """Draw a saved circuit (Graphviz when `dot` is installed, else matplotlib)."""
    from circuitfind.graphs.circuit import Circuit
    from circuitfind.graphs.render import RenderOptions, format_of, resolve_renderer
    from circuitfind.outputs import check_output_file

    options = RenderOptions(edge_colour=edge_colour, collapse_qkv=collapse_qkv,
                            min_abs_score=min_score, top_n=top, head_labels=head_labels,
                            orientation="landscape" if landscape else "portrait",
                            title=not no_title, fixed_order=fixed_order)
    fmt = format_of(out, None)
    check_output_file(out)
    if fmt != "dot":
        resolve_renderer(renderer, announce=False)  # fail before loading; the note on drawing
    path = Circuit.load(circuit_path).render(out, renderer=renderer, options=options)
    typer.echo(f"wrote {path}")


@app.command(cls=_Command)
def view(
    circuit_path: Path = typer.Argument(
        ..., metavar="RUN_OR_CIRCUIT",
        help="A run directory (its circuit.json), circuit.json, circuit.graphml or MIB JSON."),
    other: Optional[Path] = typer.Argument(
        None, metavar="OTHER",
        help="A second circuit of the same model: draw both, coloured shared / only in one."),
    out: Path = typer.Option(Path("view.html"), "--out", "-o", help="The HTML file to write."),
    max_edges: Optional[int] = typer.Option(
        None, "--max-edges", min=0, show_default="every scored edge",
        help="The most edges the size slider reaches (never fewer than the circuit's)."),
) -> None:
    """Write an interactive viewer: one HTML file that works offline in any browser."""
    from circuitfind.outputs import check_output_file
    from circuitfind.view import view as write_view

    check_output_file(out)
    path = write_view(circuit_path, out, other=other, max_edges=max_edges)
    typer.echo(f"wrote {path} (open it in a browser)")


EXPORT_FORMATS = ("mib",)


@app.command(cls=_Command)
def export(
    circuit_path: Path = typer.Argument(..., metavar="CIRCUIT",
                                        help="circuit.json or circuit.graphml of a run."),
    format: str = typer.Option(..., "--format", "-f", metavar=_choices(EXPORT_FORMATS),
                               callback=_one_of(EXPORT_FORMATS),
                               help="Export format: mib (MIB circuit-track JSON)."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o",
        help="Submission directory (one folder {task}_{model} per cell is written inside it), "
             "or a .json file. Default: mib/ beside the circuit file."),
    d_model: Optional[int] = typer.Option(
        None, "--d-model", min=1,
        help="The model's hidden size (default: read from the model's config)."),
    task_name: Optional[str] = typer.Option(None, "--task-name",
                                            help="Task part of the folder name (default: the "
                                                 "circuit's task)."),
    model_name: Optional[str] = typer.Option(None, "--model-name",
                                             help="Model part of the folder name (default: the "
                                                  "circuit's model)."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="Replace an existing export of this task and model."),
) -> None:
    """Export a saved circuit (kept edges and all edge scores) for the MIB circuit track."""
    from circuitfind.graphs.circuit import Circuit
    from circuitfind.api import export_mib

    circuit = Circuit.load(circuit_path)
    target = out if out is not None else circuit_path.parent / "mib"
    path = export_mib(circuit, target, d_model=d_model, task=task_name, model=model_name,
                      overwrite=overwrite)
    typer.echo(f"wrote {path} ({circuit.n_edges} kept edges; all edge scores)")


@app.command(cls=_Command)
def check(
    task: str = typer.Option(..., "--task", "-t",
                             help="Task name (see `circuitfind tasks`) or a prompt file."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model (default: the task's zoo organism)."),
    n_examples: Optional[int] = typer.Option(
        None, "--examples", min=1, help="Clean/corrupted pairs to build (default: 64; every row "
                                        "of a prompt file)."),
    seed: int = typer.Option(0, "--seed", help="Data seed."),
    metric: Optional[str] = typer.Option(
        None, "--metric", help="Prompt files: logit_diff (default), prob_diff, log_prob or kl."),
    per_example: bool = typer.Option(False, "--per-example", help="One row per example."),
    device: Optional[str] = DEVICE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    dtype: Optional[str] = _dtype_option(),
    no_progress: bool = NO_PROGRESS_OPTION,
) -> None:
    """Check that the model does the task: accuracy and the metric, clean vs corrupted."""
    from circuitfind.api import check as run_check
    from circuitfind.tasks import get_task

    task_obj = get_task(task, metric=metric)
    model_name = model or _default_model(task_obj.name if task_obj.source is None else task)
    result = run_check(model_name, task_obj, n_examples=n_examples, seed=seed,
                       per_example=per_example, device=device, dtype=dtype)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1))
        return
    from circuitfind.graphs.render import model_display_name

    typer.echo(f"{result.task} on {model_display_name(result.model)}, {result.n_examples} "
               f"examples: {result.verdict}")
    for label, values in (("clean", result.clean), ("corrupted", result.corrupted)):
        typer.echo(f"  {label:9s} mean {values['mean']:.4g}  std {values['std']:.3g}  "
                   f"min {values['min']:.4g}  max {values['max']:.4g} {result.metric_unit}")
    typer.echo(f"  accuracy  {100 * result.accuracy:.1f}% on clean prompts: "
               f"{result.accuracy_description}")
    for row in result.examples:
        answer = "/".join(map(str, row["answer"]))
        wrong = "/".join(map(str, row["wrong"])) or "-"
        typer.echo(f"  #{row['example']:<3d} {'ok ' if row['correct'] else 'BAD'} "
                   f"clean {row['clean']:8.3f}  corrupted {row['corrupted']:8.3f}  "
                   f"{answer!r} vs {wrong!r}  {row['prompt']!r}")


@app.command(cls=_Command)
def compare(
    first: Path = typer.Argument(..., metavar="A", help="circuit.json, circuit.graphml or MIB "
                                                        "JSON."),
    second: Path = typer.Argument(..., metavar="B", help="The circuit to compare with."),
    k: str = typer.Option("10,50,100", "--k", help="Top-k sizes, comma-separated."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Compare two circuits: edge and node Jaccard, top-k overlap, Spearman on shared edges."""
    from circuitfind.evaluation.compare import compare as run_compare
    from circuitfind.evaluation.compare import load_any

    try:
        ks = [int(part) for part in k.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--k takes comma-separated integers such as 10,50,100; got {k!r}.",
                          cli=f"--k takes comma-separated integers such as 10,50,100; got {k!r}."
                          ) from None
    result = run_compare(load_any(first), load_any(second), ks=ks)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1))
        return
    typer.echo(f"A = {first}\nB = {second}")
    for line in result.lines():
        typer.echo(line)


@app.command(cls=_Command)
def tasks() -> None:
    """List the registered tasks."""
    from circuitfind.tasks import TASKS

    for name, cls in TASKS.items():
        typer.echo(f"{name:<18} {cls.description}  [{cls.metric_name}, {cls.metric_unit}]")


@app.command(cls=_Command)
def plan(
    model: str = typer.Option(..., "--model", "-m",
                              help="Hub name (its config in the local cache), local Hugging Face "
                                   "directory (config.json is enough) or zoo:NAME."),
    task: Optional[str] = typer.Option(
        None, "--task", "-t", show_default="none: --seq-len gives the length",
        help="Task name or prompt file (its data, built with the model's tokenizer, give the "
             "prompts' length)."),
    algorithm: str = typer.Option("eap", "--algorithm", "-a",
                                  help="Algorithm (see `circuitfind algorithms`)."),
    n_examples: Optional[int] = typer.Option(
        None, "--examples", min=1, show_default="the task's default, 64",
        help="Clean/corrupted pairs."),
    seq_len: Optional[int] = typer.Option(
        None, "--seq-len", min=1, show_default="from the task's data",
        help="Tokens per prompt (needed when the model has no tokenizer at hand)."),
    device: str = typer.Option("cpu", "--device", help="Where it would run: cpu, cuda ..."),
    memory: Optional[str] = typer.Option(
        None, "--memory", show_default="the weights plus 2GiB",
        help="Memory budget of the run, weights included, e.g. 80GiB."),
    dtype: Optional[str] = _dtype_option(),
    seed: int = typer.Option(0, "--seed", help="Data seed."),
    param: Optional[list[str]] = typer.Option(
        None, "--param", "-p", metavar="KEY=VALUE", show_default=PARAM_DEFAULT,
        help="Algorithm hyperparameter KEY=VALUE (repeatable), e.g. -p steps=10."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Plan a run from the model's config alone (no weights): peak memory by part, the chunks
    that fit --memory, time in plain forwards, and whether it fits (exit code 1 if not)."""
    from circuitfind.api import plan as make_plan
    from circuitfind.patching.spec import parse_memory

    parse_memory(memory)  # malformed values fail before anything is read
    ALGORITHMS.get(algorithm)
    result = make_plan(model, task, algorithm, examples=n_examples, device=device,
                       memory=memory, dtype=dtype, seq_len=seq_len, seed=seed,
                       algorithm_params=parse_params(param or []))
    typer.echo(json.dumps(result.to_dict(), indent=1) if as_json else result.summary())
    if not result.fits:
        raise typer.Exit(1)


@app.command(cls=_Command)
def algorithms() -> None:
    """List the registered algorithms."""
    from circuitfind.algorithms import ALGORITHMS

    for name, cls in ALGORITHMS.items():
        typer.echo(f"{name:<18} {cls.description}")


class _StderrNotes(logging.Handler):
    """Prints the ``circuitfind`` logger's notes as one line on the current ``sys.stderr``
    (progress lines of ``circuitfind.progress`` as they are, other notes after ``note:``)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "circuitfind.progress":
            typer.echo(record.getMessage(), err=True)
        else:
            typer.secho(f"note: {record.getMessage()}", err=True, fg=typer.colors.YELLOW)


def _usage_errors() -> tuple[type[Any], ...]:
    """The click exception classes the app may raise: typer's vendored click (typer >= 0.24)
    and the click package (older typer); both have ``show()`` and ``exit_code``."""
    classes: list[type[Any]] = []
    try:
        from typer._click.exceptions import ClickException as Vendored
        classes.append(Vendored)
    except ImportError:  # pragma: no cover - older typer uses click itself
        pass
    try:
        import click
        classes.append(click.ClickException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(classes)


def main() -> None:
    """Console entry point: run the app, turning circuitfind errors into one-line messages and
    usage errors (an unknown command or option, a missing or malformed value) into click's
    short usage message, exit code 2, never a traceback."""
    logger = logging.getLogger("circuitfind")
    if not any(isinstance(h, _StderrNotes) for h in logger.handlers):
        logger.addHandler(_StderrNotes(logging.INFO))
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)  # notes and progress lines
    usage = _usage_errors()
    try:
        code = app(standalone_mode=False)
    except CircuitFindError as err:
        typer.secho(f"error: {err.cli_message}", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except usage as err:
        err.show()
        sys.exit(getattr(err, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
