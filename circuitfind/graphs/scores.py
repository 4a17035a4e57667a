"""What a circuit's edge scores mean: their kind, unit and which way is "important".

Algorithms produce two kinds of edge score:

- ``metric_change`` (EAP, EAP-IG, clean-corrupted, exact patching, path patching, ACDC with the
  task-metric objective): an estimate of ``metric(circuit without the edge) - metric(full)``
  in the task metric's unit. Whether a large or a small value marks an important edge depends
  on the metric's direction: for a higher-is-better metric (logit difference) the edges the
  behaviour relies on have the most *negative* scores; for a lower-is-better one (KL
  divergence to the full model) the most positive.
- ``importance`` (ACDC with its default KL objective): the increase of the KL divergence to
  the full model (nats) when the edge is removed; larger is more important.

Every circuit declares its scores' meaning in ``metadata["scores"]`` (:meth:`ScoreMeaning.
to_dict`); every consumer (selection, faithfulness curves, the report, the MIB export, the
leaderboard, drawings) reads it through :func:`score_meaning`, which also infers it for circuits
saved before the field existed (from the algorithm, its objective and the task).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from circuitfind.errors import ConfigError

SCORE_KINDS: tuple[str, ...] = ("metric_change", "importance")
"""The kinds of edge score (see the module docstring)."""


@dataclass(frozen=True)
class ScoreMeaning:
    """The meaning of a set of edge scores.

    Attributes:
        kind: ``"metric_change"`` or ``"importance"`` (see the module docstring).
        unit: The scores' unit (``logits``, ``nats``, ``probability``).
        higher_is_better: For ``metric_change``: whether the task metric is higher-is-better
            (then important edges have negative scores). Ignored for ``importance``.
        what: Optional short name of the quantity (``"KL divergence to the full model"``).

    Raises:
        ConfigError: an unknown kind.
    """

    kind: str = "metric_change"
    unit: str = ""
    higher_is_better: bool = True
    what: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SCORE_KINDS:
            raise ConfigError(f"Unknown score kind {self.kind!r}; choose one of "
                              f"{list(SCORE_KINDS)} ('importance' for scores that grow with an "
                              "edge's importance, such as ACDC's KL effects).")

    @property
    def sign(self) -> float:
        """``+1`` or ``-1``: ``sign * score`` grows with an edge's importance."""
        if self.kind == "importance" or not self.higher_is_better:
            return 1.0
        return -1.0

    def importance(self, scores: Tensor) -> Tensor:
        """``sign * scores``: larger is more important (MIB's signed ranking)."""
        return scores if self.sign == 1.0 else -scores

    def describe(self) -> str:
        """One sentence for reports: what a score is, in which unit."""
        unit = f" ({self.unit})" if self.unit else ""
        if self.kind == "importance":
            what = self.what or "the objective"
            return (f"increase of {what}{unit} when the edge is removed (an importance: larger "
                    "is more important).")
        direction = ("the most important edges have the most negative scores (removing them "
                     "lowers the metric)" if self.higher_is_better else
                     "the most important edges have the most positive scores")
        return (f"estimated change of the metric{unit} when the edge is removed; {direction}.")

    def sign_labels(self) -> tuple[str, str]:
        """Legend labels, when edges are coloured by sign, of an edge whose score marks it as
        one the behaviour relies on (``sign * score > 0``) and of one whose removal would
        help."""
        if self.kind == "importance":
            what = self.what or "the objective"
            return (f"important (removing it raises {what})", f"removing it lowers {what}")
        return ("helps the metric", "hurts the metric")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, as stored in ``metadata["scores"]``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> ScoreMeaning:
        """The inverse of :meth:`to_dict` (unknown keys are ignored)."""
        return cls(kind=str(value.get("kind", "metric_change")), unit=str(value.get("unit", "")),
                   higher_is_better=bool(value.get("higher_is_better", True)),
                   what=str(value.get("what", "")))


def score_meaning(metadata: Mapping[str, Any] | None) -> ScoreMeaning:
    """The meaning of a circuit's scores, from its metadata.

    Reads ``metadata["scores"]``; for circuits saved before that field, infers it: ACDC with its
    KL objective (the default) scores importances in nats; every other algorithm scores
    metric changes in ``metadata["metric_unit"]``, in the direction of
    ``metadata["higher_is_better"]`` (higher is better unless the metric is a KL divergence).

    Args:
        metadata: A circuit's metadata (``None``: a plain metric change).

    Returns:
        The :class:`ScoreMeaning`.
    """
    md = dict(metadata or {})
    if isinstance(md.get("scores"), Mapping):
        return ScoreMeaning.from_dict(md["scores"])
    params = md.get("algorithm_params") or {}
    if md.get("algorithm") == "acdc" and params.get("objective", "kl") == "kl":
        return ScoreMeaning("importance", "nats", True, "the KL divergence to the full model")
    higher = md.get("higher_is_better")
    if not isinstance(higher, bool):
        higher = "kl" not in str(md.get("metric", "")).lower()
    return ScoreMeaning("metric_change", str(md.get("metric_unit") or ""), higher)


def meaning_known(metadata: Mapping[str, Any] | None) -> bool:
    """Whether ``metadata`` says (or lets :func:`score_meaning` infer) what its scores mean:
    a ``scores`` entry, the metric's direction, the metric, the task or the algorithm."""
    md = metadata or {}
    return any(md.get(key) is not None
               for key in ("scores", "higher_is_better", "metric", "task", "algorithm"))
