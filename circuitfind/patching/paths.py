"""Path patching: corrupt senders only along their direct paths into chosen receivers.

Background. Path patching (Wang et al. 2022, "Interpretability in the Wild", §3.1 and App. B;
generalised by Goldowsky-Dill et al. 2023, "Localizing Model Behavior with Path Patching") asks
how much a set of senders affects the metric *through* a set of receivers only: the senders are
corrupted along their direct paths into the receivers' inputs, and everything else is clean.
This is how the IOI circuit was found by hand (logits → name movers → S-inhibition heads → ...).

Method. For a sender set ``U`` and a receiver set ``R`` (q/k/v inputs of heads, MLP inputs,
``logits``), the patched run is the clean run in which every receiver ``r`` in ``R`` reads

    x_r = x_r(clean run) - sum_{u in U, u -> r} (a_u(clean) - a'_u)                       (1)

with ``a'_u`` the ablation value (the corrupted run for resample ablation): ``r`` sees the
ablated output of the senders in ``U`` and the *clean* output of every other upstream sender,
even when another receiver of ``R`` upstream of ``r`` changed (those edges are *frozen*,
:mod:`circuitfind.patching.runner`). Every other receiver reads the current run, so the change
propagates from the receivers to the logits. In engine terms: the edges ``u -> r`` (``u`` in
``U``, ``r`` in ``R``) are removed, and every other edge into ``r`` is frozen to its clean
value. With one sender and one receiver nothing upstream of ``r`` changes, so the frozen edges
carry what they would carry anyway and the result is exactly the single-edge patch that
``exact`` scores.

Cost. One masked pass (resumed at the first receiver's layer) per (sender set, receiver set)
pair; K pairs are stacked on the batch dimension and run together, chunked by the engine's
memory budget. Needs the block runner (GPT-2 and Llama layouts) for frozen edges.

Departures from Wang et al. 2022. (a) Their second pass freezes every attention head at its
clean value but *recomputes the MLPs*, so a sender's effect through later MLPs into a receiver
counts as "direct"; here MLPs are nodes of the graph like heads, so only the sender's own edge
into the receiver is corrupted (add the MLPs to the senders to include those paths). (b) With
grouped-query attention a k or v receiver is shared by the query heads of its key/value group
(``a{L}.kv{G}<k>``), so patching the keys of one query head patches them for its group, as the
model computes them. (c) Removed edges carry any ablation (resample by default, where Wang et
al. use the ABC distribution's activations, which is what the task's corrupted prompts are).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError, UnknownNameError
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.patching.engine import PatchingEngine
from circuitfind.patching.spec import Ablation
from circuitfind.tasks.base import TaskData

NameSets = str | Sequence[str] | Sequence[Sequence[str]]


def check_qkv(qkv: str) -> str:
    """``qkv`` normalised to the order ``q``, ``k``, ``v`` (e.g. ``"vq"`` -> ``"qv"``).

    Raises:
        ConfigError: not a non-empty string of distinct letters from ``q``, ``k``, ``v``.
    """
    if (not isinstance(qkv, str) or not qkv or len(set(qkv)) != len(qkv)
            or set(qkv) - set("qkv")):
        raise ConfigError(f"qkv must name which attention inputs to patch: a non-empty string of "
                          f"distinct letters from 'q', 'k', 'v' (e.g. 'q', 'kv', 'qkv'). "
                          f"Got {qkv!r}.")
    return "".join(c for c in "qkv" if c in qkv)


def _unknown(graph: ComputeGraph, what: str, name: str, candidates: list[str]) -> UnknownNameError:
    close = difflib.get_close_matches(str(name), candidates, n=3)
    hint = f" Closest: {', '.join(close)}." if close else ""
    return UnknownNameError(f"Unknown {what} {name!r} in this {graph.n_layers}-layer graph.{hint}")


def sender_indices(graph: ComputeGraph, names: Sequence[str]) -> list[int]:
    """Sender indices of node names (``input``, ``a{L}.h{H}``, ``m{L}``), sorted, unique.

    Raises:
        UnknownNameError: a name that is no sender (with the closest sender names).
    """
    table = {node.name: i for i, node in enumerate(graph.senders)}
    out = set()
    for name in names:
        if name not in table:
            if name == "logits":
                raise UnknownNameError("'logits' cannot be a sender: it has no output. Senders "
                                       "are 'input', heads 'a{L}.h{H}' and MLPs 'm{L}'.")
            raise _unknown(graph, "sender", name, list(table))
        out.add(table[name])
    return sorted(out)


def receiver_indices(graph: ComputeGraph, names: Sequence[str], qkv: str = "qkv") -> list[int]:
    """Receiver indices of node or receiver names, sorted, unique.

    A head ``a{L}.h{H}`` stands for its inputs named in ``qkv`` (with grouped-query attention
    its k/v inputs are those of its key/value group, ``a{L}.kv{G}<k|v>``); ``m{L}`` for the
    MLP's input; ``logits`` for the final residual stream. A receiver name (``a3.h0<q>``,
    ``a3.kv1<k>``) stands for itself, whatever ``qkv`` says.

    Raises:
        UnknownNameError: a name that is neither a node with inputs nor a receiver (with the
            closest names).
        ConfigError: a bad ``qkv``.
    """
    qkv = check_qkv(qkv)
    receivers = {rec.name: i for i, rec in enumerate(graph.receivers)}
    nodes = {node.name: node for node in graph.nodes}
    out: set[int] = set()
    for name in names:
        if name in receivers:
            out.add(receivers[name])
            continue
        node = nodes.get(name)
        if node is None:
            raise _unknown(graph, "receiver", name, list(nodes)[1:] + list(receivers))
        if node.kind == "input":
            raise UnknownNameError("'input' cannot be a receiver: it reads nothing. Receivers "
                                   "are heads (their q/k/v inputs), MLPs and 'logits'.")
        if node.kind == "attention":
            layer, head = node.layer, node.head
            assert head is not None  # every attention node has a head
            group = head // graph.group_size
            start = {"q": graph.q_start[layer] + head, "k": graph.k_start[layer] + group,
                     "v": graph.v_start[layer] + group}
            out.update(start[c] for c in qkv)
        elif node.kind == "mlp":
            mlp = graph.mlp_receiver[node.layer]
            assert mlp is not None  # an MLP node exists only in a layer with an MLP
            out.add(mlp)
        else:
            out.add(graph.n_receivers - 1)
    return sorted(out)


def _as_sets(value: NameSets, what: str) -> list[list[str]]:
    """One name, one set of names, or a list of sets -> a list of sets."""
    if isinstance(value, str):
        return [[value]]
    items = list(value)
    names = [v for v in items if isinstance(v, str)]
    if items and len(names) == len(items):
        return [names]
    if items and all(not isinstance(v, str) and len(list(v)) > 0 for v in items):
        sets = [list(v) for v in items]
        if all(isinstance(name, str) for s in sets for name in s):
            return sets
    raise ConfigError(f"{what} must be a name, a non-empty list of names (one set) or a "
                      f"non-empty list of non-empty lists of names (one set per pair); got "
                      f"{value!r}.")


def path_masks(graph: ComputeGraph, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
               dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Keep-masks and frozen masks of path patches, eq. (1), by sender and receiver indices.

    Args:
        graph: The computational graph.
        pairs: K ``(sender indices, receiver indices)`` pairs.
        dtype: dtype of the masks.

    Returns:
        ``(keep [K, S, R], frozen [K, S, R])``: ``keep`` is 0 on the edges from the pair's
        senders into its receivers, 1 on every other real edge; ``frozen`` is 1 on the other
        edges into the pair's receivers.

    Raises:
        ConfigError: a pair in which no sender is upstream of any receiver (nothing to patch).
    """
    keep = graph.full_mask(dtype).expand(len(pairs), -1, -1).clone()
    frozen = torch.zeros_like(keep)
    up = graph.n_upstream.tolist()
    for k, (senders, receivers) in enumerate(pairs):
        s = torch.as_tensor(list(senders), dtype=torch.long)
        touched = False
        for r in receivers:
            frozen[k, : up[r], r] = 1
            upstream = s[s < up[r]]
            touched |= bool(len(upstream))
            keep[k, upstream, r] = 0
            frozen[k, upstream, r] = 0
        if not touched:
            names = [graph.senders[i].name for i in senders]
            rec = [graph.receivers[i].name for i in receivers]
            raise ConfigError(f"Pair {k}: no sender of {names} is upstream of a receiver of "
                              f"{rec}, so patching their paths changes nothing; senders must "
                              "come before the receivers (earlier layers, or a head before its "
                              "own layer's MLP).")
    return keep, frozen


def path_patch_indices(engine: PatchingEngine, data: TaskData,
                       pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                       ablation: Ablation | str | None = None,
                       batch_size: int | None = None, masks_per_pass: int = 256) -> Tensor:
    """:func:`path_patch` by sender and receiver indices (see :func:`path_masks`).

    Returns:
        ``[K]`` float64 metric changes ``metric(path-patched run) - metric(clean run)``.
    """
    g = engine.graph
    full = g.full_mask(engine.dtype)
    baseline = engine.evaluate(data, full, batch_size=batch_size, ablation=ablation)[0]
    out = torch.empty(len(pairs), dtype=torch.float64)
    for k0 in range(0, len(pairs), masks_per_pass):
        keep, frozen = path_masks(g, pairs[k0: k0 + masks_per_pass], engine.dtype)
        values = engine.evaluate(data, keep, batch_size=batch_size, ablation=ablation,
                                 frozen=frozen)
        out[k0: k0 + len(values)] = values - baseline
    return out


def path_patch(model: Any, data: TaskData, senders: NameSets, receivers: NameSets,
               qkv: str = "qkv", ablation: Ablation | str | None = None,
               batch_size: int | None = None) -> Tensor:
    """Metric change when senders are corrupted only along their direct paths into receivers.

    Eq. (1) of the module docstring: each receiver reads the senders' ablated outputs and every
    other sender's clean output; the rest of the model runs on the clean prompt. For one
    sender and one receiver this is exactly the single-edge patch ``exact`` scores.

    Args:
        model: A ``TransformerBridge`` (GPT-2 or Llama layout) or a :class:`PatchingEngine`.
        data: Task data (clean prompts run; the corrupted prompts supply resample ablation).
        senders: A node name (``"a0.h1"``, ``"m2"``, ``"input"``), a list of names (one sender
            set), or a list of K lists (K sender sets).
        receivers: Likewise, node names (heads stand for their ``qkv`` inputs; ``"m3"``,
            ``"logits"``) or receiver names (``"a3.h0<q>"``, ``"a3.kv1<k>"``). A single set is
            paired with each of K sender sets, and vice versa; otherwise both hold K sets.
        qkv: Which inputs of heads named as nodes: letters of ``"qkv"`` (default all three).
        ablation: What the senders' patched paths carry (default: the engine's, resample).
        batch_size: Examples per pass (default: from the engine's memory budget).

    Returns:
        ``[K]`` float64 changes of the task metric (its unit), patched minus clean, averaged
        over examples; all K pairs run in batched masked passes.

    Raises:
        UnknownNameError: a sender or receiver name not in the graph (with the closest names).
        ConfigError: malformed name sets, different numbers of sender and receiver sets, a pair
            with no edge between them, a bad ``qkv`` or ablation, or a model without the block
            runner.

    References:
        Wang et al. (2022), "Interpretability in the Wild", §3.1 and App. B; Goldowsky-Dill et
        al. (2023), "Localizing Model Behavior with Path Patching".
    """
    engine = model if isinstance(model, PatchingEngine) else PatchingEngine(model)
    if engine.runner is None:
        raise ConfigError("Path patching freezes edges to their clean values, which needs the "
                          "block runner; this model's architecture has none (GPT-2 and Llama "
                          "layouts do).")
    g = engine.graph
    qkv = check_qkv(qkv)
    s_sets = [sender_indices(g, s) for s in _as_sets(senders, "senders")]
    r_sets = [receiver_indices(g, r, qkv) for r in _as_sets(receivers, "receivers")]
    if len(s_sets) != len(r_sets) and 1 not in (len(s_sets), len(r_sets)):
        raise ConfigError(f"Got {len(s_sets)} sender sets and {len(r_sets)} receiver sets; "
                          "pass equally many, or one set of either to pair with all of the other.")
    k = max(len(s_sets), len(r_sets))
    pairs = [(s_sets[i if len(s_sets) > 1 else 0], r_sets[i if len(r_sets) > 1 else 0])
             for i in range(k)]
    return path_patch_indices(engine, data, pairs, ablation=ablation, batch_size=batch_size)
