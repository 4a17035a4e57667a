"""The Python entry points: score every edge, or discover a circuit, in one call.

``discover`` = load the model (if given a name) → build the task's data from the model's
tokenizer → score edges with an algorithm → select the top-n edges (or those over a threshold)
→ prune dangling edges → evaluate faithfulness → a :class:`Circuit` with full provenance.
Pruning algorithms (``returns_circuit``, e.g. ACDC) select their circuit themselves: their
circuit is kept as is (no re-selection, no pruning), and ``threshold`` is their τ.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from circuitfind.algorithms.base import ALGORITHMS, Algorithm, get_algorithm
from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.errors import ConfigError
from circuitfind.evaluation.check import CheckResult
from circuitfind.evaluation.check import check as check_data
from circuitfind.evaluation.faithfulness import DEFAULT_FRACTIONS, evaluate, faithfulness_curve
from circuitfind.evaluation.roc import edge_roc, node_roc
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.graphs.scores import ScoreMeaning
from circuitfind.graphs.selection import prune_dangling, select_threshold, select_top_n
from circuitfind.graphs import mib
from circuitfind.models import (config_d_model, dtype_name, load_model, model_config,
                                model_tokenizer, parse_dtype, resolve_model_source)
from circuitfind.patching import plan as memory_plan
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.plan import MemoryPlan, ModelShape
from circuitfind.patching.spec import Ablation, parse_memory
from circuitfind.tasks.base import Task, TaskData
from circuitfind.tasks.lookup import get_task
from circuitfind.view.order import VIEW_RANKING, rank_scores


_NO_TASK = "Pass a task name (task='ioi') or prebuilt data (data=...)."


def _task_of(task: str | Task | None, data: TaskData | None) -> Task:
    """The task of ``data`` if given, else the task ``task`` names.

    Raises:
        ConfigError: neither is given.
        UnknownNameError: an unknown task name.
    """
    if data is not None:
        return data.task
    if task is None:
        raise ConfigError(_NO_TASK)
    return get_task(task)


def build_data(model: Any, task: str | Task, n: int | None = None, seed: int = 0) -> TaskData:
    """Build ``task``'s data with the model's tokenizer.

    Args:
        model: A loaded ``TransformerBridge`` (its tokenizer is used).
        task: A registered task name, a prompt file (``.jsonl``/``.csv``/``.json``) or a Task.
        n: Number of examples (default: the task's ``default_n``: 64 for generated tasks,
            every row of a prompt file).
        seed: Data seed.

    Returns:
        The task data; for a metric measured against the full model (``kl``) with
        ``reference_logits`` ``[N, P, V]`` from one plain forward pass of ``model``.

    Raises:
        UnknownNameError: unknown task. TaskDataError: the task does not fit the tokenizer.
        ConfigError: the model has no tokenizer; a task file that does not exist.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError("The model has no tokenizer; load it from a directory that includes "
                          "the tokenizer files, or build TaskData yourself and pass data=.")
    task_obj = get_task(task)
    data = task_obj.build(tokenizer, n=task_obj.default_n if n is None else n, seed=seed)
    if task_obj.needs_reference_logits and data.reference_logits is None:
        data = dataclasses.replace(data, reference_logits=_full_logits(model, data))
    return data


@torch.no_grad()
def _full_logits(model: Any, data: TaskData) -> Tensor:
    """The full model's logits ``[N, P, V]`` (float32, CPU) at ``data.positions``."""
    device = next(model.parameters()).device
    logits = model(data.clean.to(device))  # right-padded: real positions are unaffected
    pos = data.positions.to(device)
    idx = pos[:, :, None].expand(*pos.shape, logits.shape[-1])
    return logits.gather(1, idx).float().cpu()


def score_edges(model: Any, task: str | Task | None = None, algorithm: str | Algorithm = "eap",
                data: TaskData | None = None, n_examples: int | None = None, seed: int = 0,
                algorithm_params: dict[str, Any] | None = None,
                device: str | None = None, ablation: Ablation | str | None = None,
                memory_budget: int | str | None = None,
                dtype: str | torch.dtype | None = None) -> Tensor:
    """Score every edge of the model's graph with an algorithm.

    Args:
        model: A model name, local directory, ``zoo:NAME`` or a loaded ``TransformerBridge``.
        task: Task name, prompt file or Task; ignored when ``data`` is given.
        algorithm: Algorithm name (``eap``, ``exact``, ...) or instance.
        data: Prebuilt task data (default: built from ``task`` with ``n_examples``, ``seed``).
        n_examples: Examples to build (default: the task's ``default_n``).
        algorithm_params: Hyperparameters of the algorithm.
        device: Device for a model loaded here.
        ablation: What a removed edge carries: ``"resample"`` (the task's corrupted run,
            default), ``"zero"``, ``"mean"``, ``"mean_positional"`` or an :class:`Ablation`.
        memory_budget: Bytes the engine may use for one pass (an int or a size such as
            ``"4GiB"``; default 2 GiB): examples, masks and gradient runs are chunked to fit.
        dtype: The dtype a model loaded here loads in (``float32``, the default,
            ``float16``, ``bfloat16`` or ``float64``; a loaded bridge is converted, as
            :func:`load_model` does). Activations, caches and gradients follow it; metrics
            and scores are accumulated wider (README, *Half precision*).

    Returns:
        ``[S, R]`` float32 scores in the task's metric unit (estimated metric change when the
        edge is corrupted).

    Raises:
        ConfigError: neither ``task`` nor ``data``; bad parameters; an unknown ablation or one
            the data cannot supply; an unknown dtype (before anything is loaded).
    """
    if data is None and task is None:
        raise ConfigError(_NO_TASK)
    parse_dtype(dtype)  # an unknown dtype fails before loading
    spec = Ablation.parse(ablation)
    parse_memory(memory_budget)  # a malformed size fails before loading
    budget = memory_budget
    algo = get_algorithm(algorithm, **(algorithm_params or {}))
    task_obj = _task_of(task, data)
    model = load_model(model, device=device, dtype=dtype)
    if data is None:
        data = build_data(model, task_obj, n_examples, seed)
    return algo.score(PatchingEngine(model, ablation=spec, memory_budget=budget), data)


def _select(g: ComputeGraph, scores: Tensor, n_edges: int | None, threshold: float | None,
            absolute: bool, prune: bool, meaning: ScoreMeaning) -> tuple[Circuit, int]:
    """Select edges from scores (top-n or threshold), then prune; returns (circuit, selected)."""
    if n_edges is not None:
        if not isinstance(n_edges, int) or not 0 <= n_edges <= g.n_edges:
            rule = f"an integer between 0 and {g.n_edges} (the graph's edge count)"
            raise ConfigError(f"n_edges must be {rule}; got {n_edges!r}.",
                              cli=f"--edges must be {rule}; got {n_edges!r}.")
        circuit = select_top_n(g, scores, n_edges, absolute=absolute, meaning=meaning)
    else:
        assert threshold is not None  # discover selects 100 edges when given neither
        circuit = select_threshold(g, scores, float(threshold), absolute=absolute,
                                   meaning=meaning)
    selected = circuit.n_edges
    return (prune_dangling(circuit) if prune else circuit), selected


def _view_curve(engine: PatchingEngine, circuit: Circuit, data: TaskData) -> dict[str, Any]:
    """The faithfulness curve over the viewer's edge order (see :func:`discover`'s ``curve``)."""
    n = engine.graph.n_edges
    fractions = sorted(set(DEFAULT_FRACTIONS) | ({circuit.n_edges / n} if circuit.n_edges else
                                                 set()))
    fc = faithfulness_curve(engine, rank_scores(circuit), data, fractions=fractions,
                            convention="single", absolute=True)
    return {"ranking": VIEW_RANKING, "fractions": fc.fractions, "n_edges": fc.n_edges,
            "faithfulness": fc.faithfulness, "metric": fc.metric,
            "metric_full": fc.metric_full, "metric_empty": fc.metric_empty,
            "ablation": fc.ablation,
            "label": ("the viewer's order (kept edges first, then the others, each by the "
                      "selection's key): top round(p·E) edges, not pruned")}


def discover(model: Any, task: str | Task | None = None, algorithm: str | Algorithm = "eap",
             n_edges: int | None = None, threshold: float | None = None,
             data: TaskData | None = None, n_examples: int | None = None, seed: int = 0,
             absolute: bool = True, prune: bool = True,
             algorithm_params: dict[str, Any] | None = None,
             device: str | None = None, context: RunContext | None = None,
             ablation: Ablation | str | None = None,
             memory_budget: int | str | None = None, curve: bool = False,
             dtype: str | torch.dtype | None = None) -> Circuit:
    """Discover a circuit: score edges, select, prune dangling edges, evaluate.

    Args:
        model: A model name, local directory, ``zoo:NAME`` or a loaded ``TransformerBridge``.
        task: Task name, prompt file (``.jsonl``/``.csv``/``.json``) or Task (ignored when
            ``data`` is given).
        algorithm: Algorithm name or instance.
        n_edges: Keep the top ``n_edges`` edges (exclusive with ``threshold``; default 100).
            Not for algorithms that select their circuit themselves (``acdc``,
            ``path_patching``).
        threshold: Keep edges with score (|score| if ``absolute``) >= threshold; for an
            algorithm that selects its circuit itself, its own threshold (ACDC's τ).
        data: Prebuilt task data (default: built with the model's tokenizer).
        n_examples: Examples to build when ``data`` is None (default: the task's
            ``default_n``: 64, or every row of a prompt file).
        seed: Data seed.
        absolute: Rank by |score| (True) or by signed importance (False: the most important
            edges first, as the algorithm's scores mean it; see :mod:`circuitfind.graphs.scores`).
        prune: Remove dangling edges after selection (never changes the circuit's output).
        algorithm_params: Hyperparameters of the algorithm.
        device: Device for a model loaded here.
        context: Checkpoint/progress lifecycle for long algorithms (see
            :mod:`circuitfind.algorithms.lifecycle`).
        ablation: What a removed edge carries, in scoring and in evaluation alike:
            ``"resample"`` (default), ``"zero"``, ``"mean"``, ``"mean_positional"`` or an
            :class:`Ablation`.
        memory_budget: As in :func:`score_edges`; used for scoring and evaluation.
        curve: Also measure the faithfulness curve over the HTML viewer's edge order (kept
            edges first, then the rest, by the selection's key; top ``round(p·E)`` edges at
            MIB's fractions p and at the circuit's own size, not pruned; :mod:`circuitfind.
            view.order`) and store it in ``metadata["faithfulness_curve"]``, which the
            viewer's size slider reads. One more batched masked pass (11 circuits); the
            CLI's ``discover`` does it unless ``--no-view``.
        dtype: As in :func:`score_edges` (recorded in ``metadata["dtype"]``).

    Returns:
        A :class:`Circuit` whose metadata holds model, task, algorithm and parameters, ablation,
        seed, selection, faithfulness report (and curve), wall time and versions; where a
        reference circuit exists for (task, model) (see :func:`find_reference`), also the edge and node ROC AUC
        of the scores against it and its node classes (used to colour the rendering).

    Raises:
        ConfigError: both or invalid ``n_edges``/``threshold``; no task and no data; an
            unknown dtype.
        UnknownNameError: unknown task or algorithm.
        TaskDataError: the task's words are not single tokens under the model's tokenizer.
    """
    if n_edges is not None and threshold is not None:
        raise ConfigError("Pass either n_edges or threshold, not both.")
    start = time.perf_counter()
    if data is None and task is None:
        raise ConfigError(_NO_TASK)
    spec = Ablation.parse(ablation)  # fail fast, before loading
    parse_memory(memory_budget)  # a malformed size fails before loading
    parse_dtype(dtype)
    budget = memory_budget
    params = dict(algorithm_params or {})
    pruning = (algorithm.returns_circuit if isinstance(algorithm, Algorithm)
               else ALGORITHMS.get(algorithm).returns_circuit)
    if pruning:
        if n_edges is not None:
            name = getattr(algorithm, "name", algorithm)
            what = f"The {name!r} algorithm selects its own circuit"
            raise ConfigError(f"{what}; pass its threshold (ACDC's τ) instead of n_edges.",
                              cli=f"{what}; pass --threshold (ACDC's τ) instead of --edges.")
        if threshold is not None:
            if isinstance(algorithm, Algorithm):
                raise ConfigError("Pass the threshold to the algorithm instance, not discover.")
            if params.get("threshold", threshold) != threshold:
                raise ConfigError(f"threshold={threshold} conflicts with the algorithm parameter "
                                  f"threshold={params['threshold']}; pass one.",
                                  cli=f"--threshold {threshold} conflicts with -p threshold="
                                      f"{params['threshold']}; pass one.")
            params["threshold"] = threshold
    elif n_edges is None and threshold is None:
        n_edges = 100
    algo = get_algorithm(algorithm, **params)  # fail fast, before loading
    task_obj = _task_of(task, data)
    model_name = resolve_model_source(model).display_name
    model = load_model(model, device=device, dtype=dtype)
    if data is None:
        data = build_data(model, task_obj, n_examples, seed)
    engine = PatchingEngine(model, ablation=spec, memory_budget=budget)
    g = engine.graph
    meaning = algo.score_meaning(data.task)
    if algo.returns_circuit:
        circuit = algo.discover(engine, data, context)
        if "selection" not in circuit.metadata:
            circuit = circuit.with_metadata(selection={"method": algo.name})
        scores = circuit.scores if circuit.scores is not None else g.full_mask()
        selected, prune = circuit.n_edges, False
    else:
        scores = (algo.score(engine, data, context) if algo.supports_checkpoint
                  else algo.score(engine, data))
        circuit, selected = _select(g, scores, n_edges, threshold, absolute, prune, meaning)
    report = evaluate(engine, circuit, data)
    extra: dict[str, Any] = {}
    if curve and circuit.scores is not None:
        extra["faithfulness_curve"] = _view_curve(
            engine, circuit.with_metadata(scores=meaning.to_dict()), data)
    # references belong to registered tasks, not to user files that happen to share a name
    reference = (find_reference(data.task.name, str(model_name), g)
                 if data.task.source is None else None)
    if reference is not None:
        extra["reference"] = {
            "source": reference.metadata.get("source") or reference.metadata.get("reference"),
            "n_edges": reference.n_edges,
            "edge_auc": edge_roc(scores, reference).auc,
            "node_auc": node_roc(scores, reference).auc}
        if reference.metadata.get("node_classes"):
            extra["node_classes"] = reference.metadata["node_classes"]
    return circuit.with_metadata(**extra,
        model=str(model_name), task=data.task.name, task_source=data.task.source,
        task_arguments=data.task.arguments(),
        task_description=data.task.description, metric=data.task.metric_name,
        metric_unit=data.task.metric_unit, higher_is_better=data.task.higher_is_better,
        d_model=engine.d_model, dtype=dtype_name(engine.dtype),
        scores=meaning.to_dict(), algorithm=algo.name, algorithm_params=algo.get_params(),
        ablation=spec.to_dict(),
        seed=data.seed, n_examples=data.n, selected_edges=selected, pruned=prune,
        faithfulness=report.to_dict(), wall_time_s=round(time.perf_counter() - start, 3),
        versions=versions())


def find_reference(task: str, model_name: str, graph: ComputeGraph) -> Circuit | None:
    """The reference circuit for ``task`` on the named model, or ``None`` if there is none.

    Every reference comes from the registry of :mod:`circuitfind.tasks.references`: the
    literature's (``ioi``/``greater_than`` on GPT-2 small) and the zoo organisms' (registered
    as ``zoo:NAME`` by :mod:`circuitfind.zoo`).
    """
    from circuitfind.tasks.references import NoReferenceError, reference_circuit

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


def check(model: Any, task: str | Task | None = None, data: TaskData | None = None,
          n_examples: int | None = None, seed: int = 0, per_example: bool = False,
          device: str | None = None, dtype: str | torch.dtype | None = None) -> CheckResult:
    """Whether a model does a task: accuracy and the metric on clean vs corrupted prompts.

    Args:
        model: A model name, local directory, ``zoo:NAME`` or a loaded ``TransformerBridge``.
        task: Task name, prompt file or Task (ignored when ``data`` is given).
        data: Prebuilt task data.
        n_examples, seed: Data to build (default: the task's ``default_n``).
        per_example: Also return one row per example.
        device: Device for a model loaded here.
        dtype: As in :func:`score_edges`.

    Returns:
        A :class:`~circuitfind.evaluation.check.CheckResult` (``.verdict`` in one line).

    Raises:
        ConfigError: neither ``task`` nor ``data``; an unknown dtype.
    """
    parse_dtype(dtype)  # an unknown dtype fails before loading
    task_obj = _task_of(task, data)
    model_name = resolve_model_source(model).display_name
    model = load_model(model, device=device, dtype=dtype)
    if data is None:
        data = build_data(model, task_obj, n_examples, seed)
    return check_data(model, data, per_example=per_example, model_name=str(model_name))


def export_mib(circuit_or_scores: Circuit | Tensor, path: str | os.PathLike[str], *,
               graph: ComputeGraph | None = None, d_model: int | None = None,
               task: str | None = None, model: str | None = None,
               higher_is_better: bool | None = None, provenance: bool = True,
               overwrite: bool = False) -> Path:
    """Write MIB circuit-track JSON: :func:`circuitfind.graphs.mib.export_mib`, reading
    ``d_model`` from the model's config (:func:`~circuitfind.models.config_d_model`) when
    neither ``d_model`` nor the circuit's metadata give it (circuits saved before
    :func:`discover` recorded it).

    Args:
        circuit_or_scores, path, graph, d_model, task, model, higher_is_better, provenance,
            overwrite: As in :func:`circuitfind.graphs.mib.export_mib`.

    Returns:
        The file written.

    Raises:
        ConfigError: as :func:`circuitfind.graphs.mib.export_mib`; no config to read
            ``d_model`` from.
        OutputExistsError: the file exists and ``overwrite`` is False.
    """
    if (d_model is None and isinstance(circuit_or_scores, Circuit)
            and circuit_or_scores.metadata.get("d_model") is None
            and circuit_or_scores.metadata.get("model")):
        d_model = config_d_model(str(circuit_or_scores.metadata["model"]))
    return mib.export_mib(circuit_or_scores, path, graph=graph, d_model=d_model, task=task,
                          model=model, higher_is_better=higher_is_better,
                          provenance=provenance, overwrite=overwrite)


def plan(model: Any, task: str | Task | None = None, algorithm: str | Algorithm = "eap",
         examples: int | None = None, device: str = "cpu", memory: int | str | None = None,
         dtype: str | torch.dtype | None = None, seq_len: int | None = None,
         positions: int | None = None, seed: int = 0,
         algorithm_params: dict[str, Any] | None = None) -> MemoryPlan:
    """What a run will need, from the model's config alone: peak memory by part, chunks, time.

    No weights are loaded: the model's shape comes from its Hugging Face config (a local
    directory's or zoo organism's ``config.json``, a hub model's in the local cache; the
    parameter count from the model built on the ``meta`` device), so a Llama-3.1-8B config
    plans in seconds. The prompts' length comes from the task's data built with the model's
    tokenizer (cheap) or from ``seq_len``. The plan is the memory model the engine sizes its
    chunks with (:mod:`circuitfind.patching.plan`), so a run with the same budget makes the
    same chunks.

    Args:
        model: A hub name, local directory, ``zoo:NAME``, or a loaded bridge.
        task: Task name, prompt file or Task (for the prompts' length and the examples).
        algorithm: Algorithm name or instance (its :meth:`Algorithm.workload`).
        examples: Examples N (default: the task's ``default_n``; 1 with ``seq_len`` and no
            task).
        device: Where it would run (``cpu``, ``cuda``); recorded in the plan.
        memory: The budget, weights included: bytes or a size such as ``"80GiB"`` (default:
            the weights plus 2 GiB, as the engine's default).
        dtype: The dtype it would load in (default float32, as :func:`load_model`).
        seq_len: Tokens per prompt (default: from the task's data).
        positions: Metric positions per example (default: from the task's data, else 1).
        seed: Data seed (for the task's data).
        algorithm_params: The algorithm's hyperparameters.

    Returns:
        The :class:`~circuitfind.patching.plan.MemoryPlan` (``.summary()``, ``.to_dict()``,
        ``.fits``, ``.peak``, ``.minimum``). A budget too small for one example gives a plan
        with ``fits`` False and the minimum, not an error.

    Raises:
        ConfigError: neither a task nor ``seq_len``; no tokenizer at hand and no ``seq_len``;
            a malformed budget or dtype.
        ModelLoadError: no config to read (a hub model not in the local cache).
        UnknownNameError: an unknown task or algorithm.
    """
    algo = get_algorithm(algorithm, **(algorithm_params or {}))
    if memory is not None:
        parse_memory(memory)  # a malformed size fails first
    if task is None and seq_len is None:
        raise ConfigError("Pass a task (its data give the prompts' length) or seq_len=.",
                          cli="Pass --task (its data give the prompts' length) or --seq-len.")
    source = resolve_model_source(model)
    if source.kind == "bridge":
        shape = ModelShape.from_model(source.location)
        if dtype is not None:
            shape = shape.with_dtype(dtype)
    else:
        shape = ModelShape.from_config(model_config(model), dtype, name=source.display_name)
    data = None
    if seq_len is None:
        tokenizer = model_tokenizer(model)
        if tokenizer is None:
            raise ConfigError(f"No tokenizer of {source.display_name!r} is at hand to build the "
                              "task's data; pass seq_len= (the prompts' length in tokens).",
                              cli=f"No tokenizer of {source.display_name!r} is at hand to "
                                  "build the task's data; pass --seq-len.")
        task_obj = _task_of(task, None)
        data = task_obj.build(tokenizer, n=examples or task_obj.default_n, seed=seed)
        n = data.n
        positions = positions or int(data.positions.shape[1])
    else:
        if task is not None and examples is None:
            examples = get_task(task).default_n
        n = examples or 1
    positions = positions or 1
    work = algo.workload(ComputeGraph(shape.n_layers, shape.n_heads, shape.n_kv_heads,
                                      attn_only=shape.attn_only, parallel_attn_mlp=shape.parallel))
    if data is not None:  # as the engine sizes them: masked passes stop at the last metric
        # position (a causal model), gradient attribution reads the whole prompts
        seq_len = (int(data.positions.max()) + 1 if shape.runner and work.gradient_points is None
                   else data.seq_len)
    budget = memory_plan.resolve_budget(memory, shape)
    assert seq_len is not None  # from the data, or given

    def make(budget_: int) -> MemoryPlan:
        if work.gradient_points is not None:
            return memory_plan.attribution_plan(
                shape, n, seq_len, work.gradient_points, budget_, work.batch_size, positions,
                algorithm=algo.name, device=device, plain_forwards=work.plain_forwards)
        return memory_plan.masked_plan(
            shape, n, seq_len, budget_, n_buffer=work.n_buffer, batch_size=work.batch_size,
            masks_cap=work.masks_cap, tests=work.masked_tests, positions=positions,
            algorithm=algo.name, device=device)

    try:
        return make(budget)
    except ConfigError:  # too small for one example: the plan says what it needs
        smallest = make(make(2**62).minimum)
        return dataclasses.replace(smallest, budget=budget, examples_per_pass=0,
                                   points_per_pass=0, max_examples=0 if smallest.max_examples
                                   is not None else None)
