"""The Python entry points: score every edge, or discover a circuit, in one call.

``discover`` = load the model (if given a name) → build the task's data from the model's
tokenizer → score edges with an algorithm → select the top-n edges (or those over a threshold)
→ prune dangling edges → evaluate faithfulness → a :class:`Circuit` with full provenance.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import torch
from torch import Tensor

from circuitfind.algorithms.base import Algorithm, get_algorithm
from circuitfind.errors import ConfigError
from circuitfind.evaluation.faithfulness import evaluate
from circuitfind.evaluation.roc import edge_roc, node_roc
from circuitfind.graphs.circuit import Circuit, prune_dangling, select_threshold, select_top_n
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.models import load_model
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.spec import Ablation
from circuitfind.registry import normalize_name
from circuitfind.tasks.base import Task, TaskData, get_task


def _model_name(model: Any) -> str:
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or getattr(cfg, "tokenizer_name", None) or "?")


def build_data(model: Any, task: str | Task, n: int = 64, seed: int = 0) -> TaskData:
    """Build ``task``'s data with the model's tokenizer.

    Raises:
        UnknownNameError: unknown task. TaskDataError: the task does not fit the tokenizer.
        ConfigError: the model has no tokenizer.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("The model has no tokenizer; load it from a directory that includes "
                          "the tokenizer files, or build TaskData yourself and pass data=.")
    return get_task(task).build(tokenizer, n=n, seed=seed)


def score_edges(model: Any, task: str | Task | None = None, algorithm: str | Algorithm = "eap",
                data: TaskData | None = None, n_examples: int = 64, seed: int = 0,
                algorithm_params: dict[str, Any] | None = None,
                device: str | None = None, ablation: Ablation | str | None = None) -> Tensor:
    """Score every edge of the model's graph with an algorithm.

    Args:
        model: A model name, local directory, ``zoo:NAME`` or a loaded ``TransformerBridge``.
        task: Task name (or instance); ignored when ``data`` is given.
        algorithm: Algorithm name (``eap``, ``exact``, ...) or instance.
        data: Prebuilt task data (default: built from ``task`` with ``n_examples``, ``seed``).
        algorithm_params: Hyperparameters of the algorithm.
        device: Device for a model loaded here.
        ablation: What a removed edge carries: ``"resample"`` (the task's corrupted run,
            default), ``"zero"``, ``"mean"``, ``"mean_positional"`` or an :class:`Ablation`.

    Returns:
        ``[S, R]`` float32 scores in the task's metric unit (estimated metric change when the
        edge is corrupted).

    Raises:
        ConfigError: neither ``task`` nor ``data``; bad parameters; an unknown ablation or one
            the data cannot supply.
    """
    if data is None and task is None:
        raise ConfigError("Pass a task name (task='ioi') or prebuilt data (data=...).")
    spec = Ablation.parse(ablation)
    algo = get_algorithm(algorithm, **(algorithm_params or {}))
    task_obj = get_task(task) if data is None else data.task
    model = load_model(model, device=device)
    if data is None:
        data = build_data(model, task_obj, n_examples, seed)
    return algo.score(PatchingEngine(model, ablation=spec), data)


def discover(model: Any, task: str | Task | None = None, algorithm: str | Algorithm = "eap",
             n_edges: int | None = None, threshold: float | None = None,
             data: TaskData | None = None, n_examples: int = 64, seed: int = 0,
             absolute: bool = True, prune: bool = True,
             algorithm_params: dict[str, Any] | None = None,
             device: str | None = None, ablation: Ablation | str | None = None) -> Circuit:
    """Discover a circuit: score edges, select, prune dangling edges, evaluate.

    Args:
        model: A model name, local directory, ``zoo:NAME`` or a loaded ``TransformerBridge``.
        task: Task name or instance (ignored when ``data`` is given).
        algorithm: Algorithm name or instance.
        n_edges: Keep the top ``n_edges`` edges (exclusive with ``threshold``; default 100).
            Not for algorithms that select their circuit themselves (``path_patching``).
        threshold: Keep edges with score (|score| if ``absolute``) >= threshold; for an
            algorithm that selects its circuit itself, its own selection threshold.
        data: Prebuilt task data (default: built with the model's tokenizer).
        n_examples: Examples to build when ``data`` is None.
        seed: Data seed.
        absolute: Rank by |score| (True) or by signed score (False).
        prune: Remove dangling edges after selection (never changes the circuit's output).
        algorithm_params: Hyperparameters of the algorithm.
        device: Device for a model loaded here.
        ablation: What a removed edge carries, in scoring and in evaluation alike:
            ``"resample"`` (default), ``"zero"``, ``"mean"``, ``"mean_positional"`` or an
            :class:`Ablation`.

    Returns:
        A :class:`Circuit` whose metadata holds model, task, algorithm and parameters, ablation,
        seed, selection, faithfulness report, wall time and versions; where a reference circuit
        exists for (task, model) (see :func:`find_reference`), also the edge and node ROC AUC
        of the scores against it and its node classes (used to colour the rendering).

    Raises:
        ConfigError: both or invalid ``n_edges``/``threshold``; no task and no data.
        UnknownNameError: unknown task or algorithm.
        TaskDataError: the task's words are not single tokens under the model's tokenizer.
    """
    if n_edges is not None and threshold is not None:
        raise ConfigError("Pass either n_edges or threshold, not both.")
    start = time.perf_counter()
    if data is None and task is None:
        raise ConfigError("Pass a task name (task='ioi') or prebuilt data (data=...).")
    spec = Ablation.parse(ablation)  # fail fast, before loading
    algo = _selecting_algorithm(algorithm, algorithm_params, n_edges, threshold)
    selects = getattr(algo, "selects_edges", False)
    if n_edges is None and threshold is None:
        n_edges = 100
    task_obj = get_task(task) if data is None else data.task
    model_name = model if isinstance(model, str) else _model_name(model)
    model = load_model(model, device=device)
    if data is None:
        data = build_data(model, task_obj, n_examples, seed)
    engine = PatchingEngine(model, ablation=spec)
    g = engine.graph
    if selects:  # the algorithm selects its circuit itself (e.g. path_patching)
        circuit = algo.find_circuit(engine, data)  # type: ignore[attr-defined]
        circuit = circuit.with_metadata(selection={"method": algo.name})
        scores = circuit.scores
    elif n_edges is not None:
        scores = algo.score(engine, data)
        if not isinstance(n_edges, int) or not 0 <= n_edges <= g.n_edges:
            raise ConfigError(f"n_edges must be an integer between 0 and {g.n_edges} (the "
                              f"graph's edge count); got {n_edges!r}.")
        circuit = select_top_n(g, scores, n_edges, absolute=absolute)
    else:
        scores = algo.score(engine, data)
        circuit = select_threshold(g, scores, float(threshold), absolute=absolute)  # type: ignore[arg-type]
    selected = circuit.n_edges
    if prune:
        circuit = prune_dangling(circuit)
    report = evaluate(engine, circuit, data)
    extra: dict[str, Any] = {}
    reference = find_reference(data.task.name, str(model_name), g)
    if reference is not None:
        extra["reference"] = {
            "source": reference.metadata.get("source") or reference.metadata.get("reference"),
            "n_edges": reference.n_edges,
            "edge_auc": edge_roc(scores, reference).auc,
            "node_auc": node_roc(scores, reference).auc}
        if reference.metadata.get("node_classes"):
            extra["node_classes"] = reference.metadata["node_classes"]
    return circuit.with_metadata(**extra,
        model=str(model_name), task=data.task.name, metric=data.task.metric_name,
        metric_unit=data.task.metric_unit, algorithm=algo.name, algorithm_params=algo.get_params(),
        ablation=spec.to_dict(),
        seed=data.seed, n_examples=data.n, selected_edges=selected, pruned=prune,
        faithfulness=report.to_dict(), wall_time_s=round(time.perf_counter() - start, 3),
        versions=versions())


def _selecting_algorithm(algorithm: str | Algorithm, params: dict[str, Any] | None,
                         n_edges: int | None, threshold: float | None) -> Algorithm:
    """The algorithm instance; for one that selects its own circuit (``selects_edges``, e.g.
    ``path_patching``), ``threshold`` becomes its ``threshold`` parameter and ``n_edges`` is
    refused.

    Raises:
        ConfigError: ``n_edges`` for a selecting algorithm, or a ``threshold`` that conflicts
            with the algorithm's own.
    """
    params = dict(params or {})
    algo = get_algorithm(algorithm, **params)
    if not getattr(algo, "selects_edges", False):
        return algo
    if n_edges is not None:
        raise ConfigError(f"The {algo.name!r} algorithm selects its circuit itself; pass "
                          "threshold (its selection threshold) instead of n_edges.")
    if threshold is None or threshold == getattr(algo, "threshold", None):
        return algo
    if isinstance(algorithm, Algorithm) or "threshold" in params:
        raise ConfigError(f"threshold={threshold} conflicts with the {algo.name!r} algorithm's "
                          f"own threshold ({getattr(algo, 'threshold', None)}); pass one.")
    return get_algorithm(algorithm, **{**params, "threshold": threshold})


def find_reference(task: str, model_name: str, graph: ComputeGraph) -> Circuit | None:
    """The reference circuit for ``task`` on the named model, or ``None`` if there is none.

    Zoo organisms (``zoo:NAME``) use their shipped reference when ``task`` is their task;
    other models use the task's literature references (``circuitfind.tasks.references``).
    """
    from circuitfind.tasks.references import NoReferenceError, reference_circuit

    if model_name.startswith("zoo:"):
        from circuitfind import zoo

        name = model_name[len("zoo:"):]
        entry = zoo.ZOO.get(name)
        if entry is None or normalize_name(entry.task) != normalize_name(task):
            return None
        return zoo.reference_circuit(name)
    named = ComputeGraph.from_config({**graph.config(), "model_name": model_name})
    try:
        return reference_circuit(task, named)
    except NoReferenceError:
        return None
    except ConfigError:  # a model of the same name but another shape
        return None


def versions() -> dict[str, str]:
    """Versions of circuitfind and its main dependencies, for provenance."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("circuitfind", "transformer-lens", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out
