"""What an algorithm optimises: the task metric, or KL divergence to the full model.

An :class:`Objective` turns the logits of K circuits at the metric positions into K numbers:

- ``metric``: the task's metric averaged over examples, in its unit (``higher_is_better`` is the
  task's direction);
- ``kl``: ``KL(p_M || p_C)``, the KL divergence (nats) of the circuit's next-token distribution
  from the full model's at the metric positions, averaged over positions and examples (Conmy et
  al. 2023 §3; the reference ACDC code's ``kl_divergence``); lower is better, 0 for the full
  model.

:meth:`Objective.worsening` converts a change of the value into "how much worse" (positive =
worse) whatever the direction, which is what threshold tests compare.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError
from circuitfind.patching.spec import Ablation

OBJECTIVES = ("kl", "metric")

KL_CHUNK_BYTES = 32 << 20
"""Most bytes of float64 log-probabilities :meth:`Objective.evaluate` holds at once (masks are
taken in groups that fit; at least one mask per group)."""


class Objective:
    """Value of circuits under the task metric or KL divergence to the full model.

    Args:
        kind: ``"kl"`` or ``"metric"``.

    Raises:
        ConfigError: an unknown kind.
    """

    def __init__(self, kind: str = "kl") -> None:
        if kind not in OBJECTIVES:
            raise ConfigError(f"Unknown objective {kind!r}; use one of {', '.join(OBJECTIVES)} "
                              "('kl': KL divergence to the full model, 'metric': the task "
                              "metric).")
        self.kind = kind
        self._ref: Tensor | None = None  # full-model log-probabilities for KL [N, P, V]
        self._ref_p: Tensor | None = None  # their exp (probability) [N, P, V]
        self.higher_is_better = False
        self.unit = "nats"

    def prepare(self, engine: Any, data: Any, ablation: Ablation | str | None = None) -> None:
        """Cache what the objective needs (the full model's log-probabilities for KL)."""
        if self.kind == "metric":
            self.higher_is_better = bool(getattr(data.task, "higher_is_better", True))
            self.unit = str(getattr(data.task, "metric_unit", ""))
            return
        full = engine.graph.full_mask(engine.dtype)
        self._ref = torch.log_softmax(engine.run(data, full, ablation=ablation)[0].double(), -1)
        self._ref_p = self._ref.exp()  # the full model's probabilities, once

    def evaluate(self, engine: Any, data: Any, masks: Tensor,
                 ablation: Ablation | str | None = None) -> Tensor:
        """The objective of each circuit in ``masks`` (``[K, S, R]`` keep-masks).

        Returns:
            ``[K]`` float64 on the CPU, in :attr:`unit`.
        """
        if self.kind == "metric":
            return engine.evaluate(data, masks, ablation=ablation).double()
        if self._ref is None or self._ref_p is None:
            raise ConfigError("Objective.prepare(engine, data) must be called before evaluate "
                              "for the 'kl' objective.")
        logits = engine.run(data, masks, ablation=ablation)  # [K, N, P, V]
        ref, p = self._ref.to(logits.device), self._ref_p.to(logits.device)
        kl = torch.empty(logits.shape[0], dtype=torch.float64)
        # masks in groups of at most KL_CHUNK_BYTES of float64 log-probabilities (Gemma-2's
        # vocabulary: 2 MB per row), each in a few operations for the whole group
        per = max(1, KL_CHUNK_BYTES // max(1, 8 * logits[0].numel()))
        for k0 in range(0, logits.shape[0], per):
            lp = torch.log_softmax(logits[k0: k0 + per].double(), -1)  # [k, N, P, V]
            # sum_v p (ref - lp), as -sum_v p (lp - ref) (the same numbers: negation is exact)
            kl[k0: k0 + per] = lp.sub_(ref).mul_(p).sum(-1).flatten(1).mean(1).neg_().cpu()
        return kl

    def worsening(self, change: Tensor | float) -> Any:
        """How much worse a change of the value is (positive = worse)."""
        return -change if self.higher_is_better else change

    def __repr__(self) -> str:
        return f"Objective({self.kind!r})"


__all__ = ["OBJECTIVES", "Objective"]
