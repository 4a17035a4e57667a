"""Reference circuits from the literature, per (task, model), and the registry that holds them.

A reference circuit is the circuit a published analysis found for a task on a named model. It
is what discovered circuits and edge scores are compared against (ROC AUC and
precision-recall, :mod:`circuitfind.evaluation.roc`), and it can be rendered like any circuit.
References are built from a :class:`~circuitfind.graphs.graph.ComputeGraph` only: nothing here
loads a model.

Built-in references (both on GPT-2 small, ``ComputeGraph(12, 12)``; model names ``gpt2``,
``gpt2-small`` and ``openai-community/gpt2``, case-insensitive):

- ``ioi``: the 26 heads of Wang et al. (2022) by class, with the edge set of the ACDC paper's
  IOI ground truth (Conmy et al. 2023) — see :func:`ioi_reference`;
- ``greater_than``: the circuit of Hanna et al. (2023) as encoded in the ACDC paper's
  greater-than ground truth — see :func:`greater_than_reference`.

Each built-in takes a ``recipe`` argument: ``"acdc"`` (the default, what
:func:`reference_circuit` returns) reproduces the ground-truth edge set the ACDC paper scores
against, read from its code (``acdc/ioi/utils.py::get_ioi_true_edges`` and
``acdc/greaterthan/utils.py::get_greaterthan_true_edges`` in
github.com/ArthurConmy/Automatic-Circuit-Discovery), translated one to one into circuitfind's
graph (ACDC's ``blocks.0.hook_resid_pre`` is ``input``; ``blocks.L.hook_mlp_out`` /
``hook_mlp_in`` are the sender / receiver ``mL``; ``blocks.L.hook_{q,k,v}_input[H]`` are
``aL.hH<q|k|v>``; ``blocks.11.hook_resid_post`` is ``logits``; ACDC's internal
``hook_q_input -> hook_q -> hook_result`` edges have no counterpart here and are dropped). The
other recipe of each is a smaller, attention-only or node-induced reading documented with it.

Registry: :func:`register_reference` adds a builder for a (task, model) pair (the zoo's model
organisms register theirs, e.g. from their own circuit JSON files); :func:`reference_circuit`
looks one up; asking for a pair that has none raises :class:`NoReferenceError` (a
:class:`~circuitfind.errors.ConfigError` and an
:class:`~circuitfind.errors.UnknownNameError`) listing the models that have one — it never
returns an empty circuit.

References:
    Wang, Variengien, Conmy, Shlegeris, Steinhardt. "Interpretability in the Wild: a Circuit for
    Indirect Object Identification in GPT-2 small." ICLR 2023, arXiv:2211.00593 (Figure 2 and
    Section 3: the head classes).
    Hanna, Liu, Variengien. "How does GPT-2 compute greater-than?" NeurIPS 2023,
    arXiv:2305.00586 (Section 3: the circuit).
    Conmy, Mavor-Parker, Lynch, Heimersheim, Garriga-Alonso. "Towards Automated Circuit
    Discovery for Mechanistic Interpretability." NeurIPS 2023, arXiv:2304.14997 (Section 4.1
    and the appendix on the tasks' ground truths).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from circuitfind.errors import ConfigError, UnknownNameError
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.registry import normalize_name

__all__ = ["IOI_HEADS", "GREATER_THAN_NODES", "NoReferenceError", "ReferenceBuilder",
           "available_references", "greater_than_reference", "ioi_reference",
           "reference_circuit", "register_reference", "unregister_reference"]

ReferenceBuilder = Callable[[ComputeGraph], Circuit]
"""A function building a reference circuit over the given graph."""


class NoReferenceError(UnknownNameError, ConfigError):
    """No reference circuit is registered for the requested (task, model) pair."""


# ------------------------------------------------------------------------------------ IOI
IOI_HEADS: dict[str, tuple[tuple[int, int], ...]] = {
    "name mover": ((9, 9), (9, 6), (10, 0)),
    "backup name mover": ((10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0),
                          (11, 9)),
    "negative name mover": ((10, 7), (11, 10)),
    "S-inhibition": ((7, 3), (7, 9), (8, 6), (8, 10)),
    "induction": ((5, 5), (5, 8), (5, 9), (6, 9)),
    "duplicate token": ((0, 1), (0, 10), (3, 0)),
    "previous token": ((2, 2), (4, 11)),
}
"""The 26 IOI heads of Wang et al. (2022) on GPT-2 small, ``class -> ((layer, head), ...)``."""

# ACDC's ``special_connections``: (sender class or "input", receiver class or "logits", inputs).
_IOI_CONNECTIONS: tuple[tuple[str, str, str], ...] = (
    ("input", "previous token", "qkv"),
    ("input", "duplicate token", "qkv"),
    ("input", "S-inhibition", "q"),
    ("input", "negative name mover", "kv"),
    ("input", "name mover", "kv"),
    ("input", "backup name mover", "kv"),
    ("previous token", "induction", "kv"),
    ("induction", "S-inhibition", "kv"),
    ("duplicate token", "S-inhibition", "kv"),
    ("S-inhibition", "negative name mover", "q"),
    ("S-inhibition", "name mover", "q"),
    ("S-inhibition", "backup name mover", "q"),
    ("negative name mover", "logits", ""),
    ("name mover", "logits", ""),
    ("backup name mover", "logits", ""),
)


def _head(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


def _check_gpt2_small(graph: Any, task: str) -> ComputeGraph:
    if not isinstance(graph, ComputeGraph):
        raise ConfigError(f"The {task!r} reference needs a ComputeGraph; got "
                          f"{type(graph).__name__}.")
    shape = (graph.n_layers, graph.n_heads, graph.n_kv_heads, graph.attn_only,
             graph.parallel_attn_mlp)
    if shape != (12, 12, 12, False, False):
        raise ConfigError(
            f"The {task!r} reference circuit is defined on GPT-2 small (12 layers x 12 heads, "
            f"multi-head attention, MLPs, sequential attention/MLP); got {graph!r}. It cannot be "
            "mapped onto a model of another shape.")
    return graph


def _check_recipe(recipe: str, allowed: tuple[str, ...], task: str) -> None:
    if recipe not in allowed:
        raise ConfigError(f"recipe for the {task!r} reference must be one of {list(allowed)}; "
                          f"got {recipe!r}.")


def ioi_reference(graph: ComputeGraph, *, recipe: str = "acdc") -> Circuit:
    """The IOI circuit of Wang et al. (2022) on GPT-2 small, at edge level.

    **Nodes.** The 26 heads of :data:`IOI_HEADS`, by class (Wang et al. 2022, Figure 2):
    name movers 9.9, 9.6, 10.0; backup name movers 10.10, 10.6, 10.2, 10.1, 11.2, 9.7, 9.0,
    11.9; negative name movers 10.7, 11.10; S-inhibition 7.3, 7.9, 8.6, 8.10; induction 5.5,
    5.8, 5.9, 6.9; duplicate token 0.1, 0.10, 3.0; previous token 2.2, 4.11 (3 + 8 + 2 + 4 + 4
    + 3 + 2 = 26; the same 26 heads as ACDC's ``IOI_CIRCUIT``, which also lists and leaves out
    the doubtful 7.1, 2.9, 4.3, 4.7, 5.6, 3.3, 3.7, 3.6). They go into
    ``metadata["node_classes"]``; MLPs, ``input`` and ``logits`` get no class.

    **Edges, recipe "acdc"** (the default; exactly ACDC's ``get_ioi_true_edges``). Write
    ``input+`` for ``input`` and every MLP, ``C`` for the 26 heads. The reference holds:

    1. every edge among ``input``, the MLPs and ``logits`` (``input->mL``, ``mK->mL``,
       ``input->logits``, ``mL->logits``) — ACDC's code masks only the non-circuit heads and
       so keeps every MLP (Wang et al. analyse heads only and do not place MLPs in the
       circuit);
    2. every edge from a head of ``C`` into an MLP (all downstream MLPs, its own layer's
       included) and every edge from an MLP into a q, k or v input of a head of ``C``;
    3. the class-to-class connections of the paper's circuit diagram, per q/k/v input:

       - ``input+`` -> previous-token and duplicate-token heads: q, k, v;
       - ``input+`` -> S-inhibition heads: q (their keys/values come from the heads below);
       - ``input+`` -> name, backup and negative name movers: k, v (they attend to and copy the
         names; their queries come from S-inhibition);
       - previous token -> induction: k, v (K-composition; induction heads get no input edge);
       - induction -> S-inhibition and duplicate token -> S-inhibition: k, v (the S2 signal is
         read at the S2 token, which S-inhibition heads attend to);
       - S-inhibition -> name, backup and negative name movers: q (Q-composition);
       - name, backup and negative name movers -> ``logits``;

       restricted to pairs where the sender is upstream of the receiver (layer order).

    Nothing else: no edge from a non-circuit head, none into one, no ``input -> head`` edge
    except as listed, no head -> ``logits`` edge except from the three name-mover classes.
    On GPT-2 small this is 963 edges over 40 nodes (input, 26 heads, 12 MLPs, logits).

    **Edges, recipe "heads"**: item 3 only, with ``input+`` read as ``input`` alone — the
    attention-only diagram (no MLP nodes): 182 edges over 28 nodes.

    Args:
        graph: GPT-2 small's graph, ``ComputeGraph(12, 12)``.
        recipe: ``"acdc"`` or ``"heads"``.

    Returns:
        The reference circuit (no scores), with metadata ``task``, ``model``, ``reference``
        (source and recipe) and ``node_classes``.

    Raises:
        ConfigError: ``graph`` is not GPT-2 small's shape, or an unknown ``recipe``.

    References:
        Wang et al. 2022, arXiv:2211.00593, Figure 2 and Section 3 (head classes and the
        circuit diagram); Conmy et al. 2023, arXiv:2304.14997, IOI ground truth
        (``acdc/ioi/utils.py::get_ioi_true_edges``).
    """
    graph = _check_gpt2_small(graph, "ioi")
    _check_recipe(recipe, ("acdc", "heads"), "ioi")
    heads = {cls: [_head(*lh) for lh in members] for cls, members in IOI_HEADS.items()}
    circuit_heads = [name for members in heads.values() for name in members]
    mlps = [f"m{layer}" for layer in range(graph.n_layers)]
    kept = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)

    def add(senders: Iterable[str], receivers: Iterable[str]) -> None:
        rec = [graph.receiver_index(r) for r in receivers]
        for sender in senders:
            s = graph.node_index(sender)
            for r in rec:
                if s < int(graph.n_upstream[r]):  # the sender is upstream of the receiver
                    kept[s, r] = True

    def qkv_receivers(names: Iterable[str], letters: str) -> list[str]:
        return [f"{name}<{x}>" for name in names for x in letters]

    sources = ["input"] + (mlps if recipe == "acdc" else [])
    if recipe == "acdc":
        add(["input"] + mlps, mlps + ["logits"])                     # rule 1
        add(circuit_heads, mlps)                                     # rule 2
        add(mlps, qkv_receivers(circuit_heads, "qkv"))               # rule 2
    for sender, receiver, letters in _IOI_CONNECTIONS:               # rule 3
        senders = sources if sender == "input" else heads[sender]
        receivers = (["logits"] if receiver == "logits"
                     else qkv_receivers(heads[receiver], letters))
        add(senders, receivers)
    classes = {name: cls for cls, members in heads.items() for name in members}
    metadata = {
        "task": "ioi",
        "model": "gpt2",
        "reference": {
            "source": "Wang et al. 2022 (arXiv:2211.00593) head classes; edges as the IOI "
                      "ground truth of Conmy et al. 2023 (arXiv:2304.14997)",
            "recipe": recipe,
        },
        "node_classes": classes,
    }
    return Circuit(graph, kept, None, metadata)


# ------------------------------------------------------------------------------------ greater-than
GREATER_THAN_NODES: dict[str, tuple[str, ...]] = {
    "early attention": ("a0.h1", "a0.h3", "a0.h5"),
    "early MLP": ("m0", "m1", "m2", "m3"),
    "mid attention": ("a5.h5", "a6.h1", "a6.h9", "a7.h10", "a8.h11", "a9.h1"),
    "late MLP": ("m8", "m9", "m10", "m11"),
}
"""The greater-than circuit on GPT-2 small (Hanna et al. 2023, as encoded by ACDC), by role."""


def greater_than_reference(graph: ComputeGraph, *, recipe: str = "acdc") -> Circuit:
    """The greater-than circuit of Hanna et al. (2023) on GPT-2 small, at edge level.

    **Nodes** (:data:`GREATER_THAN_NODES`, the node set of ACDC's greater-than ground truth):
    heads 0.1, 0.3, 0.5 ("early attention") and MLPs 0–3 ("early MLP"), which build the
    representation of the start year ``YY``; heads 5.5, 6.1, 6.9, 7.10, 8.11, 9.1 ("mid
    attention"), which move it to the last position; MLPs 8–11 ("late MLP"), which compute
    greater-than and write to the logits. The classes go into ``metadata["node_classes"]``.

    **Edges, recipe "acdc"** (the default; exactly ACDC's ``get_greaterthan_true_edges``, whose
    groups are 01 = {0.1}, 0305 = {0.3, 0.5}, MEARLY = MLPs 0–3, AMID = the mid heads,
    MLATE = MLPs 8–11):

    1. ``input`` -> q, k, v of heads 0.1, 0.3, 0.5, and ``input`` -> MLPs 0–3;
    2. mid heads and MLPs 8–11 -> ``logits``;
    3. within MEARLY and within MLATE, every earlier MLP -> every later MLP;
    4. group to group, to every input of the receiving node (q, k and v of a head, the MLP
       input), wherever the sender is upstream: 01 -> MEARLY (0.1 -> m0..m3), 01 -> AMID,
       0305 -> AMID, MEARLY -> AMID, AMID -> MLATE;
    5. every MLP ``mK -> mL`` with ``K < L <= 8`` (ACDC: "connect all MLPs before the AMID
       heads", because Hanna et al. patch the mid heads' queries with clean inputs);
    6. every MLP -> the q input of each mid head it is upstream of.

    Items 5 and 6 bring MLPs 4–7 into the edge set (as unclassified nodes), as in ACDC: 235
    edges over 23 nodes on GPT-2 small.
    There is no edge from 0.3/0.5 to the early MLPs and none from early nodes to ``logits``,
    as in ACDC.

    **Edges, recipe "induced"**: every edge of the graph whose sender is ``input`` or a circuit
    node and whose receiver is read by a circuit node or is ``logits`` — the subgraph induced
    by the node set plus ``input`` and ``logits``, all q/k/v inputs included.

    Not verified against the paper's text here: Hanna et al.'s head list; their
    path-patching figures may name further mid-layer heads (e.g. 5.1, 8.8) that ACDC's
    encoding leaves out. This module follows ACDC's encoding, the ground truth the ROC
    protocol of Conmy et al. scores against.

    Args:
        graph: GPT-2 small's graph, ``ComputeGraph(12, 12)``.
        recipe: ``"acdc"`` or ``"induced"``.

    Returns:
        The reference circuit (no scores), with metadata ``task``, ``model``, ``reference``
        and ``node_classes``.

    Raises:
        ConfigError: ``graph`` is not GPT-2 small's shape, or an unknown ``recipe``.

    References:
        Hanna et al. 2023, arXiv:2305.00586, Section 3; Conmy et al. 2023, arXiv:2304.14997,
        greater-than ground truth (``acdc/greaterthan/utils.py::get_greaterthan_true_edges``).
    """
    graph = _check_gpt2_small(graph, "greater_than")
    _check_recipe(recipe, ("acdc", "induced"), "greater_than")
    kept = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)

    def inputs(node: str) -> list[str]:
        return [node] if node.startswith("m") or node == "logits" else [
            f"{node}<{x}>" for x in "qkv"]

    def add(senders: Iterable[str], receivers: Iterable[str]) -> None:
        rec = [graph.receiver_index(r) for r in receivers]
        for sender in senders:
            s = graph.node_index(sender)
            for r in rec:
                if s < int(graph.n_upstream[r]):
                    kept[s, r] = True

    def all_inputs(nodes: Iterable[str]) -> list[str]:
        return [r for node in nodes for r in inputs(node)]

    early_heads = GREATER_THAN_NODES["early attention"]
    early_mlps = GREATER_THAN_NODES["early MLP"]
    mid = GREATER_THAN_NODES["mid attention"]
    late = GREATER_THAN_NODES["late MLP"]
    if recipe == "induced":
        nodes = [n for members in GREATER_THAN_NODES.values() for n in members]
        add(["input", *nodes], all_inputs(nodes) + ["logits"])
    else:
        add(["input"], all_inputs(early_heads) + list(early_mlps))        # 1
        add([*mid, *late], ["logits"])                                     # 2
        for group in (early_mlps, late):                                   # 3
            add(group, group)
        add(["a0.h1"], early_mlps)                                         # 4: 01 -> MEARLY
        add([*early_heads, *early_mlps], all_inputs(mid))                  # 4: -> AMID
        add(mid, late)                                                     # 4: AMID -> MLATE
        add([f"m{k}" for k in range(9)], [f"m{k}" for k in range(9)])      # 5
        add([f"m{k}" for k in range(graph.n_layers)], [f"{h}<q>" for h in mid])  # 6
    classes = {n: cls for cls, members in GREATER_THAN_NODES.items() for n in members}
    metadata = {
        "task": "greater_than",
        "model": "gpt2",
        "reference": {
            "source": "Hanna et al. 2023 (arXiv:2305.00586); nodes and edges as the greater-than "
                      "ground truth of Conmy et al. 2023 (arXiv:2304.14997)",
            "recipe": recipe,
        },
        "node_classes": classes,
    }
    return Circuit(graph, kept, None, metadata)


# ------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class _Entry:
    task: str
    model: str
    builder: ReferenceBuilder
    graph: ComputeGraph | None
    aliases: tuple[str, ...]


_REFERENCES: dict[tuple[str, str], _Entry] = {}
_ALIASES: dict[tuple[str, str], str] = {}  # (task, alias) -> canonical model name


def _model_key(name: str) -> str:
    return name.strip().lower()


def _task_key(task: Any) -> str:
    name = task if isinstance(task, str) else getattr(task, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"task must be a task name or a Task with a name; got {task!r}.")
    return normalize_name(name)


def register_reference(task: str, model_name: str, builder: ReferenceBuilder, *,
                       graph: ComputeGraph | None = None, aliases: Iterable[str] = (),
                       replace: bool = False) -> None:
    """Register the reference circuit of ``task`` on ``model_name``.

    Args:
        task: Task name (``"ioi"``; dashes are accepted as underscores).
        model_name: The model's name as users give it (``"gpt2"``, a zoo organism's name);
            matched case-insensitively against a name string or ``ComputeGraph.model_name``.
        builder: ``builder(graph) -> Circuit``: the reference over ``graph`` (a graph of the
            model's shape; a builder reading a circuit file may return a circuit over its own,
            equally shaped graph). It must keep at least one edge.
        graph: The model's graph, used when the reference is asked for by name. Without it,
            the reference can only be asked for with a ``ComputeGraph``.
        aliases: Other names of the same model (``"openai-community/gpt2"``).
        replace: Allow replacing an existing registration of the same (task, name).

    Raises:
        ConfigError: ``builder`` not callable, an empty name, or the (task, name or alias)
            pair is already registered and ``replace`` is False.
    """
    task_key = _task_key(task)
    if not isinstance(model_name, str) or not model_name.strip():
        raise ConfigError(f"model_name must be a non-empty string; got {model_name!r}.")
    if not callable(builder):
        raise ConfigError(f"builder must be callable as builder(graph) -> Circuit; got "
                          f"{type(builder).__name__}.")
    if graph is not None and not isinstance(graph, ComputeGraph):
        raise ConfigError(f"graph must be a ComputeGraph or None; got {type(graph).__name__}.")
    if isinstance(aliases, str):
        aliases = (aliases,)
    model = _model_key(model_name)
    names = tuple(dict.fromkeys([model, *(_model_key(a) for a in aliases)]))
    for name in names:
        owner = _ALIASES.get((task_key, name))
        if owner is not None and not replace:
            raise ConfigError(f"A reference circuit for task {task_key!r} on model {name!r} is "
                              "already registered; pass replace=True to replace it.")
    if replace:
        for name in names:
            owner = _ALIASES.get((task_key, name))
            if owner is not None:
                unregister_reference(task_key, owner)
    _REFERENCES[(task_key, model)] = _Entry(task_key, model, builder, graph, names)
    for name in names:
        _ALIASES[(task_key, name)] = model


def unregister_reference(task: str, model_name: str) -> None:
    """Remove the registration of (``task``, ``model_name``) and its aliases (no-op if none)."""
    task_key = _task_key(task)
    model = _ALIASES.get((task_key, _model_key(model_name)))
    entry = _REFERENCES.pop((task_key, model), None) if model is not None else None
    if entry is not None:
        for name in entry.aliases:
            _ALIASES.pop((task_key, name), None)


def available_references(task: str | None = None) -> dict[str, list[str]]:
    """``{task: [model names]}`` of the registered references (sorted), or one task's.

    Args:
        task: Restrict to this task, or ``None`` for all.
    """
    wanted = None if task is None else _task_key(task)
    out: dict[str, list[str]] = {}
    for task_key, model in sorted(_REFERENCES):
        if wanted is None or task_key == wanted:
            out.setdefault(task_key, []).append(model)
    if wanted is not None:
        out.setdefault(wanted, [])
    return out


def reference_circuit(task: Any, model: str | ComputeGraph) -> Circuit:
    """The reference circuit of ``task`` on ``model``.

    Args:
        task: A task name (``"ioi"``, ``"greater-than"``) or a Task.
        model: A model name (``"gpt2"``, ``"openai-community/gpt2"``, ``"gpt2-small"``,
            case-insensitive) or a ComputeGraph whose ``model_name`` is set. A graph must have
            the shape of the registered model's graph; the reference is then built over it.

    Returns:
        The reference circuit: at least one kept edge, no scores unless the source has them,
        metadata with ``node_classes`` where the source classifies nodes.

    Raises:
        NoReferenceError: no reference for (task, model); the message lists the models that
            have one for the task (a ConfigError and an UnknownNameError).
        ConfigError: a graph without ``model_name``, a graph whose shape differs from the
            registered model's, or a builder returning something that is not a non-empty
            circuit of the graph's shape.
    """
    task_key = _task_key(task)
    if isinstance(model, ComputeGraph):
        if not model.model_name:
            raise ConfigError(
                "reference_circuit got a ComputeGraph without model_name, so it cannot tell "
                "which model's reference to build; build the graph with ComputeGraph.from_model "
                "or pass model_name=..., or pass the model name as a string.")
        name, graph = model.model_name, model
    elif isinstance(model, str):
        name, graph = model, None
    else:
        raise ConfigError(f"model must be a model name or a ComputeGraph; got "
                          f"{type(model).__name__}.")
    canonical = _ALIASES.get((task_key, _model_key(name)))
    if canonical is None:
        available = available_references(task_key)[task_key]
        have = ", ".join(available) if available else "none"
        raise NoReferenceError(f"no reference circuit for task {task_key!r} on model {name!r}; "
                               f"available: {have}.")
    entry = _REFERENCES[(task_key, canonical)]
    if graph is None:
        if entry.graph is None:
            raise ConfigError(f"The reference circuit for task {task_key!r} on model "
                              f"{canonical!r} needs the model's graph: pass a ComputeGraph "
                              "(ComputeGraph.from_model(model)) instead of the name.")
        graph = entry.graph
    elif entry.graph is not None and graph != entry.graph:  # equal graphs: same shape
        raise ConfigError(f"The reference circuit for task {task_key!r} on model {canonical!r} "
                          f"is defined on {entry.graph!r}; got {graph!r}, whose shape differs.")
    circuit = entry.builder(graph)
    if not isinstance(circuit, Circuit):
        raise ConfigError(f"The reference builder for ({task_key!r}, {canonical!r}) returned "
                          f"{type(circuit).__name__}, not a Circuit.")
    if circuit.graph != graph:
        raise ConfigError(f"The reference builder for ({task_key!r}, {canonical!r}) returned a "
                          f"circuit over {circuit.graph!r}; expected the shape of {graph!r}.")
    if circuit.n_edges == 0:
        raise ConfigError(f"The reference builder for ({task_key!r}, {canonical!r}) returned an "
                          "empty circuit; a reference must keep at least one edge.")
    if circuit.graph is not graph:  # same shape (== above), maybe another model_name: use
        # the caller's graph object, so the circuit carries its model_name
        circuit = Circuit(graph, circuit.kept, circuit.scores, circuit.metadata)
    return circuit


_GPT2_ALIASES = ("openai-community/gpt2", "gpt2-small", "gpt2_small")


def _register_builtins() -> None:
    gpt2 = ComputeGraph(12, 12, model_name="gpt2")
    register_reference("ioi", "gpt2", ioi_reference, graph=gpt2, aliases=_GPT2_ALIASES)
    register_reference("greater_than", "gpt2", greater_than_reference, graph=gpt2,
                       aliases=_GPT2_ALIASES)


_register_builtins()
