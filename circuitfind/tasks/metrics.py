"""Per-example metrics on logits gathered at the metric positions.

All functions take logits ``[..., N, P, V]`` (any leading batch-of-circuits dimensions) and
return ``[..., N]``. Units are stated per function.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _take(values: Tensor, ids: Tensor) -> Tensor:
    """values ``[..., N, V]``, ids ``[N, k]`` -> ``[..., N, k]``."""
    idx = ids.expand(*values.shape[:-1], ids.shape[-1])
    return values.gather(-1, idx)


def logit_diff(logits: Tensor, answers: Tensor, wrong_answers: Tensor, position: int = 0) -> Tensor:
    """Logit difference ``logit(answer) - logit(wrong answer)`` at one metric position.

    Uses column 0 of ``answers`` and ``wrong_answers``.

    Args:
        logits: ``[..., N, P, V]``.
        answers, wrong_answers: ``[N, >=1]`` token ids.
        position: Which of the P gathered positions to read.

    Returns:
        ``[..., N]`` in logits.
    """
    at = logits[..., position, :]
    return (_take(at, answers[:, :1]) - _take(at, wrong_answers[:, :1]))[..., 0]


def prob_diff(logits: Tensor, good: Tensor, bad: Tensor, position: int = 0) -> Tensor:
    """Probability difference ``sum p(good) - sum p(bad)`` at one metric position.

    Args:
        logits: ``[..., N, P, V]``.
        good, bad: ``[N, V]`` boolean masks over the vocabulary.

    Returns:
        ``[..., N]`` in probability units (between -1 and 1).
    """
    probs = torch.softmax(logits[..., position, :].float(), dim=-1)
    return (probs * good).sum(-1) - (probs * bad).sum(-1)


def log_prob(logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean log-probability of ``targets`` over the metric positions.

    Args:
        logits: ``[..., N, P, V]``.
        targets: ``[N, P]`` token ids, the correct next token at each position.
        valid: ``[N, P]`` boolean mask of positions to average over (default: all).

    Returns:
        ``[..., N]`` in nats (log-probability, <= 0).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1).expand(*logp.shape[:-1], 1))[..., 0]
    if valid is None:
        return lp.mean(-1)
    w = valid.to(lp.dtype)
    return (lp * w).sum(-1) / w.sum(-1).clamp_min(1)


def kl_div(logits_ref: Tensor, logits: Tensor) -> Tensor:
    """KL divergence ``KL(p_ref || p)`` of next-token distributions, averaged over positions.

    Args:
        logits_ref: ``[..., N, P, V]`` reference (full model) logits.
        logits: ``[..., N, P, V]`` logits of the circuit.

    Returns:
        ``[..., N]`` in nats (>= 0).
    """
    lp_ref = torch.log_softmax(logits_ref.float(), dim=-1)
    lp = torch.log_softmax(logits.float(), dim=-1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean(-1)
