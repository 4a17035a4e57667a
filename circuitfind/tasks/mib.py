"""Task data of the MIB benchmark's circuit-localization track, as prompt tasks.

MIB (Mueller et al. 2025) ships its circuit tasks as Hugging Face data sets under
``mib-bench/``: one row per example with a clean ``prompt`` and counterfactual columns
``<kind>_counterfactual`` (each an object with its own ``prompt`` and answer fields). This
module maps each task to clean/corrupted prompts and answers as MIB's circuit-track code does,
with MIB's metric, the logit difference:

- ``ioi`` (``mib-bench/ioi``): corrupted = ``s2_io_flip_counterfactual``; answer
  ``" " + metadata.indirect_object``, wrong ``" " + metadata.subject``;
- ``mcqa`` (``mib-bench/copycolors_mcqa``, config ``4_answer_choices``), ``arc_easy``
  (``mib-bench/arc_easy``), ``arc_challenge`` (``mib-bench/arc_challenge``): corrupted =
  ``symbol_counterfactual``; answer ``choices.label[answerKey]``, wrong the same field of the
  counterfactual;
- ``arithmetic_addition`` / ``arithmetic_subtraction`` (``mib-bench/arithmetic_addition`` /
  ``_subtraction``, rows with ``operator`` ``+`` / ``-``): corrupted = ``random_counterfactual``;
  answer ``str(label)``, wrong the counterfactual's ``label``.

Every ``*_counterfactual`` column present in the data is a valid ``counterfactual`` (MIB defines
e.g. ``abc_counterfactual``, ``random_names_counterfactual``, ``s1_io_flip_counterfactual`` for
IOI and ``answerPosition_counterfactual``, ``randomLetter_counterfactual`` for MCQA/ARC); an
unknown one is an error listing those the data have. As in MIB's code, the IOI wrong answer is
the clean prompt's subject whatever the counterfactual, and rows whose answers are not single
tokens for the model's tokenizer (or equal their wrong answer) are dropped and counted in
``TaskData.info["dropped"]``. Answer tokens follow :mod:`circuitfind.tasks.files`: what the
tokenizer makes of prompt + answer after the prompt (MIB's code encodes the answer text on its
own, which gives the same token for byte-level BPE tokenizers such as GPT-2's).

Sources. ``data`` is a local directory — a data set saved with ``Dataset.save_to_disk`` /
``DatasetDict.save_to_disk``, or a directory of data files (a clone of the hub repository,
JSONL / Parquet / CSV files) read with ``datasets.load_dataset`` — or ``None`` for the hub
(needs internet or the Hugging Face cache). The ``datasets`` package is imported only here.

From the command line, a JSON task file names MIB data::

    {"mib": "ioi", "data": "data/mib_ioi", "split": "train",
     "counterfactual": "abc_counterfactual"}

(``data`` relative to the file); the registered tasks ``mib_ioi``, ``mib_mcqa``, ... read the hub.

References:
    Mueller et al. "MIB: A Mechanistic Interpretability Benchmark." ICML 2025,
    arXiv:2504.13151 (Section 3 and Appendix: the circuit-track tasks, counterfactuals and
    metric); github.com/aaronmueller/MIB (``MIB-circuit-track/dataset.py``: the mapping).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from circuitfind.errors import ConfigError, TaskDataError
from circuitfind.registry import normalize_name
from circuitfind.tasks.base import TASKS, Task, TaskData
from circuitfind.tasks.files import PromptRow, PromptTask

__all__ = ["MIB_TASKS", "MIBSpec", "load_mib_rows", "mib_task", "mib_task_from_spec"]


@dataclass(frozen=True)
class MIBSpec:
    """How one MIB circuit task is read.

    Attributes:
        hub: Hugging Face data set name.
        config: Its configuration name, or ``None``.
        counterfactual: The default counterfactual column (MIB's).
        kind: Row layout: ``"ioi"``, ``"choice"`` (MCQA, ARC) or ``"arithmetic"``.
        operator: For arithmetic: the ``operator`` value of the rows kept.
        description: One line.
    """

    hub: str
    config: str | None
    counterfactual: str
    kind: str
    operator: str | None = None
    description: str = ""


MIB_TASKS: dict[str, MIBSpec] = {
    "ioi": MIBSpec("mib-bench/ioi", None, "s2_io_flip_counterfactual", "ioi",
                   description="MIB IOI: logit difference indirect object - subject"),
    "mcqa": MIBSpec("mib-bench/copycolors_mcqa", "4_answer_choices", "symbol_counterfactual",
                    "choice", description="MIB copy-colors multiple choice: answer letter"),
    "arithmetic_addition": MIBSpec("mib-bench/arithmetic_addition", None, "random_counterfactual",
                                   "arithmetic", "+", "MIB two-operand addition: the sum"),
    "arithmetic_subtraction": MIBSpec("mib-bench/arithmetic_subtraction", None,
                                      "random_counterfactual", "arithmetic", "-",
                                      "MIB two-operand subtraction: the difference"),
    "arc_easy": MIBSpec("mib-bench/arc_easy", None, "symbol_counterfactual", "choice",
                        description="MIB ARC (easy) multiple choice: answer letter"),
    "arc_challenge": MIBSpec("mib-bench/arc_challenge", None, "symbol_counterfactual", "choice",
                             description="MIB ARC (challenge) multiple choice: answer letter"),
}
"""MIB circuit-track task name -> :class:`MIBSpec`."""


def _spec(task: str) -> tuple[str, MIBSpec]:
    key = normalize_name(str(task))
    key = key[4:] if key.startswith("mib_") else key
    if key not in MIB_TASKS:
        raise ConfigError(f"Unknown MIB task {task!r}; MIB's circuit tasks are "
                          f"{', '.join(MIB_TASKS)}.")
    return key, MIB_TASKS[key]


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - installed with transformer-lens
        raise ConfigError("Reading MIB task data needs the 'datasets' package: "
                          "pip install datasets") from err
    return datasets


def _load_split(spec: MIBSpec, data: str | os.PathLike[str] | None, split: str) -> Any:
    """The rows of one split as a ``datasets.Dataset`` (or any sequence of mappings)."""
    datasets = _datasets()
    if data is None:
        try:
            return datasets.load_dataset(spec.hub, spec.config, split=split)
        except Exception as err:  # hub, network and cache failures
            raise ConfigError(
                f"Could not load {spec.hub!r} from the Hugging Face hub or its cache "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}). "
                "Offline, save a copy elsewhere (datasets.load_dataset("
                f"{spec.hub!r}{', ' + repr(spec.config) if spec.config else ''})"
                ".save_to_disk(DIR)) and point a task file at it: "
                '{"mib": "...", "data": "DIR"}.') from err
    path = Path(data).expanduser()
    if not path.is_dir():
        raise ConfigError(f"MIB data directory {str(path)!r} does not exist (pass a directory "
                          "written by save_to_disk, or one holding the data set's files).")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"{str(path)!r} has no split {split!r}; it has "
                                  f"{', '.join(loaded)}.")
            return loaded[split]
        return loaded
    try:
        return datasets.load_dataset(str(path), spec.config, split=split)
    except ValueError as err:
        raise ConfigError(f"Could not read MIB data from {str(path)!r} (split {split!r}, config "
                          f"{spec.config!r}): {err}") from err


def _counterfactuals(row: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in row if k.endswith("_counterfactual"))


def _label(block: Mapping[str, Any]) -> str:
    """``choices.label[answerKey]`` (answerKey an index or the label itself)."""
    labels = list(block["choices"]["label"])
    key = block["answerKey"]
    if isinstance(key, str) and key in labels:
        return key
    return str(labels[int(key)])


def _map_row(spec: MIBSpec, row: Mapping[str, Any], cf: str) -> tuple[str, str, str, str] | None:
    """``(clean, corrupted, answer, wrong)`` of one MIB row, or ``None`` if MIB skips it."""
    other = row.get(cf)
    if not isinstance(other, Mapping) or other.get("prompt") is None:
        return None
    if spec.kind == "ioi":
        meta = row["metadata"]
        return row["prompt"], other["prompt"], f" {meta['indirect_object']}", f" {meta['subject']}"
    if spec.kind == "choice":
        return row["prompt"], other["prompt"], _label(row), _label(other)
    if row.get("operator", spec.operator) != spec.operator or other.get("label") is None:
        return None
    return row["prompt"], other["prompt"], str(row["label"]), str(other["label"])


def load_mib_rows(task: str, data: str | os.PathLike[str] | None = None, split: str = "train",
                  counterfactual: str | None = None) -> list[PromptRow]:
    """Read an MIB circuit task's rows as clean/corrupted prompt rows.

    Args:
        task: ``ioi``, ``mcqa``, ``arithmetic_addition``, ``arithmetic_subtraction``,
            ``arc_easy`` or ``arc_challenge`` (an ``mib_`` prefix and dashes accepted).
        data: Local directory (see the module docstring) or ``None`` for the hub.
        split: Data split (``train``, ``validation``, ``test``).
        counterfactual: Counterfactual column (default: MIB's for the task).

    Returns:
        The rows in data-set order (``where`` = "row i" of the split, 1-based); rows MIB
        skips (no counterfactual prompt, another operator) are left out.

    Raises:
        ConfigError: unknown task, missing directory or split, hub unreachable, or an unknown
            counterfactual (the message lists the data's).
        TaskDataError: a row lacks the fields of MIB's format, or no row is left.
    """
    _, spec = _spec(task)
    table = _load_split(spec, data, split)
    cf = counterfactual or spec.counterfactual
    rows: list[PromptRow] = []
    for i, raw in enumerate(table, 1):
        if i == 1 and cf not in raw:
            raise ConfigError(f"The MIB {task!r} data have no counterfactual {cf!r}; they have "
                              f"{', '.join(_counterfactuals(raw)) or 'none'}.")
        try:
            mapped = _map_row(spec, raw, cf)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise TaskDataError(f"MIB {task!r} row {i} is not in MIB's format ({type(err).__name__}: "
                                f"{err}); expected the fields of {spec.hub!r}.") from err
        if mapped is not None:
            clean, corrupted, answer, wrong = mapped
            rows.append(PromptRow(clean, corrupted, (answer,), (wrong,), f"row {i}"))
    if not rows:
        raise TaskDataError(f"The MIB {task!r} data (split {split!r}) have no usable row.")
    return rows


def mib_task(task: str, data: str | os.PathLike[str] | None = None, split: str = "train",
             counterfactual: str | None = None, metric: str = "logit_diff",
             first_token: bool = False, source: str | None = None) -> PromptTask:
    """An MIB circuit task as a :class:`~circuitfind.tasks.files.PromptTask`.

    Args:
        task, data, split, counterfactual: See :func:`load_mib_rows`.
        metric: MIB's is ``logit_diff`` (the default).
        first_token: Use the first token of multi-token answers instead of dropping the row.
        source: Provenance (default: the directory or hub name).

    Returns:
        A PromptTask named ``mib_<task>`` whose rows with unusable answers are dropped at
        build time, as in MIB (``default_n`` 64).

    Raises:
        See :func:`load_mib_rows`.
    """
    key, spec = _spec(task)
    rows = load_mib_rows(key, data, split, counterfactual)
    cf = counterfactual or spec.counterfactual
    where = str(data) if data is not None else spec.hub
    out = PromptTask(rows, metric=metric, name=f"mib_{key}",
                     description=f"{spec.description} ({cf}, {split} split)",
                     first_token=first_token, drop_invalid=True, source=source or where)
    out.default_n = min(64, len(rows))
    return out


def mib_task_from_spec(doc: Mapping[str, Any], base_dir: Path, metric: str | None = None,
                       first_token: bool = False, source: str | None = None) -> PromptTask:
    """An MIB task from a JSON task file's object ``{"mib": TASK, "data": DIR, ...}``.

    Keys: ``mib`` (required), ``data`` (directory, relative to the file; omitted: the hub),
    ``split``, ``counterfactual``, ``metric``.

    Raises:
        ConfigError: unknown keys or values (see :func:`mib_task`).
    """
    allowed = {"mib", "data", "split", "counterfactual", "metric", "name", "description"}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} in an MIB task file; "
                          f"allowed: {', '.join(sorted(allowed))}.")
    data = doc.get("data")
    if data is not None:
        data = base_dir / Path(str(data)).expanduser()
    return mib_task(str(doc["mib"]), data=data, split=str(doc.get("split", "train")),
                    counterfactual=doc.get("counterfactual"),
                    metric=metric or doc.get("metric") or "logit_diff", first_token=first_token,
                    source=source)


def _registered(key: str, spec: MIBSpec) -> type[Task]:
    """A registry class for an MIB task read from the hub on first build."""

    class _MIBHubTask(Task):
        __doc__ = f"{spec.description}; data {spec.hub!r} from the Hugging Face hub."
        name = f"mib_{key}"
        description = f"{spec.description} (hub: {spec.hub})"
        metric_name = "logit difference"
        metric_unit = "logits"

        def __init__(self) -> None:  # rows are read lazily: listing tasks needs no network
            self._loaded: PromptTask | None = None

        def _task(self) -> PromptTask:
            if self._loaded is None:
                self._loaded = mib_task(key)
            return self._loaded

        def build(self, tokenizer: Any, n: int | None = None, seed: int = 0) -> TaskData:
            """Read the hub data (once) and build like :meth:`PromptTask.build`."""
            return self._task().build(tokenizer, n, seed)

        def metric(self, logits: Tensor, data: TaskData) -> Tensor:
            """The logit difference (see :meth:`PromptTask.metric`)."""
            return self._task().metric(logits, data)

    _MIBHubTask.__name__ = _MIBHubTask.__qualname__ = f"MIB_{key}"
    return _MIBHubTask


for _key, _value in MIB_TASKS.items():
    TASKS.register(f"mib_{_key}")(_registered(_key, _value))
