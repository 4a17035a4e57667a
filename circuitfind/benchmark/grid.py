"""Benchmark grids: models × tasks × algorithms (× hyperparameters, seeds) as an Optuna study.

A grid is described by a TOML file (``benchmarks/configs/*.toml``); at its simplest::

    models = ["../shared/models/stories260k", "zoo:ioi-small"]
    tasks = ["gendered_pronoun"]
    algorithms = ["eap", "eap_ig", "exact"]
    seeds = [0, 1]

Schema (every key but ``models``, ``tasks`` and ``algorithms`` is optional):

- ``models``: model arguments as :func:`circuitfind.load_model` takes them (``zoo:NAME``, a
  local Hugging Face directory, relative paths being relative to the working directory, or a
  hub name). ``tasks``: registered task names (dashes accepted) or prompt files.
- ``algorithms``: a list of names (default hyperparameters), or a table with one sub-table per
  algorithm whose keys are hyperparameters; a list value is a grid axis, anything else a fixed
  value (write ``[[1, 2]]`` for a list-valued fixed value)::

      [algorithms.eap]
      [algorithms.eap_ig]
      steps = [5, 10]                 # two variants: eap_ig(steps=5), eap_ig(steps=10)
      [algorithms.acdc]
      threshold = 0.01

- ``seeds``: data seeds (default ``[0]``); the seed also seeds torch before the algorithm runs.
- ``examples``: clean/corrupted pairs per cell (default: the task's ``default_n``, 64).
- ``ablation``: ``resample`` (default), ``zero``, ``mean``, ``mean_positional``.
- ``dtype``: the dtype the models load in: ``float32`` (default), ``float16``, ``bfloat16``
  or ``float64`` (:func:`circuitfind.models.parse_dtype`). A cell in another dtype than
  float32 is another row of the leaderboard: its label ends with it (``eap_ig @bfloat16``).
- ``convention`` (``"mib"``, default, or ``"single"``) and ``fractions`` (default MIB's ten
  sizes): the faithfulness curve of every cell (:func:`circuitfind.faithfulness_curve`).
- ``study``: the Optuna study's name (default: the file's stem).
- ``memory``: each cell's engine's memory budget for one pass, e.g. ``"4GiB"`` (default
  2 GiB); chunking follows it, results do not.
- ``[[grid]]``: sub-grids. Each is a table with any of ``models``, ``tasks``,
  ``algorithms``, ``seeds``, ``examples``, ``ablation``, ``dtype``, falling back to the top-level value;
  the grid is the union of their products. Use it to pair each model with its own tasks.

Cells whose task does not fit a model's tokenizer (:class:`~circuitfind.errors.TaskDataError`
when the task's data are built) are skipped and listed, not failed. Every other problem (an
unknown key, model, task, algorithm or hyperparameter, a bad value) is found before any work
starts and reported all at once in one :class:`~circuitfind.errors.ConfigError`.

Each cell runs: load the model (kept loaded for consecutive cells of the same model) → build
the task data (``examples``, ``seed``) → ``torch.manual_seed(seed)`` → the algorithm's edge
scores (a pruning algorithm's circuit and its measured per-edge effects) → the faithfulness
curve, CPR and CMD → edge and node ROC AUC against the task's reference circuit where one
exists (:func:`circuitfind.api.find_reference`). Its record (the trial's ``record`` user
attribute, see :func:`run_cell`; the trial's value is the CPR, ``-inf`` where it is NaN) holds
those numbers, edge and node counts, wall time, peak memory, the seed,
the versions of circuitfind / torch / transformer-lens and every hyperparameter.

Distribution and resumption (circuitfind's own claim logic on Optuna's storage). The study's
trials are the cells: each cell is enqueued once as a ``WAITING`` trial carrying its key in
the ``cell`` user attribute, and workers claim queued trials by moving them to ``RUNNING``
(atomic under a row lock on PostgreSQL/MySQL; under :func:`~circuitfind.benchmark.storage.
claim_lock` on SQLite). Optuna's ``GridSampler`` is not used to hand out cells: it draws grid
points at random and, as its documentation says, can give one point to two workers. Rules:

- a cell with a ``COMPLETE`` trial is finished and never run again;
- a claimed cell's worker records an Optuna heartbeat every ``heartbeat_interval`` seconds;
  ``optuna.storages.fail_stale_trials`` moves a ``RUNNING`` trial whose heartbeat is older
  than ``grace_period`` to ``FAIL`` (its worker died), and the cell is enqueued again, at
  most ``max_retries`` times. By default both scale with the grid (:func:`auto_grace`): a
  heartbeat a second, and a grace period of twice the completed cells' median wall time,
  between 5 s and 60 s and never under five heartbeats of any running cell's worker (each
  records its interval as it claims the cell; one recorded by none, from an earlier version,
  counts as 10 s), so a grid of small cells takes a killed worker's cell over within
  seconds while a live worker would have to miss five heartbeats in a row to lose its cell;
- a cell that raises is ``FAIL`` with ``error`` and ``traceback`` user attributes; it is
  reported, and not rerun unless the next run passes ``retry_failed``;
- a finished cell is run again only on request (``rerun`` patterns with ``rerun_before``,
  e.g. after a bug fix): a cell matching a pattern whose latest result completed before
  ``rerun_before`` is queued again with a ``rerun_of`` user attribute naming the trial it
  replaces. From then on the cell's state is that of the trials after the replaced one (so
  the queued rerun is not taken for a duplicate of the finished trial), and its record on
  the leaderboard is its latest completed trial; the replaced trial stays in the study. The
  time makes the request idempotent: the same command started again, or by several
  workers at once, queues no cell twice, as a rerun completes after ``rerun_before``;
- a cell interrupted by Ctrl-C is ``FAIL`` with an ``interrupted`` user attribute and is
  queued again by the next run (not counted as a death);
- should a cell be enqueued twice (two workers creating the grid at once on PostgreSQL), the
  claim of the later trial yields (``PRUNED``, user attribute ``duplicate``) to an earlier
  queued or running one, or to a completed one;
- a worker with nothing left to claim waits while other workers' cells run (taking them over
  if those workers die), and returns when every cell is finished or has failed.

So any number of workers may run ``circuitfind bench CONFIG --storage URL`` at once, and a
killed run started again finishes the grid with no cell done twice. The grid is enqueued by
every worker that finds cells missing; create it once (``--create-only``) before starting
workers on a fresh SQLite file, where concurrent table creation races in Optuna.

References:
    Mueller et al. (2025), "MIB: A Mechanistic Interpretability Benchmark" (CPR, CMD);
    Conmy et al. (2023) (ROC AUC against a reference circuit); Akiba et al. (2019), Optuna.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import fnmatch
import gc
import itertools
import json
import math
import os
import socket
import sys
import statistics
import threading
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from circuitfind.algorithms.base import ALGORITHMS, get_algorithm
from circuitfind.api import build_data, find_reference, versions
from circuitfind.benchmark.storage import claim_lock, open_storage, optuna_module
from circuitfind.errors import CircuitFindError, ConfigError, TaskDataError
from circuitfind.evaluation.faithfulness import (CONVENTIONS, DEFAULT_FRACTIONS,
                                                 faithfulness_curve, normalized_faithfulness)
from circuitfind.evaluation.roc import edge_roc, node_roc
from circuitfind.models import dtype_name, load_model, model_tokenizer, resolve_model_source
from circuitfind._progress import LOGGER as progress_log
from circuitfind._progress import PhaseLog, progress
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.spec import (
    DEFAULT_ABLATION,
    Ablation,
    parse_memory,
)
from circuitfind.tasks.lookup import get_task

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_STORAGE = "sqlite:///bench.db"
STUDY_MARKER = "circuitfind_bench"
"""Study user attribute that marks a study as a benchmark grid (holds the config)."""

CELL_KEYS = ("models", "tasks", "algorithms", "seeds", "examples", "ablation", "dtype")
DEFAULT_DTYPE = "float32"
TOP_KEYS = (*CELL_KEYS, "convention", "fractions", "study", "grid", "memory")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid.

    Attributes:
        model: The model argument as the config writes it (``zoo:ioi-small``, a path).
        task: The task name (registry key) or prompt file.
        algorithm: The algorithm's registry key.
        params: The hyperparameters the config sets (the rest keep their defaults).
        seed: Data seed (also seeds torch before the algorithm runs).
        examples: Clean/corrupted pairs (``None``: the task's default).
        ablation: What removed edges carry.
        dtype: The dtype the model loads in (a name of :data:`~circuitfind.models.DTYPES`).
    """

    model: str
    task: str
    algorithm: str
    params: tuple[tuple[str, Any], ...]
    seed: int
    examples: int | None
    ablation: str
    dtype: str = DEFAULT_DTYPE

    @property
    def label(self) -> str:
        """The algorithm and its configured hyperparameters, and the dtype unless float32:
        ``eap_ig(steps=10)``, ``eap_ig(steps=10) @bfloat16``."""
        label = self.algorithm
        if self.params:
            inner = ", ".join(f"{k}={json.dumps(v)}" for k, v in self.params)
            label = f"{self.algorithm}({inner})"
        return label if self.dtype == DEFAULT_DTYPE else f"{label} @{self.dtype}"

    @property
    def key(self) -> str:
        """Unique, readable identity of the cell in a study."""
        n = "default" if self.examples is None else self.examples
        return (f"model={self.model} task={self.task} algorithm={self.label} seed={self.seed} "
                f"examples={n} ablation={self.ablation}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable), with ``label`` and ``key``."""
        return {"model": self.model, "task": self.task, "algorithm": self.algorithm,
                "params": dict(self.params), "seed": self.seed, "examples": self.examples,
                "ablation": self.ablation, "dtype": self.dtype, "label": self.label,
                "key": self.key}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A validated grid (see the module docstring for the TOML schema).

    Attributes:
        cells: Every cell of the grid, in config order (models, then tasks, algorithms,
            hyperparameters, seeds), before the tokenizer check.
        convention: Faithfulness-curve convention (``"mib"`` or ``"single"``).
        fractions: Circuit sizes of the curve, as fractions of all edges, ascending.
        study: Default study name.
        source: The config as read (for provenance; stored in the study).
        memory_budget: Bytes each cell's run may hold, weights included (the config's
            ``memory``, e.g. ``"4GiB"``; ``None``: the weights plus 2 GiB). Not part of a
            cell's identity: results do not depend on it.
    """

    cells: tuple[Cell, ...]
    convention: str
    fractions: tuple[float, ...]
    study: str
    source: dict[str, Any]
    memory_budget: int | None = None


@dataclasses.dataclass(frozen=True)
class GridPlan:
    """The cells to run and the cells skipped because the task does not fit the tokenizer.

    Attributes:
        cells: Runnable cells.
        skipped: ``{"model", "task", "examples", "seeds", "reason"}`` per (model, task,
            examples) that does not fit (for the listed seeds); all its algorithms are skipped.
    """

    cells: tuple[Cell, ...]
    skipped: tuple[dict[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """State of a grid after a worker's run.

    Attributes:
        study_name: The Optuna study; ``storage`` its URL.
        n_cells: Runnable cells in the grid.
        executed: Cells this worker ran to completion.
        completed: Cells finished in the study (every worker).
        failed: ``{"cell", "error"}`` for each cell whose latest trial failed (a crash, or a
            worker that died ``max_retries + 1`` times).
        pending: Cells neither finished nor failed (only when ``create_only``).
        skipped: Cells skipped because their task does not fit the model's tokenizer.
        wall_time_s: This worker's wall time, seconds.
    """

    study_name: str
    storage: str
    n_cells: int
    executed: int
    completed: int
    failed: tuple[dict[str, str], ...]
    pending: int
    skipped: tuple[dict[str, Any], ...]
    wall_time_s: float

    @property
    def ok(self) -> bool:
        """No failed cell."""
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return {**dataclasses.asdict(self), "ok": self.ok}


# ----------------------------------------------------------------------------- config
def load_config(config: str | os.PathLike[str] | Mapping[str, Any] | BenchConfig) -> BenchConfig:
    """Read and validate a grid config (a TOML file, or the same structure as a dict).

    Args:
        config: Path of a ``.toml`` file, a dict of its content, or a :class:`BenchConfig`.

    Returns:
        The :class:`BenchConfig`.

    Raises:
        ConfigError: a file that cannot be read or parsed; every problem of the content (unknown
            keys, models, tasks, algorithms or hyperparameters, values of the wrong type),
            listed in one message.
    """
    if isinstance(config, BenchConfig):
        return config
    if isinstance(config, Mapping):
        return _validate(dict(config), "circuitfind-bench")
    path = Path(config)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"Cannot read the bench config {str(path)!r}: {err.strerror or err}."
                          ) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"The bench config {str(path)!r} is not valid TOML: {err}.") from err
    return _validate(raw, path.stem)


def _validate(raw: dict[str, Any], default_study: str) -> BenchConfig:
    problems: list[str] = []
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                        f"{', '.join(TOP_KEYS)}")
    convention = raw.get("convention", "mib")
    if convention not in CONVENTIONS:
        problems.append(f"convention must be one of {list(CONVENTIONS)}; got {convention!r}")
    fractions = raw.get("fractions", list(DEFAULT_FRACTIONS))
    if not (isinstance(fractions, list) and fractions and all(
            _is_number(f) and 0 < f <= 1 for f in fractions)):
        problems.append(f"fractions must be a non-empty list of numbers in (0, 1]; "
                        f"got {fractions!r}")
        fractions = list(DEFAULT_FRACTIONS)
    study = raw.get("study", default_study)
    if not isinstance(study, str) or not study:
        problems.append(f"study must be a non-empty string; got {study!r}")
    memory = raw.get("memory")
    try:
        memory = None if memory is None else parse_memory(memory)
    except CircuitFindError as err:
        problems.append(f"memory: {err}")
    grids = raw.get("grid", [{}])
    if not (isinstance(grids, list) and grids and all(isinstance(g, dict) for g in grids)):
        problems.append("grid must be an array of tables ([[grid]] sections)")
        grids = [{}]
    cells: list[Cell] = []
    checked: dict[str, bool] = {}
    for i, sub in enumerate(grids):
        where = f"[[grid]] #{i + 1}: " if "grid" in raw else ""
        extra = sorted(set(sub) - set(CELL_KEYS))
        if extra:
            problems.append(f"{where}unknown key(s) {', '.join(map(repr, extra))}; a sub-grid "
                            f"takes {', '.join(CELL_KEYS)}")
        merged = {k: sub.get(k, raw.get(k)) for k in CELL_KEYS}
        cells += _cells(merged, where, problems, checked)
    if not problems and not cells:
        problems.append("the grid has no cells")
    seen: set[str] = set()
    for cell in cells:
        if cell.key in seen:
            problems.append(f"the cell {cell.key!r} appears twice")
        seen.add(cell.key)
    if problems:
        raise ConfigError("The bench config has {} problem{}:\n".format(
            len(problems), "s" if len(problems) > 1 else "") + "\n".join(
            f"  - {p}" for p in problems))
    return BenchConfig(cells=tuple(cells), convention=convention,
                       fractions=tuple(sorted(float(f) for f in fractions)), study=study,
                       source=raw, memory_budget=memory)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _string_list(value: Any, key: str, where: str, problems: list[str]) -> list[str]:
    if value is None:
        problems.append(f"{where}{key} is missing (a list of names)")
        return []
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
        problems.append(f"{where}{key} must be a non-empty list of strings; got {value!r}")
        return []
    return value


def _cells(spec: dict[str, Any], where: str, problems: list[str],
           checked: dict[str, bool]) -> list[Cell]:
    """The cells of one (sub-)grid; problems are appended, not raised."""
    models = _string_list(spec["models"], "models", where, problems)
    tasks = _string_list(spec["tasks"], "tasks", where, problems)
    for model in models:
        if model not in checked:
            checked[model] = _check_model(model, problems)
    task_names = []
    for task in tasks:
        try:
            task_obj = get_task(task)
            task_names.append(task if task_obj.source is not None else task_obj.name)
        except CircuitFindError as err:
            problems.append(f"{where}task {task!r}: {err}")
    seeds = spec["seeds"] if spec["seeds"] is not None else [0]
    if not (isinstance(seeds, list) and seeds and all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        problems.append(f"{where}seeds must be a non-empty list of integers; got {seeds!r}")
        seeds = []
    examples = spec["examples"]
    if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int)
                                 or examples < 1):
        problems.append(f"{where}examples must be an integer >= 1; got {examples!r}")
    ablation = spec["ablation"] if spec["ablation"] is not None else DEFAULT_ABLATION
    try:
        ablation = Ablation.parse(ablation).kind
    except (CircuitFindError, TypeError, AttributeError) as err:
        problems.append(f"{where}ablation {ablation!r}: {err}")
    dtype = spec["dtype"] if spec["dtype"] is not None else DEFAULT_DTYPE
    try:
        dtype = dtype_name(dtype)
    except CircuitFindError as err:
        problems.append(f"{where}dtype: {err}")
    variants = _algorithm_variants(spec["algorithms"], where, problems)
    return [Cell(model, task, algorithm, params, seed, examples, ablation, dtype)
            for model in models if checked.get(model)
            for task in task_names
            for algorithm, params in variants
            for seed in seeds]


def _check_model(model: str, problems: list[str]) -> bool:
    try:
        resolve_model_source(model)
    except CircuitFindError as err:
        problems.append(f"model {model!r}: {err}")
        return False
    return True


def _algorithm_variants(value: Any, where: str,
                        problems: list[str]) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    """``[(algorithm key, ((param, value), ...)), ...]``: one per hyperparameter combination."""
    if value is None:
        problems.append(f"{where}algorithms is missing (a list of names, or [algorithms.NAME] "
                        "tables)")
        return []
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and value:
        value = {name: {} for name in value}
    if not (isinstance(value, dict) and value and all(isinstance(v, dict)
                                                      for v in value.values())):
        problems.append(f"{where}algorithms must be a non-empty list of names or a table of "
                        f"[algorithms.NAME] tables; got {value!r}")
        return []
    variants = []
    for name, grid in value.items():
        try:
            cls = ALGORITHMS.get(name)
        except CircuitFindError as err:
            problems.append(f"{where}{err}")
            continue
        axes = sorted(grid.items())
        choices = [v if isinstance(v, list) and v else [v] for _, v in axes]
        for combo in itertools.product(*choices):
            params = tuple((key, val) for (key, _), val in zip(axes, combo))
            try:
                get_algorithm(cls.name, **dict(params))
            except (CircuitFindError, TypeError, ValueError) as err:
                problems.append(f"{where}algorithm {cls.name!r} with {dict(params)}: {err}")
                break  # one message per algorithm is enough
            variants.append((cls.name, params))
    return variants


# ----------------------------------------------------------------------------- plan
def plan_grid(config: BenchConfig) -> GridPlan:
    """Split the grid into runnable cells and cells whose task does not fit the tokenizer.

    Only tokenizers are loaded (one per model); each (model, task, seed, examples) is built
    once, so a cell is skipped exactly when running it would raise
    :class:`~circuitfind.errors.TaskDataError` while building its data.

    Args:
        config: A validated config.

    Returns:
        The :class:`GridPlan`.

    Raises:
        ConfigError: a model whose tokenizer cannot be loaded (all such models listed).
    """
    tokenizers: dict[str, Any] = {}
    problems = []
    for model in dict.fromkeys(c.model for c in config.cells):
        try:
            tokenizers[model] = _tokenizer(model)
        except Exception as err:  # noqa: BLE001 - reported, with the model named
            problems.append(f"  - model {model!r}: cannot load its tokenizer "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})")
    if problems:
        raise ConfigError("The bench config has models without a usable tokenizer:\n"
                          + "\n".join(problems))
    fits: dict[tuple[str, str, int, int | None], str | None] = {}
    cells: list[Cell] = []
    skipped: dict[tuple[str, str, int | None, str], list[int]] = {}
    for cell in config.cells:
        key = (cell.model, cell.task, cell.seed, cell.examples)
        if key not in fits:
            task = get_task(cell.task)
            try:
                task.build(tokenizers[cell.model],
                           n=task.default_n if cell.examples is None else cell.examples,
                           seed=cell.seed)
                fits[key] = None
            except TaskDataError as err:
                fits[key] = str(err)
                skipped.setdefault((cell.model, cell.task, cell.examples, str(err)),
                                   []).append(cell.seed)
        if fits[key] is None:
            cells.append(cell)
    return GridPlan(cells=tuple(cells), skipped=tuple(
        {"model": m, "task": t, "examples": n, "seeds": seeds, "reason": reason}
        for (m, t, n, reason), seeds in skipped.items()))


def _tokenizer(model: str) -> Any:
    """The tokenizer ``load_model(model)`` would attach, without loading the weights.

    Raises:
        ConfigError: no tokenizer is at hand for ``model``.
    """
    tokenizer = model_tokenizer(model)
    if tokenizer is None:
        raise ConfigError(f"No tokenizer of {model!r} could be loaded (a local directory needs "
                          "its tokenizer files; a hub name must be in the local cache).")
    return tokenizer


# ----------------------------------------------------------------------------- running a cell
class _Monitor:
    """Background thread: Optuna heartbeats for the claimed trial, and the process's peak RSS.

    RSS is sampled every 10 ms (from ``/proc/self/statm`` on Linux, else ``psutil`` when it is
    installed; ``None`` when neither is available). On CUDA the peak allocated memory is read
    from torch instead (:meth:`peak_bytes`).
    """

    def __init__(self, storage: Any, trial_id: int | None, interval: float | None,
                 device: torch.device) -> None:
        self.storage, self.trial_id, self.interval, self.device = (storage, trial_id, interval,
                                                                  device)
        self.peak: int | None = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Monitor:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        rss = _rss()
        if rss is not None:
            self.peak = max(self.peak or 0, rss)

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(0.01):
            self._sample()
            if self.interval is not None and time.monotonic() - last_beat >= self.interval:
                with contextlib.suppress(Exception):  # a missed beat is retried next interval
                    self.storage.record_heartbeat(self.trial_id)
                last_beat = time.monotonic()

    def peak_bytes(self) -> tuple[int | None, str]:
        """(peak bytes, what was measured): CUDA allocations, or the process's resident set."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        return self.peak, "process_peak_rss"


def _release_memory() -> None:
    """Collect garbage and return freed heap to the operating system (glibc; else no-op)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int | None:
    """Resident set size of this process in bytes, or ``None`` where it cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


class _Models:
    """Keeps the last loaded model, so consecutive cells of one model load it once."""

    def __init__(self, device: str | None) -> None:
        self.device = device
        self.name: tuple[str, str] | None = None  # the model held: its name and dtype
        self.model: Any = None

    def get(self, name: str, dtype: str = DEFAULT_DTYPE) -> Any:
        if (name, dtype) != self.name:
            self.model, self.name = None, None
            self.model = load_model(name, device=self.device, dtype=dtype)
            self.name = (name, dtype)
        return self.model


def forward_seconds(model: Any, data: Any, repeats: int = 5) -> float:
    """Median time (seconds) of one plain Hugging Face forward of ``data``'s clean batch.

    The unit in which the leaderboard states each cell's cost (``score_forwards``), so that
    costs compare across machines and models: the wrapped Hugging Face model (the bridge's
    ``original_model``) runs the ``[N, T]`` clean tokens with their attention mask, no
    gradients, after one warm-up, ``repeats`` times. On the CPU the time is the process's CPU
    time (:func:`time.process_time`), like the algorithm's in :func:`run_cell`, so that other
    jobs competing for the cores do not change the ratio; on CUDA it is wall time after
    synchronising.

    Args:
        model: A ``TransformerBridge`` or Hugging Face causal LM.
        data: Task data (:class:`~circuitfind.tasks.base.TaskData`).
        repeats: Timed forwards (the median is returned).

    Returns:
        Seconds (wall clock; on CUDA after synchronising).
    """
    hf = getattr(model, "original_model", model)
    device = next(hf.parameters()).device
    ids, mask = data.clean.to(device), data.attention_mask.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = _cost_clock(device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            sync()
            t0 = clock()
            hf(input_ids=ids, attention_mask=mask)
            sync()
            if i:
                times.append(clock() - t0)
    return float(statistics.median(times))


def _cost_clock(device: torch.device) -> Any:
    """The clock costs are measured with: process CPU time on the CPU (other processes on the
    machine do not inflate it), wall time on an accelerator."""
    return time.perf_counter if device.type != "cpu" else time.process_time


def run_cell(cell: Cell, config: BenchConfig, model: Any, *, storage: Any = None,
             trial_id: int | None = None, heartbeat_interval: float | None = None
             ) -> dict[str, Any]:
    """Run one cell and return its record.

    Args:
        cell: The cell.
        config: Its grid (faithfulness-curve convention and fractions).
        model: The cell's model, loaded (:func:`circuitfind.load_model`).
        storage, trial_id, heartbeat_interval: Where to record Optuna heartbeats while the
            cell runs (all ``None``: none recorded).

    Returns:
        A JSON-serialisable dict: ``cpr`` and ``cmd`` (dimensionless areas over the edge
        fraction), ``convention`` and ``convention_label``, ``curve`` (the
        :class:`~circuitfind.evaluation.faithfulness.FaithfulnessCurve` as a dict: fractions,
        normalized faithfulness at each size for both rankings, edges requested and kept),
        ``edge_auc`` / ``node_auc`` (ROC AUC against the reference circuit; ``None`` without
        one) and ``reference``, ``n_edges`` / ``n_nodes`` (the model's graph), ``circuit``
        (a pruning algorithm's own circuit: ``n_edges``, ``n_nodes``, normalized
        ``faithfulness``; ``None`` for attribution algorithms), ``metric`` and
        ``metric_unit``, ``score_time_s`` (the algorithm alone) and ``wall_time_s`` (the whole
        cell, data to AUC), ``forward_s`` (one plain Hugging Face forward of the cell's clean
        batch, :func:`forward_seconds`) and ``score_forwards`` (the algorithm's cost in those
        forwards: its CPU time on the CPU, wall time on CUDA, over ``forward_s``), ``peak_memory_bytes`` and ``peak_memory_kind`` (the process's peak
        resident set during the cell, model included, after freed heap is returned to the
        operating system; on CUDA the peak allocated memory) and ``rss_start_bytes``,
        ``scores`` (what the algorithm's scores mean: kind, unit, direction;
        :mod:`circuitfind.graphs.scores`), ``score_kind`` (how the curve's signed ranking read
        them) and ``scores_negated_for_curve`` (whether that ranking is by ``-score``), ``seed``,
        ``n_examples``, ``hyperparameters`` (every parameter of the algorithm), ``versions``.

    Raises:
        Whatever the cell's model, task or algorithm raises (the worker records it).
    """
    start = time.perf_counter()
    device = next(model.parameters()).device
    _release_memory()  # so that the peak below is this cell's, not an earlier cell's heap
    rss_start = _rss()
    with _Monitor(storage, trial_id, heartbeat_interval, device) as monitor:
        data = build_data(model, cell.task, cell.examples, cell.seed)
        engine = PatchingEngine(model, ablation=cell.ablation, memory_budget=config.memory_budget)
        params = dict(cell.params)
        cls = ALGORITHMS.get(cell.algorithm)
        if "progress" in cls().get_params():
            params.setdefault("progress", False)  # one bar over cells, not one per cell
        algo = get_algorithm(cell.algorithm, **params)
        torch.manual_seed(cell.seed)
        t0, c0 = time.perf_counter(), _cost_clock(device)()
        circuit = algo.discover(engine, data) if algo.returns_circuit else None
        scores = circuit.scores if circuit is not None else algo.score(engine, data)
        if scores is None:
            raise ConfigError(f"The {cell.algorithm!r} algorithm returned a circuit without "
                              "scores; the benchmark ranks edges by them.")
        score_time = time.perf_counter() - t0
        score_cost = _cost_clock(device)() - c0
        # the algorithm says what its scores mean (ACDC's KL effects are importances): the
        # curve's signed (CPR) ranking reads them so. |score| rankings and AUROC do not
        # depend on the sign.
        meaning = algo.score_meaning(data.task)
        curve = faithfulness_curve(engine, scores, data, fractions=config.fractions,
                                   convention=config.convention, score_kind=meaning.kind,
                                   per_example=True)
        g = engine.graph
        reference = (find_reference(data.task.name, resolve_model_source(cell.model)
                                    .display_name, g) if data.task.source is None else None)
        own = None
        if circuit is not None:
            # m(M) and m(∅) are the curve's: only the circuit itself needs a pass
            m_c = float(engine.evaluate(data, circuit.kept.to(engine.dtype))[0])
            own = {"n_edges": circuit.n_edges, "n_nodes": len(circuit.nodes),
                   "faithfulness": normalized_faithfulness(m_c, curve.metric_full,
                                                           curve.metric_empty)}
    peak, peak_kind = monitor.peak_bytes()
    forward_s = forward_seconds(model, data)
    return {
        "cpr": curve.cpr, "cmd": curve.cmd, "convention": curve.convention,
        "convention_label": curve.label, "curve": curve.to_dict(),
        "edge_auc": None if reference is None else edge_roc(scores, reference).auc,
        "node_auc": None if reference is None else node_roc(scores, reference).auc,
        "reference": None if reference is None else {
            "n_edges": reference.n_edges,
            "source": reference.metadata.get("source") or reference.metadata.get("reference")},
        "n_edges": g.n_edges, "n_nodes": g.n_nodes, "circuit": own,
        "metric": data.task.metric_name, "metric_unit": data.task.metric_unit,
        "score_time_s": round(score_time, 4),
        "forward_s": forward_s, "score_forwards": round(score_cost / forward_s, 2),
        "wall_time_s": round(time.perf_counter() - start, 4),
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind, "rss_start_bytes": rss_start,
        "scores": meaning.to_dict(), "score_kind": curve.score_kind,
        "scores_negated_for_curve": meaning.sign < 0,
        "seed": cell.seed, "n_examples": data.n, "ablation": cell.ablation,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "hyperparameters": algo.get_params(), "versions": versions(),
        "device": str(device),
    }


# ----------------------------------------------------------------------------- the worker
AUTO_HEARTBEAT_S = 1
"""Heartbeat interval (seconds) when none is given: one small write a second per worker."""
GRACE_BOUNDS_S = (5, 60)
"""Smallest and largest automatic grace period (seconds)."""
UNRECORDED_HEARTBEAT_S = 10
"""Heartbeat interval (seconds) assumed for a running cell whose worker did not record one
(workers of earlier versions beat every 10 s): its cell is never taken over too early."""


def auto_grace(durations: Sequence[float], heartbeats: Sequence[float]) -> int:
    """The automatic grace period (seconds) after which a silent worker counts as dead.

    Twice the median wall time of the completed cells (10 s before any cell completed),
    between :data:`GRACE_BOUNDS_S`, and at least five times the longest heartbeat interval of
    the running cells' workers, so a live worker keeps its cell unless it misses five
    heartbeats in a row.

    Args:
        durations: Wall times of completed cells, seconds.
        heartbeats: Heartbeat intervals of the running cells' workers, seconds (a worker
            that recorded none counts as :data:`UNRECORDED_HEARTBEAT_S`).

    Returns:
        The grace period, whole seconds (Optuna's storage takes an int).
    """
    low, high = GRACE_BOUNDS_S
    base = 2 * statistics.median(durations) if durations else 10.0
    floor = max([low] + [5 * h for h in heartbeats])
    return int(math.ceil(max(floor, min(base, high))))


def bench(config: str | os.PathLike[str] | Mapping[str, Any] | BenchConfig,
          storage: str = DEFAULT_STORAGE, study_name: str | None = None,
          device: str | None = None, progress: bool = True,
          heartbeat_interval: int | None = None, grace_period: int | None = None,
          max_retries: int = 2, retry_failed: bool = False,
          create_only: bool = False, rerun: Sequence[str] = (),
          rerun_before: datetime.datetime | str | None = None) -> BenchResult:
    """Run (this worker's share of) a benchmark grid; start as many workers as you like.

    Args:
        config: A TOML file, a dict with its content, or a :class:`BenchConfig`.
        storage: Optuna storage URL shared by the workers (SQLite by default; PostgreSQL or
            MySQL across machines).
        study_name: The study (default: the config's ``study``, i.e. the file's stem).
        device: Device to load models on (default: the model's default, CPU here).
        progress: Show a progress bar over the grid's cells (every worker's).
        heartbeat_interval: Seconds between heartbeats of a running cell (default
            :data:`AUTO_HEARTBEAT_S`).
        grace_period: Seconds without a heartbeat after which a running cell is taken as held
            by a dead worker and queued again (default: :func:`auto_grace`, from the grid's
            measured cell durations).
        max_retries: How many times a cell whose worker died is queued again.
        retry_failed: Queue again, once, the cells whose last run raised.
        create_only: Create the study and queue the cells, run nothing (do this once before
            starting workers on a fresh SQLite file).
        rerun: Glob patterns (:mod:`fnmatch`) over cell keys
            (``model=zoo:induction-llama task=induction algorithm=eap seed=0 examples=default
            ablation=resample``; ``*`` for every cell): the finished cells to run again, those
            whose latest result completed before ``rerun_before``. Their new records replace
            the old ones on the leaderboard; the old trials stay in the study.
        rerun_before: When the results to replace were made at the latest: a naive
            ``datetime`` in local time (as Optuna stores trial times), an aware one, or an ISO
            8601 string (``2026-12-04T08:40``, ``2026-12-04T08:40:00+00:00``). Required with
            ``rerun``; not in the future. Pass the same value when restarting a run.

    Returns:
        A :class:`BenchResult` for the whole grid (every worker's cells).

    Raises:
        ConfigError: a bad config (every problem listed), a storage URL that cannot be opened,
            a study of that name made from another convention or fractions, bad worker
            settings, or a bad rerun request (a pattern matching no cell of the grid, no or a
            future ``rerun_before``). Errors inside a cell are recorded in the study, not
            raised.
    """
    began = time.perf_counter()
    cfg = load_config(config)
    before = _rerun_time(rerun, rerun_before)
    for label, value, low in (("heartbeat_interval", heartbeat_interval, 1),
                              ("grace_period", grace_period, 1), ("max_retries", max_retries, 0)):
        if value is None and label != "max_retries":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{label} must be an int >= {low}; got {value!r}.")
    adaptive = grace_period is None
    heartbeat_interval = heartbeat_interval or AUTO_HEARTBEAT_S
    grid = plan_grid(cfg)
    rerun_keys = _rerun_keys(rerun, grid)
    optuna = optuna_module()
    store = open_storage(storage, heartbeat_interval=heartbeat_interval,
                         grace_period=grace_period or GRACE_BOUNDS_S[1])
    name = study_name or cfg.study
    with claim_lock(storage):
        study = optuna.create_study(storage=store, study_name=name, direction="maximize",
                                    load_if_exists=True)
        _mark(study, cfg, grid)
    keys = {c.key: c for c in grid.cells}
    retried = set()
    if retry_failed:
        states = _cell_states(study, keys)
        retried = {k for k, (state, _) in states.items() if state == "failed"}
    if rerun_keys:
        with claim_lock(storage):
            _queue_reruns(study, keys, rerun_keys, before)
    models = _Models(device)
    study_id = store.get_study_id_from_name(name)
    executed = 0
    bar = _progress_bar(len(keys), progress and not create_only)
    try:
        while True:
            with claim_lock(storage), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if adaptive:
                    store.grace_period = _grid_grace(study, heartbeat_interval)
                optuna.storages.fail_stale_trials(study)
                _fail_unclaimed(study, store, keys)
                states = _schedule(study, keys, max_retries, retried)
                retried = set()
                trial = None if create_only else _claim(store, study_id, keys)
            if bar is not None:
                bar.n = sum(s == "complete" for s, _ in states.values())
                bar.refresh()
            if trial is None:
                if create_only or not any(s == "running" for s, _ in states.values()):
                    break
                time.sleep(1.0)  # others' cells: wait, take over
                continue
            cell = keys[trial.user_attrs["cell"]]
            if bar is not None:
                bar.set_postfix_str(f"{cell.model} {cell.task} {cell.label} seed={cell.seed}",
                                    refresh=True)
            if _run_trial(study, store, trial, cell, cfg, models, heartbeat_interval):
                executed += 1
                if isinstance(bar, PhaseLog):  # a log: one line per finished cell
                    bar.n = sum(s == "complete" for s, _ in _cell_states(study, keys).values())
                    progress_log.info(f"cell {bar.n} of {len(keys)} done: {cell.key}")
    finally:
        if bar is not None:
            bar.close()
    states = _cell_states(study, keys)
    return BenchResult(
        study_name=name, storage=storage, n_cells=len(keys), executed=executed,
        completed=sum(s == "complete" for s, _ in states.values()),
        failed=tuple({"cell": k, "error": err or "unknown"}
                     for k, (s, err) in states.items() if s == "failed"),
        pending=sum(s in ("waiting", "running") for s, _ in states.values()),
        skipped=grid.skipped, wall_time_s=round(time.perf_counter() - began, 3))


def _rerun_time(rerun: Sequence[str], before: datetime.datetime | str | None
                ) -> datetime.datetime | None:
    """``rerun_before`` as a naive local time (Optuna's trial times); checks the request.

    Raises:
        ConfigError: patterns that are not non-empty strings; patterns without a time, or a
            time without patterns; a time that cannot be parsed or lies in the future.
    """
    if isinstance(rerun, str) or not all(isinstance(p, str) and p for p in rerun):
        raise ConfigError(f"rerun must be a list of non-empty glob patterns over cell keys; "
                          f"got {rerun!r}.")
    if not rerun and before is None:
        return None
    if not rerun or before is None:
        raise ConfigError("A rerun needs both the cells' patterns (--rerun) and the time before "
                          "which their results were made (--rerun-before, e.g. the commit "
                          "time of the fix: git show -s --format=%cI COMMIT); got "
                          f"rerun={list(rerun)!r}, rerun_before={before!r}.")
    if isinstance(before, str):
        try:
            before = datetime.datetime.fromisoformat(before.strip())
        except ValueError as err:
            raise ConfigError(f"rerun_before must be an ISO 8601 time such as "
                              f"2026-12-04T08:40 or 2026-12-04T08:40:00+00:00; got {before!r}."
                              ) from err
    if not isinstance(before, datetime.datetime):
        raise ConfigError(f"rerun_before must be a datetime or an ISO 8601 string; got "
                          f"{before!r}.")
    if before.tzinfo is not None:
        before = before.astimezone().replace(tzinfo=None)
    now = datetime.datetime.now()
    if before > now:
        raise ConfigError(f"rerun_before ({before.isoformat()}, local time) is in the future "
                          f"(now {now.isoformat(timespec='seconds')}): the cells it reruns "
                          "would be run again at every start. Pass the time of the fix.")
    return before


def _rerun_keys(patterns: Sequence[str], grid: GridPlan) -> set[str]:
    """The keys of the grid's runnable cells that match a rerun pattern.

    Raises:
        ConfigError: a pattern that matches no cell (with an example key).
    """
    keys = [c.key for c in grid.cells]
    unmatched = [p for p in patterns if not fnmatch.filter(keys, p)]
    if unmatched and keys:
        raise ConfigError(f"The rerun pattern(s) {', '.join(map(repr, unmatched))} match no "
                          f"cell of the grid; patterns are globs over cell keys such as "
                          f"{keys[0]!r} (quote them in a shell; '*' matches any text).")
    return {k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def _queue_reruns(study: Any, keys: Mapping[str, Cell], selected: set[str],
                  before: datetime.datetime | None) -> None:
    """Queue again the selected cells whose latest result completed before ``before``.

    Each new trial names the trial it replaces (``rerun_of``); a cell already queued or
    running again, or finished at or after ``before``, is left alone.
    """
    TrialState = optuna_module().trial.TrialState
    by_cell = _trials_by_cell(study, {k: keys[k] for k in selected})
    for key, trials in by_cell.items():
        done = [t for t in _current(trials) if t.state == TrialState.COMPLETE]
        if not done or any(t.state in (TrialState.WAITING, TrialState.RUNNING)
                           for t in _current(trials)):
            continue
        last = max(done, key=lambda t: t.number)
        if last.datetime_complete is not None and last.datetime_complete >= before:
            continue
        study.enqueue_trial({}, user_attrs={"cell": key, "spec": keys[key].to_dict(),
                                            "rerun_of": last.number})


def _current(trials: Sequence[Any]) -> list[Any]:
    """A cell's trials since its latest rerun request: those numbered after the trial the
    last ``rerun_of`` replaced (all of them when it was never rerun)."""
    replaced = max((t.user_attrs["rerun_of"] for t in trials if "rerun_of" in t.user_attrs),
                   default=-1)
    return [t for t in trials if t.number > replaced]


def _progress_bar(total: int, show: bool) -> Any:
    """The grid's progress over cells: a bar on a terminal, one line at the end in a log."""
    if not show:
        return None
    return progress(total, desc="cells", unit="cell", leave=True)


def _mark(study: Any, cfg: BenchConfig, grid: GridPlan) -> None:
    """Record the grid's config in the study; refuse a study made with another curve."""
    marker = study.user_attrs.get(STUDY_MARKER)
    mine = {"convention": cfg.convention, "fractions": list(cfg.fractions)}
    if marker is not None:
        theirs = {"convention": marker.get("convention"), "fractions": marker.get("fractions")}
        if theirs != mine:
            raise ConfigError(f"The study {study.study_name!r} was made with {theirs}; this "
                              f"config asks for {mine}. Use another study name (--study).")
    study.set_user_attr(STUDY_MARKER, {**mine, "config": cfg.source,
                                       "skipped": list(grid.skipped)})


def _trials_by_cell(study: Any, keys: Mapping[str, Cell]) -> dict[str, list[Any]]:
    by_cell: dict[str, list[Any]] = {k: [] for k in keys}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("cell")
        if key in by_cell:
            by_cell[key].append(t)
    return by_cell


def _cell_states(study: Any, keys: Mapping[str, Cell]) -> dict[str, tuple[str, str | None]]:
    """``key -> (state, error)``, state one of complete/running/waiting/failed/new."""
    TrialState = optuna_module().trial.TrialState
    out: dict[str, tuple[str, str | None]] = {}
    for key, trials in _trials_by_cell(study, keys).items():
        trials = _current(trials)
        states = {t.state for t in trials}
        if TrialState.COMPLETE in states:
            out[key] = ("complete", None)
        elif TrialState.RUNNING in states:
            out[key] = ("running", None)
        elif TrialState.WAITING in states:
            out[key] = ("waiting", None)
        elif any(t.state == TrialState.FAIL for t in trials):
            last = max((t for t in trials if t.state == TrialState.FAIL), key=lambda t: t.number)
            if "error" in last.user_attrs:
                out[key] = ("failed", last.user_attrs["error"])
            else:
                out[key] = ("new" if "interrupted" in last.user_attrs else "died", None)
        else:
            out[key] = ("new", None)
    return out


def _schedule(study: Any, keys: Mapping[str, Cell], max_retries: int,
              retry: set[str]) -> dict[str, tuple[str, str | None]]:
    """Queue the cells that have no live or finished trial; returns the states after it.

    New cells are queued; a cell whose worker died is queued again up to ``max_retries``
    times (then it counts as failed); a cell that raised is queued again only if in ``retry``.
    """
    TrialState = optuna_module().trial.TrialState
    states = _cell_states(study, keys)
    by_cell = _trials_by_cell(study, keys)
    for key, (state, _) in list(states.items()):
        deaths = sum(t.state == TrialState.FAIL and not {"error", "interrupted"} & set(
            t.user_attrs) for t in _current(by_cell[key]))
        if state == "new" or key in retry or (state == "died" and deaths <= max_retries):
            study.enqueue_trial({}, user_attrs={"cell": key, "spec": keys[key].to_dict()})
            states[key] = ("waiting", None)
        elif state == "died":
            states[key] = ("failed", f"its worker died {deaths} times (killed, out of memory?)")
    return states


def _claim(storage: Any, study_id: int, keys: Mapping[str, Cell]) -> Any:
    """Move the first queued trial of a grid cell to RUNNING and return it (``None``: none)."""
    optuna = optuna_module()
    TrialState = optuna.trial.TrialState
    trials = storage.get_all_trials(study_id, deepcopy=False)
    for t in trials:
        if t.state != TrialState.WAITING or t.user_attrs.get("cell") not in keys:
            continue
        beats = storage.get_heartbeat_interval() is not None
        if beats:
            # the first beat before the claim: a RUNNING trial without one is never failed as
            # stale by Optuna, so a worker killed right after claiming would hold it for ever
            storage.record_heartbeat(t._trial_id)
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if beats:
            # others' automatic grace reads the interval; then a beat of the running trial
            storage.set_trial_user_attr(t._trial_id, "heartbeat_s",
                                        storage.get_heartbeat_interval())
            storage.record_heartbeat(t._trial_id)
        rivals = [o for o in _current([o for o in storage.get_all_trials(study_id, deepcopy=False)
                                       if o.user_attrs.get("cell") == t.user_attrs["cell"]])
                  if o.number != t.number]
        if any(o.state == TrialState.COMPLETE or (o.state in (TrialState.RUNNING,
               TrialState.WAITING) and o.number < t.number) for o in rivals):
            storage.set_trial_user_attr(t._trial_id, "duplicate", True)
            storage.set_trial_state_values(t._trial_id, state=TrialState.PRUNED)
            continue
        return storage.get_trial(t._trial_id)
    return None


def _fail_unclaimed(study: Any, storage: Any, keys: Mapping[str, Cell]) -> None:
    """Fail the grid's running trials whose worker died before its claim was finished.

    Optuna fails a running trial only once its heartbeat is stale, so a trial moved to
    ``RUNNING`` by a worker killed before its first heartbeat (studies of earlier versions,
    which beat only after the claim) would be held for ever and its cell never finished. A
    claim ends by recording ``heartbeat_s`` within milliseconds; a running trial without it,
    started more than the grace period ago, is failed here and its cell queued again as a dead
    worker's.
    """
    optuna = optuna_module()
    grace = datetime.timedelta(seconds=storage.grace_period or GRACE_BOUNDS_S[1])
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if (t.user_attrs.get("cell") in keys and "heartbeat_s" not in t.user_attrs
                and t.datetime_start is not None and now - t.datetime_start > grace):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)


def _run_trial(study: Any, storage: Any, trial: Any, cell: Cell, cfg: BenchConfig,
               models: _Models, heartbeat_interval: int) -> bool:
    """Run the claimed trial's cell; record it (or its error). True when it completed."""
    TrialState = optuna_module().trial.TrialState
    tid = trial._trial_id
    storage.set_trial_user_attr(tid, "worker", f"{socket.gethostname()}:{os.getpid()}")
    try:
        # heartbeats while the model loads too (a slow load must not look like a dead worker)
        with _Monitor(storage, tid, heartbeat_interval, torch.device("cpu")):
            model = models.get(cell.model, cell.dtype)
        record = run_cell(cell, cfg, model, storage=storage, trial_id=tid,
                          heartbeat_interval=heartbeat_interval)
    except KeyboardInterrupt:
        # the next run queues the cell again at once (a killed worker's waits for grace_period)
        storage.set_trial_user_attr(tid, "interrupted", True)
        study.tell(trial.number, state=TrialState.FAIL)
        raise
    except Exception as err:  # noqa: BLE001 - a cell's failure is recorded, the grid goes on
        with contextlib.suppress(optuna_module().exceptions.UpdateFinishedTrialError,
                                 ValueError):  # already failed as stale: queued again
            storage.set_trial_user_attr(tid, "error", f"{type(err).__name__}: {err}"[:2000])
            storage.set_trial_user_attr(tid, "traceback", traceback.format_exc()[-4000:])
            study.tell(trial.number, state=TrialState.FAIL)
        return False
    cpr = record["cpr"]
    value = cpr if math.isfinite(cpr) else -math.inf
    try:
        storage.set_trial_user_attr(tid, "record", record)  # one write: SQLite commits are slow
        study.tell(trial.number, value)
    except (optuna_module().exceptions.UpdateFinishedTrialError, ValueError):
        _keep_taken_over(study, storage, trial, record, value)
    return True


def _keep_taken_over(study: Any, storage: Any, trial: Any, record: dict[str, Any],
                     value: float) -> None:
    """Record a cell whose trial another worker failed as stale while it ran.

    A worker starved of CPU (``nice``, a loaded machine) can miss heartbeats for longer than
    the grace period although it is alive; another worker then fails its trial and queues the
    cell again. The finished result is as good as any: it is added as a new completed trial
    (``taken_over_from`` names the failed one), so the queued copy yields to it when claimed
    and the cell is not run twice, instead of the worker crashing on the finished trial.
    """
    optuna = optuna_module()
    attrs = storage.get_trial(trial._trial_id).user_attrs
    keep = {k: attrs[k] for k in ("cell", "spec", "worker", "heartbeat_s") if k in attrs}
    study.add_trial(optuna.trial.create_trial(
        value=value, user_attrs={**keep, "record": record, "taken_over_from": trial.number}))
    warnings.warn(f"The cell {attrs.get('cell')!r} was taken for dead while it ran (no "
                  f"heartbeat for the grace period: a starved worker?); its result is kept as "
                  "a new trial. On a busy machine pass a longer --grace-period.",
                  RuntimeWarning, stacklevel=2)


def _grid_grace(study: Any, heartbeat_interval: int) -> int:
    """:func:`auto_grace` from the study's completed cells and running workers."""
    TrialState = optuna_module().trial.TrialState
    durations, beats = [], [float(heartbeat_interval)]
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                      TrialState.RUNNING)):
        if t.state == TrialState.COMPLETE:
            wall = (t.user_attrs.get("record") or {}).get("wall_time_s")
            if isinstance(wall, (int, float)):
                durations.append(float(wall))
        else:
            beat = t.user_attrs.get("heartbeat_s")
            beats.append(float(beat) if isinstance(beat, (int, float))
                         else float(UNRECORDED_HEARTBEAT_S))
    return auto_grace(durations, beats)


def iter_records(study: Any) -> Iterator[dict[str, Any]]:
    """The records of a bench study's completed cells: ``spec`` (the cell) merged with results.

    Args:
        study: An ``optuna.Study`` made by :func:`bench`.

    Yields:
        One dict per completed cell, from its latest completed trial (a rerun's replaces the
        trial it reran): the cell's fields (``model``, ``task``, ``algorithm``, ``label``,
        ``params``, ``seed``, ``examples``, ``ablation``, ``key``) and its record (see
        :func:`run_cell`), plus ``study``, ``trial`` and ``rerun_of`` (the trial it replaced,
        ``None`` for a first run), in trial order.
    """
    TrialState = optuna_module().trial.TrialState
    latest: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        cell = t.user_attrs.get("cell")
        if {"cell", "spec", "record"} <= set(t.user_attrs) and (
                cell not in latest or t.number > latest[cell].number):
            latest[cell] = t
    for t in sorted(latest.values(), key=lambda t: t.number):
        attrs = t.user_attrs
        yield {**attrs["spec"], **attrs["record"], "worker": attrs.get("worker"),
               "study": study.study_name, "trial": t.number, "rerun_of": attrs.get("rerun_of")}
