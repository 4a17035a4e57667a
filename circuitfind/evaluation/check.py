"""Does the model do the task? Accuracy and the metric on clean and corrupted prompts.

Before looking for a circuit, check that there is a behaviour to explain: :func:`check` runs the
full model on the clean prompts and on the corrupted ones (one batched pass through the engine:
the full circuit and the empty circuit, whose removed edges carry the corrupted run) and reports
the task metric on both, read at the clean prompts' metric positions with the clean answers, and
the accuracy on clean prompts as the task defines a correct answer
(:meth:`~circuitfind.tasks.base.Task.correct`: by default the answer's logit beats every wrong
answer's; greater-than asks for a later year, induction for the top-1 token).

Noise. The task is flagged as noise for the model when the gap m(clean) − m(corrupted) does not
point the metric's way or is smaller than the standard deviation of the clean metric over the
examples (an effect size below one): stories260k has no induction heads, and its induction gap
of 0.14 nats against a spread of 1.4 is flagged. Every faithfulness number on such a task
measures noise too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from circuitfind.patching.engine import PatchingEngine
from circuitfind.tasks.base import TaskData


@dataclass(frozen=True)
class CheckResult:
    """How the full model does on a task.

    Attributes:
        task, model: Names.
        n_examples: Examples checked.
        metric_name, metric_unit: The task metric and its unit (logits, nats, probability).
        higher_is_better: The metric's direction.
        accuracy: Fraction of (example, metric position) pairs the model answers correctly on
            the clean prompts, as the task's :meth:`~circuitfind.tasks.base.Task.correct`
            defines it (by default the best answer's logit beats every wrong answer's).
        accuracy_description: That definition in words.
        clean, corrupted: ``{"mean", "std", "min", "max"}`` of the per-example metric on the
            clean and on the corrupted prompts (the latter read with the clean answers).
        gap: ``mean(clean) − mean(corrupted)``, in the metric's unit.
        noise: The gap is small (below one standard deviation of the clean metric, or in the
            wrong direction): the model does not show the behaviour.
        examples: Per-example rows when asked for: ``example`` (index), ``prompt`` (the clean
            prompt, its last 60 characters), ``answer`` and ``wrong`` (token strings, padding
            dropped), ``clean`` and ``corrupted`` (the metric), ``correct`` (at every metric
            position).
    """

    task: str
    model: str
    n_examples: int
    metric_name: str
    metric_unit: str
    higher_is_better: bool
    accuracy: float
    accuracy_description: str
    clean: dict[str, float]
    corrupted: dict[str, float]
    gap: float
    noise: bool
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """One line: whether the model does the task, with the numbers that say so."""
        unit = f" {self.metric_unit}" if self.metric_unit else ""
        numbers = (f"{self.metric_name} {self.clean['mean']:.3g} ± {self.clean['std']:.2g}{unit} "
                   f"clean vs {self.corrupted['mean']:.3g} ± {self.corrupted['std']:.2g} "
                   f"corrupted, accuracy {100 * self.accuracy:.0f}%")
        if self.noise:
            return (f"the model does NOT clearly do {self.task}: {numbers}; the gap "
                    f"{self.gap:.3g}{unit} is within the spread, so circuits and faithfulness "
                    "on this task would measure noise")
        return f"the model does {self.task}: {numbers} (gap {self.gap:.3g}{unit})"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable), with ``verdict``."""
        return {**asdict(self), "verdict": self.verdict}


def _summary(values: Tensor) -> dict[str, float]:
    v = values.double()
    return {"mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def _tokens(tokenizer: Any, ids: Tensor) -> list[str] | list[int]:
    """The tokens of ``ids`` (``-1`` padding dropped), as strings where a tokenizer is known."""
    real = [int(i) for i in ids.reshape(-1).tolist() if i >= 0]
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    return [str(t) for t in convert(real)] if convert is not None else real


def check(model: Any, data: TaskData, per_example: bool = False,
          model_name: str | None = None) -> CheckResult:
    """Whether ``model`` does the task of ``data``: accuracy and the metric, clean vs corrupted.

    Args:
        model: A ``TransformerBridge`` or a :class:`PatchingEngine`.
        data: Task data (e.g. :func:`circuitfind.build_data`).
        per_example: Also return one row per example.
        model_name: Name for the result (default: the model's config name).

    Returns:
        A :class:`CheckResult`.

    Raises:
        ConfigError: data that do not fit the model (token ids out of range).
    """
    engine = model if isinstance(model, PatchingEngine) else PatchingEngine(model)
    g = engine.graph
    masks = torch.stack([g.full_mask(engine.dtype), torch.zeros_like(g.full_mask(engine.dtype))])
    with torch.no_grad():
        logits = engine.run(data, masks, ablation="resample")  # [2, N, P, V]
    on_device = engine.on_device(data)
    clean = on_device.metric(logits[0]).double().cpu()
    corrupted = on_device.metric(logits[1]).double().cpu()
    correct = data.task.correct(logits[0], on_device).cpu()  # [N, P]
    higher = bool(getattr(data.task, "higher_is_better", True))
    gap = float(clean.mean() - corrupted.mean())
    spread = float(clean.std()) if data.n > 1 else 0.0
    toward = gap if higher else -gap
    noise = not (toward > 0 and (math.isnan(spread) or toward > spread))
    rows: list[dict[str, Any]] = []
    if per_example:
        tokenizer = getattr(engine.model, "tokenizer", None)
        for i in range(data.n):
            prompt = (data.clean_prompts[i] if data.clean_prompts else "")
            rows.append({
                "example": i, "prompt": prompt if len(prompt) <= 60 else "…" + prompt[-59:],
                "answer": _tokens(tokenizer, data.answers[i]),
                "wrong": _tokens(tokenizer, data.wrong_answers[i]),
                "clean": float(clean[i]), "corrupted": float(corrupted[i]),
                "correct": bool(correct[i].all())})
    name = model_name or str(getattr(getattr(engine.model, "cfg", None), "model_name", "model"))
    return CheckResult(
        task=data.task.name, model=name, n_examples=data.n, metric_name=data.task.metric_name,
        metric_unit=data.task.metric_unit, higher_is_better=higher,
        accuracy=float(correct.double().mean()),
        accuracy_description=str(getattr(data.task, "accuracy_description", "")),
        clean=_summary(clean), corrupted=_summary(corrupted), gap=gap, noise=noise, examples=rows)
