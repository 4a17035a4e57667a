"""Model organisms: small transformers trained by circuitfind, with known circuits.

Each organism is a tiny Hugging Face ``GPT2LMHeadModel`` plus a word-level tokenizer, shipped
inside the package (``circuitfind/zoo/models/<name>/``, a few hundred kB each) and trained by
project code (``python -m circuitfind.zoo.train NAME`` retrains it deterministically on a CPU in
minutes). Each has a task, a mechanism verified by attention patterns and exact patching, and a
reference circuit (``reference_circuit.json``) against which discovery algorithms can be scored
(AUROC, as in the ACDC paper). ``zoo/README.md`` documents every organism and its numbers.

Usage::

    import circuitfind as cf
    from circuitfind import zoo

    model = cf.load_model("zoo:induction-2l")           # offline, from the package
    reference = zoo.reference_circuit("induction-2l")  # a Circuit
    cf.reference_circuit("induction", "zoo:induction-2l")  # the same, through the registry
    zoo.default_organism("ioi")                        # "ioi-small"

Note that the reference circuit's graph is named ``zoo:<name>`` (``graph.model_name``), while
``ComputeGraph.from_model`` on the loaded bridge records the model directory; the structure
(layers, heads, edge order) is the same, so masks and scores line up index for index.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuitfind.errors import ConfigError, UnknownNameError
from circuitfind.models import register_model_source, zoo_name, zoo_source
from circuitfind.registry import normalize_name

__all__ = ["ZOO", "ZooEntry", "MODELS_DIR", "zoo_model_dir", "reference_circuit", "metrics",
           "default_organism", "names"]

MODELS_DIR = Path(__file__).resolve().parent / "models"
"""Directory holding one sub-directory of files per organism."""


@dataclass(frozen=True)
class ZooEntry:
    """A zoo organism as listed by :data:`ZOO`.

    Attributes:
        name: Zoo name (``"induction-2l"``); load it with ``cf.load_model("zoo:" + name)``.
        description: One line.
        task: Its default circuitfind task (a registered task name).
        mechanism: One-line summary of its verified mechanism.
    """

    name: str
    description: str
    task: str
    mechanism: str

    @property
    def path(self) -> Path:
        """The organism's model directory inside the package."""
        return MODELS_DIR / self.name

    @property
    def shipped(self) -> bool:
        """Whether this installation holds the organism's trained files.

        An organism can be defined (and trainable with ``python -m circuitfind.zoo.train``)
        before a trained model that passes its checks is shipped; see ``zoo/README.md``.
        """
        return (self.path / "config.json").is_file() and (
            self.path / "model.safetensors").is_file()


def _entries() -> dict[str, ZooEntry]:
    from circuitfind.zoo.organisms import ORGANISMS

    return {name: ZooEntry(name, o.description, o.task, o.mechanism)
            for name, o in ORGANISMS.items()}


ZOO: dict[str, ZooEntry] = _entries()
"""name -> :class:`ZooEntry` for every organism."""

_DEFAULT_FOR_TASK = {"induction": "induction-2l", "ioi": "ioi-small",
                     "greater_than": "greater-than-small"}


def names() -> list[str]:
    """The zoo's organism names, sorted."""
    return sorted(ZOO)


def _entry(name: str) -> ZooEntry:
    if not isinstance(name, str):
        raise ConfigError(f"A zoo name must be a string; got {type(name).__name__}.")
    key = zoo_name(name) or name.strip()
    if key not in ZOO:
        close = difflib.get_close_matches(key, names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"Unknown zoo organism {name!r}.{hint} Available organisms: "
                               f"{', '.join(names())}.")
    return ZOO[key]


def zoo_model_dir(name: str) -> Path:
    """The directory of a zoo organism's model files (config, weights, tokenizer).

    Args:
        name: Organism name, with or without the ``zoo:`` prefix.

    Returns:
        The directory (inside the installed package).

    Raises:
        UnknownNameError: no such organism; the message lists the zoo's names.
        ConfigError: the organism's files are missing from this installation (retrain with
            ``python -m circuitfind.zoo.train NAME``).
    """
    entry = _entry(name)
    path = entry.path
    if not entry.shipped:
        raise ConfigError(f"The files of zoo organism {entry.name!r} are missing from "
                          f"{str(path)!r}. Reinstall circuitfind or retrain it with "
                          f"`python -m circuitfind.zoo.train {entry.name}`.")
    return path


def reference_circuit(name: str) -> Any:
    """The shipped reference circuit of an organism.

    Args:
        name: Organism name (``zoo:`` prefix allowed).

    Returns:
        A :class:`~circuitfind.graphs.circuit.Circuit` whose ``metadata`` records how it was
        derived (``metadata["derivation"]``), the data seed and the faithfulness; its scores
        are the exact single-edge effects (metric units).

    Raises:
        UnknownNameError: no such organism.
        ConfigError: the file is missing or unreadable.
    """
    from circuitfind.graphs.circuit import Circuit

    return Circuit.from_json(zoo_model_dir(name) / "reference_circuit.json")


def metrics(name: str) -> dict[str, Any]:
    """The measured numbers of an organism (its shipped ``metrics.json``).

    Raises:
        UnknownNameError: no such organism.
        ConfigError: the file is missing.
    """
    path = zoo_model_dir(name) / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"No metrics.json for zoo organism {name!r} at {str(path)!r}.")
    return json.loads(path.read_text())


def default_organism(task_name: str) -> str | None:
    """The zoo organism trained for a task, or ``None`` if there is none.

    Args:
        task_name: A task name (dashes accepted: ``"greater-than"``).

    Returns:
        ``"induction-2l"`` for ``induction``, ``"ioi-small"`` for ``ioi``,
        ``"greater-than-small"`` for ``greater_than`` -- each only where its trained files
        are shipped (:attr:`ZooEntry.shipped`); ``None`` otherwise.
    """
    name = _DEFAULT_FOR_TASK.get(normalize_name(task_name))
    return name if name is not None and ZOO[name].shipped else None


def _register_references() -> None:
    """Register each shipped organism's reference circuit as (its task, ``zoo:NAME``).

    :func:`circuitfind.tasks.reference_circuit` and :func:`circuitfind.api.find_reference`
    then find them like the literature's references. The graph is the organism's
    architecture (its key/value heads, parallel blocks for GPT-NeoX; attention-only organisms
    keep their all-zero MLP nodes).
    """
    from circuitfind.graphs.graph import ComputeGraph
    from circuitfind.tasks.references import register_reference
    from circuitfind.zoo.organisms import FAMILIES, ORGANISMS

    for name, entry in ZOO.items():
        if not entry.shipped:
            continue
        org = ORGANISMS[name]
        parallel = bool(FAMILIES.get(org.family, ("", "", {}))[2].get("use_parallel_residual"))
        graph = ComputeGraph(org.n_layers, org.n_heads, org.n_kv_heads or org.n_heads,
                             parallel_attn_mlp=parallel, model_name=zoo_source(name))

        def build(_graph: ComputeGraph, name: str = name) -> Any:
            return reference_circuit(name)

        register_reference(entry.task, zoo_source(name), build, graph=graph, replace=True)


_register_references()


register_model_source("zoo:", zoo_model_dir)  # zoo:NAME model arguments
