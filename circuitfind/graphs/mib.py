"""MIB circuit-track JSON: export circuits or edge scores, and read them back losslessly.

The MIB circuit localization track (Mueller et al. 2025) takes the JSON layout of the EAP-IG
library's ``Graph.to_json`` / ``Graph.from_json`` (Hanna et al. 2024)::

    {"cfg":   {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": false, "d_model": 768},
     "nodes": {"input": {"in_graph": true}, "a0.h0": {"in_graph": false}, ..., "m0": {...},
               ..., "logits": {"in_graph": true}},
     "edges": {"input->a0.h0<q>": {"score": 0.013, "in_graph": false}, ...,
               "a0.h1->a3.h0<k>": {...}, "m2->m5": {...}, "a11.h0->logits": {...}}}

``nodes`` may carry an optional ``score`` (node-level methods); circuitfind scores edges, so it
writes none. The graph is EAP-IG's: nodes ``input``, ``a{L}.h{H}``, ``m{L}``, ``logits``;
every attention head has its own q, k and v receivers; every layer has an MLP. Files list every
node and every edge of that graph, in EAP-IG's construction order (what ``to_json`` writes).

A submission is one folder per task/model named ``{task}_{model}`` (MIB's layout: ``ioi_gpt2``,
``arc-easy_llama3``; underscores inside the task or model name become dashes so that the one
underscore separates them), holding ``importances.json`` — edge scores, which MIB ranks itself
(the *importance-score* submission format).

Mapping circuitfind's graph to MIB's (documented in ``docs/decisions.md`` too):

- **Grouped-query attention.** circuitfind has one k and one v receiver per key/value head
  (``a{L}.kv{G}<k|v>``, what the model computes); MIB (TransformerLens with
  ``ungroup_grouped_query_attention``) has them per query head. On export each
  ``u->a{L}.kv{G}<k>`` becomes ``u->a{L}.h{H}<k>`` for every query head H sharing key/value head
  G (``H = G·r .. G·r + r − 1``, ``r = n_heads / n_kv_heads``), each with the same score and
  ``in_graph``. On import a group must agree (``gqa="strict"``, the default: files written here
  always do); files from other tools whose per-head values differ are read with
  ``gqa="sum"`` (scores summed — the shared receiver's attribution is the sum of the per-head
  ones for gradient methods — and the edge kept if any head keeps it) or ``gqa="mean"``.
- **Attention-only models** have no MLPs in circuitfind's graph; the file still lists MIB's MLP
  nodes and edges (score 0, not in the graph), and importing refuses an MLP edge marked in the
  graph.
- **Nodes' ``in_graph``** follows EAP-IG's pruning rule: a node is in the graph when it has a
  kept outgoing edge and (it is ``input`` or it has a kept incoming edge); ``logits`` always is.
  Import derives nothing from it (the edges define the circuit).
- **Score sign.** MIB's scores attribute a loss (the negated logit difference), so a positive
  score marks an edge the behaviour relies on, and MIB's CPR ranks edges by signed score.
  circuitfind's scores declare their meaning (:mod:`circuitfind.graphs.scores`): a metric
  change ``metric(without edge) - metric(full)`` is negative for such an edge when higher is
  better, so it is written as ``-score`` (and as ``score`` for lower-is-better metrics such as
  KL divergence); an importance (ACDC's KL effects) is written as is, so ACDC's kept edges rank
  first. Import undoes the sign (NaN stays NaN). Files from other tools are read as MIB-signed.
- **Lossless round trip.** Scores are float32 written as the shortest decimal that reads back to
  the same float32; a top-level ``circuitfind`` object (ignored by ``Graph.from_json``, which
  reads only ``cfg``, ``nodes`` and ``edges``) holds the exact graph config (``n_kv_heads``,
  ``attn_only``), whether the circuit had scores, and its metadata. A circuit without scores is
  written with score 1 on kept edges and 0 elsewhere (``Graph.from_json`` needs a score on every
  edge; ranking by it gives the circuit back) and imports with ``scores=None``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from circuitfind._files import atomic_write, floats_for_json, read_json
from circuitfind.errors import ConfigError, OutputExistsError
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.graphs.scores import ScoreMeaning, score_meaning

__all__ = ["MIB_FILE", "GQA_MODES", "mib_folder_name", "to_mib_dict", "from_mib_dict",
           "export_mib", "import_mib"]

MIB_FILE = "importances.json"
"""Name of the file written inside a submission folder."""

GQA_MODES: tuple[str, ...] = ("strict", "sum", "mean")
"""How :func:`from_mib_dict` combines the per-query-head k/v edges of a key/value group."""

_BLOCK = "circuitfind"
_BLOCK_FORMAT = "circuitfind.mib"
_BLOCK_VERSION = 1
_HEAD_RECEIVER = re.compile(r"^a(\d+)\.h(\d+)<([qkv])>$")


# ---------------------------------------------------------------------------------- the MIB graph
def mib_node_names(n_layers: int, n_heads: int) -> list[str]:
    """Node names of EAP-IG's graph in its order: input, per layer its heads then MLP, logits."""
    names = ["input"]
    for layer in range(n_layers):
        names += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
    return names + ["logits"]


def mib_edge_names(n_layers: int, n_heads: int, parallel_attn_mlp: bool) -> list[str]:
    """Edge names of EAP-IG's graph in its construction order.

    Per layer: every earlier node (the residual stream so far) to each head's q, k, v; then every
    node so far (this layer's heads included unless attention and MLP run in parallel) to the
    MLP; finally every node to ``logits``.
    """
    stream = ["input"]
    names: list[str] = []
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        names += [f"{u}->{a}<{x}>" for u in stream for a in heads for x in "qkv"]
        if parallel_attn_mlp:
            names += [f"{u}->m{layer}" for u in stream]
            stream = stream + heads
        else:
            stream = stream + heads
            names += [f"{u}->m{layer}" for u in stream]
        stream = stream + [f"m{layer}"]
    return names + [f"{u}->logits" for u in stream]


@lru_cache(maxsize=8)
def _edge_map(graph: ComputeGraph) -> tuple[tuple[str, ...], np.ndarray]:
    """MIB edge names for ``graph`` and, per MIB edge, circuitfind's canonical edge id.

    Returns:
        ``(names, ids)``: ``names`` in EAP-IG order; ``ids[i]`` (int64) is the circuitfind edge
        that MIB edge ``i`` stands for (several for a grouped-query k/v receiver), or -1 where
        circuitfind's graph has no such edge (the MLPs of an attention-only model).
    """
    names = tuple(mib_edge_names(graph.n_layers, graph.n_heads, graph.parallel_attn_mlp))
    ids = np.full(len(names), -1, dtype=np.int64)
    for i, name in enumerate(names):
        sender, receiver = name.split("->")
        if graph.attn_only and (sender.startswith("m") or receiver.startswith("m")):
            continue
        match = _HEAD_RECEIVER.match(receiver)
        if graph.is_grouped_query and match and match[3] in "kv":
            receiver = f"a{match[1]}.kv{int(match[2]) // graph.group_size}<{match[3]}>"
        ids[i] = graph.edge_id(f"{sender}->{receiver}")
    return names, ids


def mib_folder_name(task: str, model: str) -> str:
    """The submission folder of one task/model cell, ``{task}_{model}`` as MIB lays it out.

    The model is reduced to its last path component (``zoo:ioi-small`` -> ``ioi-small``,
    ``../shared/models/stories260k`` -> ``stories260k``, ``Qwen/Qwen2.5-0.5B`` ->
    ``Qwen2.5-0.5B``); underscores in either part become dashes (``greater_than`` ->
    ``greater-than``), as in MIB's folder names, so the one underscore separates task and model.

    Raises:
        ConfigError: an empty task or model name.
    """
    model_name = str(model)
    if model_name.startswith("zoo:"):
        model_name = model_name[len("zoo:"):]
    model_name = Path(model_name.rstrip("/\\")).name
    task_name = str(task).strip()
    if not task_name or not model_name:
        raise ConfigError(f"A MIB folder needs a task and a model name; got task={task!r}, "
                          f"model={model!r}.")
    return f"{task_name.replace('_', '-')}_{model_name.replace('_', '-')}"


# ---------------------------------------------------------------------------------- export
def _as_circuit(obj: Any, graph: ComputeGraph | None) -> Circuit:
    if isinstance(obj, Circuit):
        if graph is not None and graph != obj.graph:
            raise ConfigError(f"graph= ({graph!r}) does not match the circuit's graph "
                              f"({obj.graph!r}).")
        return obj
    if isinstance(obj, Tensor):
        if not isinstance(graph, ComputeGraph):
            raise ConfigError("Exporting a scores tensor needs its graph: pass graph= (e.g. "
                              "cf.ComputeGraph.from_model(model)).")
        return Circuit.empty(graph, scores=obj)  # checks the scores' shape and dtype
    raise ConfigError(f"export_mib takes a Circuit or an [S, R] scores tensor; got "
                      f"{type(obj).__name__}.")


def _check_d_model(d_model: Any) -> int:
    if isinstance(d_model, bool) or not isinstance(d_model, (int, np.integer)) or d_model < 1:
        raise ConfigError(f"d_model must be an int >= 1 (the model's residual width, needed by "
                          f"MIB's cfg); got {d_model!r}.")
    return int(d_model)


def resolve_d_model(circuit: Circuit, d_model: int | None = None) -> int:
    """The residual width for MIB's ``cfg``: ``d_model``, else ``metadata["d_model"]``.

    :func:`circuitfind.discover` records ``d_model``; for an older circuit,
    :func:`circuitfind.export_mib` reads it from the model's config
    (:func:`circuitfind.models.config_d_model`).

    Raises:
        ConfigError: neither is given (pass ``d_model``).
    """
    if d_model is not None:
        return _check_d_model(d_model)
    if circuit.metadata.get("d_model") is not None:
        return _check_d_model(circuit.metadata["d_model"])
    raise ConfigError("The circuit's metadata do not record d_model; pass d_model= (the "
                      "model's hidden size; --d-model on the command line), or export with "
                      "circuitfind.export_mib, which reads it from the model's config.")


def _mib_sign(circuit: Circuit, higher_is_better: bool | None) -> float:
    """The sign that turns the circuit's scores into MIB's (positive = the behaviour relies on
    the edge): its score meaning's (:func:`~circuitfind.graphs.scores.score_meaning`; -1 for
    metric changes of a higher-is-better metric, 1 for importances such as ACDC's KL effects),
    or, given ``higher_is_better``, that of a metric change in that direction."""
    meaning = score_meaning(circuit.metadata)
    if higher_is_better is not None and meaning.kind == "metric_change":
        meaning = ScoreMeaning("metric_change", meaning.unit, higher_is_better)
    return meaning.sign


def _flip(values: Tensor, sign: float) -> Tensor:
    """``sign * values``, leaving NaN untouched (bit for bit)."""
    return values if sign > 0 else torch.where(torch.isnan(values), values, -values)


def to_mib_dict(circuit_or_scores: Circuit | Tensor, d_model: int, *,
                graph: ComputeGraph | None = None, higher_is_better: bool | None = None,
                provenance: bool = True) -> dict[str, Any]:
    """The MIB / EAP-IG ``Graph.to_json`` dict of a circuit or of edge scores.

    Args:
        circuit_or_scores: A :class:`Circuit` (kept edges become ``in_graph``) or ``[S, R]``
            edge scores (every edge ``in_graph: false``, as EAP-IG writes attribution scores).
        d_model: The model's residual width (MIB's ``cfg`` needs it).
        graph: The graph of a scores tensor (checked against a circuit's).
        higher_is_better: Direction of the task metric, which sets the sign of written metric
            changes (see the module docstring). Default: the circuit's score meaning
            (``metadata["scores"]``, inferred for older circuits).
        provenance: Add the ``circuitfind`` object that makes the round trip lossless (graph
            config, whether scores exist, metadata); ``Graph.from_json`` ignores it.

    Returns:
        ``{"cfg", "nodes", "edges"[, "circuitfind"]}`` (see the module docstring).

    Raises:
        ConfigError: not a circuit or a scores tensor of the graph's shape, a scores tensor
            without ``graph``, or a bad ``d_model``.

    References:
        Hanna et al. 2024 (EAP-IG library, ``Graph.to_json``); Mueller et al. 2025 (MIB).
    """
    circuit = _as_circuit(circuit_or_scores, graph)
    g = circuit.graph
    names, ids = _edge_map(g)
    mapped = ids >= 0
    kept_e = g.to_edges(circuit.kept).numpy()
    sign = _mib_sign(circuit, higher_is_better)
    edge_values = circuit.edge_values
    values = (_flip(edge_values, sign) if edge_values is not None
              else torch.from_numpy(kept_e.astype(np.float32)))
    score = np.zeros(len(names), dtype=np.float32)
    score[mapped] = values.numpy()[ids[mapped]]
    in_graph = np.zeros(len(names), dtype=bool)
    in_graph[mapped] = kept_e[ids[mapped]]
    floats = floats_for_json(torch.from_numpy(score))
    edges = {name: {"score": v, "in_graph": bool(k)}
             for name, v, k in zip(names, floats, in_graph.tolist())}
    # EAP-IG's node rule: an outgoing kept edge and (input, or an incoming kept edge)
    has_in = g.nodes_reading(circuit.kept.any(0))  # [N]
    has_in[0] = True
    has_out = torch.cat([circuit.kept.any(1), torch.zeros(1, dtype=torch.bool)])
    node_in = {node.name: bool(i and o) for node, i, o in zip(g.nodes, has_in.tolist(),
                                                              has_out.tolist())}
    nodes = {name: {"in_graph": True if name == "logits" else node_in.get(name, False)}
             for name in mib_node_names(g.n_layers, g.n_heads)}
    out: dict[str, Any] = {
        "cfg": {"n_layers": g.n_layers, "n_heads": g.n_heads,
                "parallel_attn_mlp": g.parallel_attn_mlp, "d_model": _check_d_model(d_model)},
        "nodes": nodes, "edges": edges}
    if provenance:
        out[_BLOCK] = {"format": _BLOCK_FORMAT, "format_version": _BLOCK_VERSION,
                       "graph": g.config(), "scores": circuit.scores is not None,
                       "score_sign": sign,
                       "metadata": circuit.metadata}
    return out


def export_mib(circuit_or_scores: Circuit | Tensor, path: str | os.PathLike[str], *,
               graph: ComputeGraph | None = None, d_model: int | None = None,
               task: str | None = None, model: str | None = None,
               higher_is_better: bool | None = None, provenance: bool = True,
               overwrite: bool = False) -> Path:
    """Write a circuit or edge scores in MIB's circuit-track JSON (atomically).

    Args:
        circuit_or_scores: A :class:`Circuit` or ``[S, R]`` edge scores (with ``graph``).
        path: A ``.json`` file, or a submission directory: then the file is
            ``path/{task}_{model}/importances.json`` (:func:`mib_folder_name`), created as needed.
        graph: The graph of a scores tensor.
        d_model: The model's residual width (default: see :func:`resolve_d_model`).
        task, model: Names for the folder (default: the circuit's ``metadata["task"]`` and
            ``metadata["model"]``).
        higher_is_better, provenance: See :func:`to_mib_dict`.
        overwrite: Replace an existing file (default: refuse, as three exports of different
            circuits of one task and model into one folder would otherwise silently keep only
            the last).

    Returns:
        The file written.

    Raises:
        ConfigError: see :func:`to_mib_dict`; no task/model for the folder; no ``d_model``.
        OutputExistsError: the file exists and ``overwrite`` is False.
        OSError: the directory cannot be written.
    """
    circuit = _as_circuit(circuit_or_scores, graph)
    d_model = resolve_d_model(circuit, d_model)
    path = Path(path)
    if path.suffix.lower() != ".json":
        task = task or circuit.metadata.get("task")
        model = model or circuit.metadata.get("model")
        if not task or not model:
            raise ConfigError("The MIB folder is named {task}_{model}, and the circuit's metadata "
                              "lack them: pass task= and model= (--task-name/--model-name), or a "
                              "path ending in .json.")
        path = path / mib_folder_name(task, model) / MIB_FILE
    if path.exists() and not overwrite:
        what = f"{str(path)!r} already exists (a MIB export of this task and model); pass "
        how = " to replace it, or export into another directory or .json file."
        raise OutputExistsError(f"{what}overwrite=True{how}", cli=f"{what}--overwrite{how}")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_mib_dict(circuit, d_model, higher_is_better=higher_is_better,
                       provenance=provenance)
    return atomic_write(path, (json.dumps(data) + "\n").encode("utf-8"))


# ---------------------------------------------------------------------------------- import
def _graph_for(cfg: Mapping[str, Any], block: Any, graph: ComputeGraph | None) -> ComputeGraph:
    try:
        n_layers, n_heads = int(cfg["n_layers"]), int(cfg["n_heads"])
        parallel = bool(cfg.get("parallel_attn_mlp", False))
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"MIB 'cfg' needs integer n_layers and n_heads; got {dict(cfg)!r}.") \
            from err
    if graph is None and isinstance(block, Mapping) and isinstance(block.get("graph"), Mapping):
        try:
            graph = ComputeGraph.from_config(dict(block["graph"]))
        except TypeError as err:
            raise ConfigError(f"Bad circuitfind graph config in the MIB file: {err}.") from err
    if graph is None:
        graph = ComputeGraph(n_layers, n_heads, parallel_attn_mlp=parallel)
    if (graph.n_layers, graph.n_heads, graph.parallel_attn_mlp) != (n_layers, n_heads, parallel):
        raise ConfigError(f"The MIB cfg (n_layers={n_layers}, n_heads={n_heads}, "
                          f"parallel_attn_mlp={parallel}) does not match {graph!r}.")
    return graph


def from_mib_dict(data: Mapping[str, Any], *, graph: ComputeGraph | None = None,
                  gqa: str = "strict", higher_is_better: bool = True) -> Circuit:
    """Inverse of :func:`to_mib_dict`; also reads files written by EAP-IG / MIB.

    Edges absent from the file score 0 and are not kept (as ``Graph.from_json`` leaves them).
    Node entries are not used: the kept edges define the circuit.

    Args:
        data: The parsed JSON.
        graph: The circuitfind graph to read into. Default: the file's ``circuitfind`` object,
            else a multi-head graph from ``cfg`` — pass the model's graph
            (``cf.ComputeGraph.from_model``) for grouped-query or attention-only models.
        gqa: How the per-query-head k/v edges of one key/value group combine: ``"strict"`` (they
            must agree), ``"sum"`` or ``"mean"`` of the scores (kept if any is kept).
        higher_is_better: For files without circuitfind's provenance object: the direction of
            the task metric, to turn MIB-signed scores into circuitfind's (negated when True,
            MIB's logit-difference tasks). Files written here record their sign.

    Returns:
        The circuit (scores ``None`` if it was exported without scores).

    Raises:
        ConfigError: missing keys, an unknown edge name, a malformed entry, a cfg that does not
            match ``graph``, a kept edge the graph lacks (an MLP of an attention-only model), or
            (``"strict"``) a group whose heads disagree.
    """
    if gqa not in GQA_MODES:
        raise ConfigError(f"gqa must be one of {list(GQA_MODES)}; got {gqa!r}.")
    missing = [k for k in ("cfg", "nodes", "edges")
               if not isinstance(data, Mapping) or k not in data]
    if missing:
        raise ConfigError(f"Not a MIB circuit file: missing {missing} (expected the keys cfg, "
                          "nodes and edges of EAP-IG's Graph.to_json).")
    if not isinstance(data["cfg"], Mapping) or not isinstance(data["edges"], Mapping):
        raise ConfigError("MIB 'cfg' and 'edges' must be JSON objects.")
    block = data.get(_BLOCK)
    g = _graph_for(data["cfg"], block, graph)
    names, ids = _edge_map(g)
    index = {name: i for i, name in enumerate(names)}
    score = np.zeros(len(names), dtype=np.float64)
    in_graph = np.zeros(len(names), dtype=bool)
    problems: list[str] = []
    for name, info in data["edges"].items():
        i = index.get(name)
        ok = (isinstance(info, Mapping) and isinstance(info.get("in_graph"), bool)
              and isinstance(info.get("score"), (int, float))
              and not isinstance(info.get("score"), bool))
        if i is None:
            problems.append(f"unknown edge {name!r}")
        elif not ok:
            problems.append(f"edge {name!r} needs a number 'score' and a bool 'in_graph'; got "
                            f"{info!r:.80}")
        else:
            score[i], in_graph[i] = float(info["score"]), info["in_graph"]
        if len(problems) >= 5:
            break
    if problems:
        raise ConfigError(f"Bad MIB edges for {g!r}: " + "; ".join(problems) + ".")
    unmapped = (ids < 0) & in_graph
    if unmapped.any():
        raise ConfigError(f"The MIB file keeps {int(unmapped.sum())} edge(s) the graph does not "
                          f"have, e.g. {names[int(np.argmax(unmapped))]!r} (attention-only "
                          "model: no MLPs).")
    mapped = ids >= 0
    target, s32 = ids[mapped], score[mapped].astype(np.float32)
    kept_any = np.zeros(g.n_edges, dtype=bool)
    np.logical_or.at(kept_any, target, in_graph[mapped])
    if gqa == "strict":
        values = np.zeros(g.n_edges, dtype=np.float32)
        values[target] = s32
        kept_all = np.ones(g.n_edges, dtype=bool)
        np.logical_and.at(kept_all, target, in_graph[mapped])
        bad = (values[target].view(np.uint32) != s32.view(np.uint32)) & ~(
            np.isnan(values[target]) & np.isnan(s32))
        bad |= kept_all[target] != kept_any[target]
        if bad.any():
            first = names[int(np.flatnonzero(mapped)[int(np.argmax(bad))])]
            raise ConfigError(f"The query heads sharing a key/value head disagree, e.g. at "
                              f"{first!r}: circuitfind has one k/v receiver per key/value head. "
                              "Read the file with gqa='sum' or gqa='mean'.")
    else:
        total = np.zeros(g.n_edges, dtype=np.float64)
        np.add.at(total, target, score[mapped])
        if gqa == "mean":
            total /= np.bincount(target, minlength=g.n_edges).clip(min=1)
        values = total.astype(np.float32)
    has_scores = bool(block.get("scores", True)) if isinstance(block, Mapping) else True
    sign = (float(block.get("score_sign", -1.0)) if isinstance(block, Mapping)
            else (-1.0 if higher_is_better else 1.0))
    metadata = (dict(block.get("metadata") or {}) if isinstance(block, Mapping)
                else {"source": "mib"})
    kept = g.to_dense(torch.from_numpy(kept_any))
    scores = g.to_dense(_flip(torch.from_numpy(values), sign)) if has_scores else None
    return Circuit(g, kept, scores, metadata)


def import_mib(path: str | os.PathLike[str], *, graph: ComputeGraph | None = None,
               gqa: str = "strict", higher_is_better: bool = True) -> Circuit:
    """Read a MIB circuit-track JSON file (or a ``{task}_{model}`` folder holding one).

    Args:
        path: The ``.json`` file, or a folder with ``importances.json`` (or one ``.json`` file).
        graph, gqa, higher_is_better: See :func:`from_mib_dict`.

    Returns:
        The circuit.

    Raises:
        ConfigError: no file, invalid JSON, or bad content (see :func:`from_mib_dict`).
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / MIB_FILE] if (path / MIB_FILE).is_file() else sorted(
            path.glob("*.json"))
        if len(candidates) != 1:
            raise ConfigError(f"{str(path)!r} holds {len(candidates)} JSON files and no "
                              f"{MIB_FILE}; name the file.")
        path = candidates[0]
    data = read_json(path, "MIB circuit JSON")
    try:
        return from_mib_dict(data, graph=graph, gqa=gqa, higher_is_better=higher_is_better)
    except ConfigError as err:
        raise ConfigError(f"{str(path)!r}: {err}") from err
