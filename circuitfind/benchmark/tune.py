"""Threshold search: the smallest circuit that reaches a target faithfulness, as an Optuna study.

Method. A pruning algorithm's threshold τ (ACDC) trades circuit size for faithfulness. Each
trial draws τ on a log scale in ``[low, high]`` (Optuna's TPE sampler), runs the algorithm,
and measures the circuit's size and normalized faithfulness ``f = (m(C) - m(∅)) / (m(M) - m(∅))``
(:func:`circuitfind.evaluate`). The trial's value (minimised) is the number of edges when
``f >= target`` and ``E + E * (target - f)`` otherwise (worse than any feasible circuit, and
less bad the closer it gets), so the best trial is the smallest circuit reaching the target.
Each trial stores ``n_edges``, ``faithfulness`` and ``threshold`` as user attributes.

The range. ACDC removes an edge when removing it worsens its objective by less than τ, so the
useful τ lie within the spread of single-edge effects: a τ above them all prunes everything, one
below them all keeps everything. Unless ``low``/``high`` are given, :func:`tau_range` measures
the objective's change when each of up to 256 sampled edges is removed from the full model (one
batched masked pass) and searches from a tenth of the median positive effect (most edges kept)
to the largest (all but the few edges that matter most pruned). Each trial is reported as
``trial 3: τ 0.001078 → 97 of 1701 edges, faithfulness 0.910`` on the ``circuitfind.progress``
logger (the command line prints it), and :attr:`TuneResult.explanation` names the best trial
and why (the smallest circuit reaching the target) or, when none reached it, the most
faithful one and where to search next.

Distributed. The study lives in an Optuna storage given as a URL: SQLite by default
(``sqlite:///tune.db``), any Optuna RDB URL (PostgreSQL, MySQL) so that workers on several
machines share one study: each worker runs the same command pointed at the same storage and
study name. Create the study once before starting workers (:func:`create_study`, or
``circuitfind tune --trials 0``): concurrent creation on a fresh SQLite file races.

References:
    Akiba et al. (2019), "Optuna: A Next-generation Hyperparameter Optimization Framework";
    Conmy et al. (2023) sweep ACDC's threshold the same way to trade size for faithfulness.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from circuitfind._progress import LOGGER as progress_log
from circuitfind._progress import shown
from circuitfind.algorithms.base import ALGORITHMS, get_algorithm
from circuitfind.api import build_data
from circuitfind.benchmark.storage import open_storage, optuna_module
from circuitfind.errors import ConfigError
from circuitfind.evaluation.faithfulness import evaluate
from circuitfind.models import load_model, parse_dtype
from circuitfind.patching.engine import PatchingEngine
from circuitfind.tasks.base import TaskData

DEFAULT_STORAGE = "sqlite:///tune.db"


@dataclass(frozen=True)
class TuneResult:
    """Outcome of a threshold search.

    Attributes:
        study_name: The Optuna study.
        storage: Its storage URL.
        n_trials: Finished trials in the study (all workers).
        threshold: τ of the best trial (``None`` when no trial reached the target).
        n_edges: Edges of the best circuit.
        faithfulness: Its normalized faithfulness.
        target: The target faithfulness.
        trial: Number of the best trial in the study (``None`` when none reached the target).
        explanation: One sentence saying which trial is best and why (the smallest circuit
            reaching the target), or, when none reached it, which came closest and what to
            try; the command line prints it.
    """

    study_name: str
    storage: str
    n_trials: int
    threshold: float | None
    n_edges: int | None
    faithfulness: float | None
    target: float
    trial: int | None = None
    explanation: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


def create_study(storage: str = DEFAULT_STORAGE, study_name: str = "circuitfind-tune",
                 seed: int = 0) -> Any:
    """Create (or load) the study: call once before starting several workers.

    Args:
        storage: An Optuna storage URL (``sqlite:///path.db``, ``postgresql://...``).
        study_name: The study's name.
        seed: Seed of the TPE sampler of this process.

    Returns:
        The ``optuna.Study``.

    Raises:
        ConfigError: a storage URL that cannot be opened.
    """
    optuna = optuna_module()
    return optuna.create_study(storage=open_storage(storage), study_name=study_name,
                               direction="minimize", load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=seed))


SAMPLED_EDGES = 256
"""Edges whose single-edge effects set the automatic τ range."""


def tau_range(engine: PatchingEngine, data: TaskData, objective: str = "kl",
              sample: int = SAMPLED_EDGES, seed: int = 0) -> tuple[float, float, int]:
    """The τ range worth searching, from single-edge effects (see the module docstring).

    Args:
        engine: The engine over the model.
        data: Task data.
        objective: ACDC's objective (``"kl"`` or ``"metric"``).
        sample: Edges to measure (all when the graph has fewer).
        seed: Sampling seed.

    Returns:
        ``(low, high, measured edges)``; ``(1e-4, 1.0, n)`` when no edge matters at all.
    """
    from circuitfind.algorithms.objective import Objective

    g = engine.graph
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(g.n_edges, generator=gen)[:sample]
    pairs = g.edge_pairs[ids]
    full = g.full_mask(engine.dtype)
    masks = full.expand(len(ids), -1, -1).clone()
    masks[torch.arange(len(ids)), pairs[:, 0], pairs[:, 1]] = 0
    obj = Objective(objective)
    obj.prepare(engine, data)
    values = obj.evaluate(engine, data, torch.cat([full[None], masks]))
    effects = (values[1:] - values[0]).abs() if objective == "metric" else values[1:] - values[0]
    positive = effects[effects > 0]
    if not len(positive):
        return 1e-4, 1.0, len(ids)
    # a tenth of the median effect keeps most edges; the largest effect prunes all but the
    # few that matter most
    low = float(torch.quantile(positive, 0.5)) / 10
    high = float(positive.max())
    return low, max(high, low * 100), len(ids)


def tune(model: Any, task: str | None = None, algorithm: str = "acdc", target: float = 0.9,
         n_trials: int = 20, low: float | None = None, high: float | None = None,
         storage: str = DEFAULT_STORAGE, study_name: str = "circuitfind-tune",
         data: TaskData | None = None, n_examples: int = 64, seed: int = 0,
         algorithm_params: dict[str, Any] | None = None, device: str | None = None,
         sampler_seed: int | None = None, dtype: str | torch.dtype | None = None) -> TuneResult:
    """Search the threshold τ for the smallest circuit with normalized faithfulness >= target.

    Args:
        model: Model name, local directory, ``zoo:NAME`` or a loaded bridge.
        task: Task name (ignored when ``data`` is given).
        algorithm: A pruning algorithm with a ``threshold`` parameter (``acdc``).
        target: Normalized faithfulness to reach, in (0, 1] (default 0.9).
        n_trials: Trials this worker runs (0: only create the study).
        low, high: Search range of τ (log scale), ``0 < low < high`` (default: from the
            single-edge effects, :func:`tau_range`).
        storage: Optuna storage URL (default ``sqlite:///tune.db`` in the working directory).
        study_name: Study name (workers sharing a study use the same one).
        data, n_examples, seed: Task data, or how to build it.
        algorithm_params: Other hyperparameters of the algorithm (not ``threshold``).
        device: Device for a model loaded here.
        sampler_seed: Seed of this worker's sampler (default: ``seed``; give workers
            different seeds).
        dtype: The dtype a model loaded here loads in (default float32; see
            :func:`circuitfind.score_edges`).

    Returns:
        A :class:`TuneResult` summarising the whole study (every worker's trials).

    Raises:
        ConfigError: a bad target, range or trial count, an algorithm without a threshold,
            ``threshold`` in ``algorithm_params``, an unknown dtype, or a storage URL that
            cannot be opened.
    """
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ConfigError(f"target must be a normalized faithfulness in (0, 1]; got {target!r}.")
    if not (isinstance(n_trials, int) and n_trials >= 0):
        raise ConfigError(f"n_trials must be an int >= 0; got {n_trials!r}.")
    if (low is None) != (high is None):
        raise ConfigError("Give both ends of the threshold range (low and high), or neither "
                          "(then it is derived from the single-edge effects).")
    if low is not None and high is not None and not (0 < low < high and math.isfinite(high)):
        raise ConfigError(f"The threshold range must satisfy 0 < low < high < inf; got "
                          f"low={low}, high={high}.")
    params = dict(algorithm_params or {})
    if "threshold" in params:
        raise ConfigError("tune searches the threshold itself; remove it from algorithm_params.")
    cls = ALGORITHMS.get(algorithm)
    if not cls.returns_circuit or "threshold" not in cls().get_params():
        raise ConfigError(f"tune searches the threshold of a pruning algorithm (acdc); "
                          f"{algorithm!r} has none.")
    params.setdefault("progress", False)
    get_algorithm(algorithm, **params)  # validate before loading anything
    parse_dtype(dtype)
    optuna = optuna_module()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our one line per trial instead
    try:
        return _tune(model, task, algorithm, target, n_trials, low, high, storage, study_name,
                     data, n_examples, seed, params, device, sampler_seed, dtype)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _tune(model: Any, task: str | None, algorithm: str, target: float, n_trials: int,
          low: float | None, high: float | None, storage: str, study_name: str,
          data: TaskData | None, n_examples: int, seed: int, params: dict[str, Any],
          device: str | None, sampler_seed: int | None,
          dtype: str | torch.dtype | None = None) -> TuneResult:
    """:func:`tune` after its arguments are checked."""
    study = create_study(storage, study_name, seed if sampler_seed is None else sampler_seed)
    if n_trials:
        if data is None and task is None:
            raise ConfigError("Pass a task name or prebuilt data.")
        model = load_model(model, device=device, dtype=dtype)
        if data is None:
            assert task is not None  # checked above
            data = build_data(model, task, n_examples, seed)
        engine = PatchingEngine(model)
        total = engine.graph.n_edges
        if low is None:
            low, high, measured = tau_range(engine, data, params.get("objective", "kl"))
            if shown():
                progress_log.info(f"τ range {low:.3g} to {high:.3g}, from the effects of "
                                  f"{measured} single edges")

        def objective(trial: Any) -> float:
            tau = trial.suggest_float("threshold", low, high, log=True)
            circuit = get_algorithm(algorithm, threshold=tau, **params).discover(engine, data)
            faith = evaluate(engine, circuit, data).faithfulness
            trial.set_user_attr("n_edges", circuit.n_edges)
            trial.set_user_attr("faithfulness", faith)
            trial.set_user_attr("threshold", tau)
            trial.set_user_attr("total_edges", total)
            mark = " (reaches the target)" if faith >= target else ""
            if shown():
                progress_log.info(_trial_line(trial) + mark)
            if math.isnan(faith):
                return float(2 * total)
            return float(circuit.n_edges if faith >= target else total + total * (target - faith))

        study.optimize(objective, n_trials=n_trials)
    return summarize(study, storage, target)


def summarize(study: Any, storage: str, target: float) -> TuneResult:
    """The smallest circuit reaching ``target`` among the study's finished trials.

    Args:
        study: The ``optuna.Study`` (every worker's trials).
        storage: Its storage URL (recorded in the result).
        target: The normalized faithfulness to reach.

    Returns:
        A :class:`TuneResult`: the best trial (fewest edges among those reaching ``target``;
        ties: the largest τ) and an explanation naming it, or the most faithful trial when
        none reached ``target``.
    """
    optuna = optuna_module()
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.COMPLETE and "n_edges" in t.user_attrs]
    ok = [t for t in done if _faith(t) >= target]
    best = min(ok, key=lambda t: (t.user_attrs["n_edges"], -t.user_attrs["threshold"]),
               default=None)
    if best is not None:
        ties = sum(t.user_attrs["n_edges"] == best.user_attrs["n_edges"] for t in ok)
        why = (f"best: {_trial_line(best)} — the smallest circuit reaching normalized "
               f"faithfulness {target:g} ({len(ok)} of {len(done)} trials reached it"
               + ("; of equal sizes, the largest τ" if ties > 1 else "") + ")")
    elif done:
        closest = max(done, key=lambda t: (_faith(t), -t.user_attrs["n_edges"]))
        why = (f"no trial reached normalized faithfulness {target:g}; the most faithful: "
               f"{_trial_line(closest)}. Smaller τ keep more edges: search below "
               f"τ {closest.user_attrs['threshold']:.4g}, or lower the target")
    else:
        why = "no finished trial yet"
    return TuneResult(study_name=study.study_name, storage=storage, n_trials=len(done),
                      threshold=None if best is None else best.user_attrs["threshold"],
                      n_edges=None if best is None else best.user_attrs["n_edges"],
                      faithfulness=None if best is None else best.user_attrs["faithfulness"],
                      target=float(target), trial=None if best is None else best.number,
                      explanation=why)


def _faith(trial: Any) -> float:
    value = trial.user_attrs.get("faithfulness")
    return value if isinstance(value, (int, float)) and not math.isnan(value) else -math.inf


def _trial_line(trial: Any) -> str:
    """``trial 3: τ 0.001078 → 97 of 1701 edges, faithfulness 0.910`` (as the trials print)."""
    attrs = trial.user_attrs
    total = attrs.get("total_edges")
    of = f" of {total}" if total is not None else ""
    return (f"trial {trial.number}: τ {attrs['threshold']:.4g} → {attrs['n_edges']}{of} "
            f"edges, faithfulness {attrs['faithfulness']:.3f}")
