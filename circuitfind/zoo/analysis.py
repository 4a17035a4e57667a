"""Measurements the zoo reports and tests: head scores, exact edge effects, AUROC, accuracy.

These functions read a loaded model (a ``TransformerBridge`` from :func:`circuitfind.load_model`)
through :class:`~circuitfind.patching.engine.PatchingEngine` (every patched run) or
``run_with_cache`` (attention patterns only; nothing is patched). They are used by
:mod:`circuitfind.zoo.train` to write each organism's ``metrics.json`` and reference circuit,
and by the integration tests to check the shipped numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from circuitfind.algorithms.exact import ExactPatching
from circuitfind.errors import ConfigError
from circuitfind.evaluation.faithfulness import evaluate
from circuitfind.evaluation.roc import edge_roc
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.selection import prune_dangling
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.patching.engine import PatchingEngine
from circuitfind.tasks.base import TaskData


def edge_auroc(graph: ComputeGraph, scores: Tensor, reference: Circuit) -> float:
    """Edge-level ROC AUC of ``|scores|`` against the reference's kept edges.

    A thin wrapper of :func:`circuitfind.evaluation.roc.edge_roc` (Mann-Whitney U, ties count
    one half, every real edge a candidate).

    Args:
        graph: The graph the ``[S, R]`` scores belong to (same structure as the reference's).
        scores: ``[S, R]`` per-edge scores (any unit; only their absolute order matters).
        reference: The reference circuit.

    Returns:
        AUROC in [0, 1].
    """
    if graph != reference.graph:
        raise ConfigError(f"The scores' graph {graph!r} does not match the reference's.")
    return float(edge_roc(scores, reference).auc)


def single_edge_effects(engine: PatchingEngine, data: TaskData, chunk: int = 64) -> Tensor:
    """Exact effect of corrupting each edge alone: ``m(full) - m(full without e)``.

    This is minus :class:`~circuitfind.algorithms.exact.ExactPatching`'s score.

    Args:
        engine: The patching engine.
        data: Task data (the metric is averaged over its examples).
        chunk: Masks evaluated per batched forward pass.

    Returns:
        ``[S, R]`` float32 effects in the task's metric unit (0 off real edges); positive when
        corrupting the edge lowers the metric.
    """
    return -ExactPatching(masks_per_pass=chunk, progress=False).score(engine, data)


def faithfulness(engine: PatchingEngine, data: TaskData, kept: Tensor) -> dict[str, float]:
    """Clean, corrupted and circuit metrics and the normalized faithfulness of ``kept``.

    Returns:
        ``{"clean", "corrupted", "circuit", "faithfulness"}`` from
        :func:`circuitfind.evaluation.evaluate` (normalized faithfulness
        ``(m(C) - m(empty)) / (m(full) - m(empty))``, DESIGN.md section 4).
    """
    report = evaluate(engine, Circuit(engine.graph, kept.bool()), data)
    return {"clean": report.metric_full, "corrupted": report.metric_empty,
            "circuit": report.metric_circuit, "faithfulness": report.faithfulness}


def reference_from_effects(graph: ComputeGraph, effects: Tensor, gap: float,
                           fraction: float) -> Tensor:
    """Edges whose single-edge effect is at least ``fraction`` of the gap, dangling ones pruned.

    Args:
        graph: The graph.
        effects: ``[S, R]`` exact single-edge effects (:func:`single_edge_effects`).
        gap: ``m(full) - m(empty)`` in the same unit.
        fraction: Threshold as a fraction of ``|gap|`` (e.g. 0.05).

    Returns:
        ``[S, R]`` bool kept mask.
    """
    kept = (effects.abs() >= fraction * abs(gap)) & graph.edge_mask
    return prune_dangling(Circuit(graph, kept)).kept


def metric_logits(engine: PatchingEngine, data: TaskData) -> Tensor:
    """Full-model logits at the metric positions, ``[N, P, V]``."""
    return engine.run(data, engine.graph.full_mask())[0]


def attention_patterns(model: Any, tokens: Tensor) -> Tensor:
    """Attention patterns of every layer, ``[L, N, H, T, T]`` (query, key), via the bridge."""
    n_layers = int(model.cfg.n_layers)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return torch.stack([cache[n].detach().float().cpu() for n in names])


def induction_head_scores(model: Any, data: TaskData) -> dict[str, Tensor]:
    """Previous-token and induction scores of every head on ``[BOS] A A`` induction data.

    Previous-token score of a head: its mean attention from position t to t-1 over every
    position t >= 1 of the clean sequences. Induction score: its mean attention from each
    position t of the second copy of ``A`` to the position right after the previous occurrence
    of the token at t, i.e. ``t - h + 1``.

    Args:
        model: The bridge.
        data: ``induction`` task data (``info["half_len"]`` = h).

    Returns:
        ``{"previous_token": [L, H], "induction": [L, H]}`` mean attention weights (0..1).

    References:
        Olsson et al. 2022, "In-context Learning and Induction Heads" (prefix-matching score).
    """
    h = int(data.info["half_len"])
    pat = attention_patterns(model, data.clean)  # [L, N, H, T, T]
    t = data.clean.shape[1]
    o = t - 2 * h
    q = torch.arange(1, t)
    prev = pat[..., q, q - 1].mean(dim=(1, 3))
    q2 = torch.arange(o + h, o + 2 * h)
    ind = pat[..., q2, q2 - h + 1].mean(dim=(1, 3))
    return {"previous_token": prev, "induction": ind}


def attention_to_token(model: Any, data: TaskData, token_ids: Tensor,
                       occurrence: str = "all") -> Tensor:
    """Mean attention of every head from the metric position to the positions of a token.

    For example ``n``, the query is ``data.positions[n, 0]`` and the keys are the earlier
    positions whose clean token is ``token_ids[n]`` (all of them, or only the first or the last
    occurrence); the head's attention weights on those keys are summed, then averaged over
    the examples. Used for the greater-than organism (attention to the start year ``YY``) and
    the IOI organism (attention to the indirect object and to the two subject mentions).

    Args:
        model: The bridge.
        data: Task data (clean prompts are used; nothing is patched).
        token_ids: ``[N]`` token id per example.
        occurrence: ``"all"``, ``"first"`` or ``"last"``.

    Returns:
        ``[L, H]`` mean attention weight (0..1).

    Raises:
        ConfigError: an unknown ``occurrence``, or an example without the token before its
            metric position.
    """
    if occurrence not in ("all", "first", "last"):
        raise ConfigError(f"occurrence must be 'all', 'first' or 'last'; got {occurrence!r}.")
    pat = attention_patterns(model, data.clean)  # [L, N, H, T, T]
    n, t = data.clean.shape
    q = data.positions[:, 0].long()  # [N]
    pos = torch.arange(t)[None, :]
    hit = (data.clean == token_ids[:, None]) & (pos < q[:, None])  # [N, T]
    if not bool(hit.any(-1).all()):
        raise ConfigError("attention_to_token: some example lacks the token before its metric "
                          "position.")
    if occurrence != "all":
        idx = torch.where(hit, pos, -1 if occurrence == "last" else t)
        at = idx.max(-1).values if occurrence == "last" else idx.min(-1).values
        hit = pos == at[:, None]
    rows = pat.permute(1, 3, 0, 2, 4)[torch.arange(n), q]  # [N, L, H, T] from the query
    return (rows * hit[:, None, None, :].float()).sum(-1).mean(0)
