"""Tasks from the user's own prompt files: JSONL, CSV or JSON rows of clean/corrupted pairs.

A prompt file is one row per example::

    {"clean": "... named Lily. She liked to play. One day,", "corrupted": "... named Tim. He ...",
     "answer": " she", "wrong": " he"}

``answer`` and ``wrong`` are the text that follows the prompt, with its leading space where
there is one; either may be a list (several correct / wrong continuations). In a CSV file the
columns are the same and a cell holding a JSON list (``["Lily", " Lila"]``) gives several. A
``.json`` file is either a list of rows or an object ``{"name": ..., "description": ...,
"metric": ..., "examples": [rows]}``; an object with a ``"mib"`` key loads MIB task data
instead (:mod:`circuitfind.tasks.mib`).

Answer tokens. The answer token is what the model's tokenizer makes of ``prompt + answer``
after the prompt's own tokens: correct for GPT-2's BPE (``" Lily"`` is one token) and for
SentencePiece-style tokenizers such as stories260k's, where ``" Lily"`` alone encodes to
``['▁', '▁Lily']`` but after a prompt to ``['▁Lily']``. An answer that adds several tokens is an
error naming them, unless ``first_token=True`` (CLI ``--first-token``) asks for the first.

Metrics (per example, at the clean prompt's last token; unit in brackets):

- ``logit_diff`` (default): mean logit of the answers minus mean logit of the wrong answers
  [logits]; with one of each, the usual logit difference;
- ``prob_diff``: summed probability of the answers minus that of the wrong answers [probability];
- ``log_prob``: log of the summed probability of the answers [nats] (``wrong`` is optional);
- ``kl``: KL divergence of the circuit's next-token distribution from the full model's [nats],
  lower is better (``wrong`` is optional). It needs the full model's logits, which
  :func:`circuitfind.build_data` adds; its gradient at the full model is zero, so first-order
  attribution (``eap``) scores every edge 0 with it; use ``exact``.

Lengths. Clean and corrupted prompts may tokenize to different lengths, and rows may differ in
length: every prompt is right-padded to the longest, ``attention_mask`` /
``corrupted_attention_mask`` mark real tokens, and the metric is read at each example's last
real **clean** token. Where a clean prompt and its corrupted prompt differ in length, the clean
run's positions are the ones patched and read: position ``t`` of the clean run receives the
corrupted run's position ``t``. With causal models, padding never reaches an earlier position,
so every example's scores are those of running it on its own (tested).

Validation. Reading a file reports every structural problem at once, each with its line (JSONL,
CSV) or row number (JSON): unreadable encoding or JSON, missing columns, empty prompts, an answer
equal to its wrong answer, no rows at all. Tokenizing reports every answer that is several
tokens or merges with the end of its prompt, with the tokens.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError, TaskDataError
from circuitfind.registry import normalize_name
from circuitfind.tasks.base import TASK_FILE_SUFFIXES, TASKS, Task, TaskData
from circuitfind.tasks.metrics import kl_div
from circuitfind.tasks.tokens import bos_id, encode, pad_id

__all__ = ["METRICS", "PromptRow", "PromptTask", "load_prompt_file", "read_rows"]

METRICS: dict[str, tuple[str, str, bool]] = {
    "logit_diff": ("logit difference", "logits", True),
    "prob_diff": ("probability difference", "probability", True),
    "log_prob": ("log-probability", "nats", True),
    "kl": ("KL divergence", "nats", False),
}
"""metric key -> (field name, unit, higher is better)."""

_NEEDS_WRONG = ("logit_diff", "prob_diff")
_MAX_LISTED = 8


@dataclass(frozen=True)
class PromptRow:
    """One example of a prompt file.

    Attributes:
        clean: The clean prompt.
        corrupted: The corrupted prompt.
        answers: Correct continuations (at least one), each with its leading space.
        wrong: Wrong continuations (may be empty for ``log_prob`` / ``kl``).
        where: Location for messages ("line 4", "row 3").
    """

    clean: str
    corrupted: str
    answers: tuple[str, ...]
    wrong: tuple[str, ...]
    where: str


def _problems_error(source: str, problems: Sequence[tuple[str, str]], hint: str = "") -> TaskDataError:
    """One error listing every ``(where, message)`` problem, identical messages grouped."""
    grouped: dict[str, list[str]] = {}
    for where, message in problems:
        grouped.setdefault(message, []).append(where)
    lines = []
    for message, places in grouped.items():
        shown = ", ".join(places[:_MAX_LISTED])
        more = f" and {len(places) - _MAX_LISTED} more" if len(places) > _MAX_LISTED else ""
        lines.append(f"  {shown}{more}: {message}")
    count = len(problems)
    return TaskDataError(f"{source}: {count} problem{'s' if count != 1 else ''}:\n"
                         + "\n".join(lines) + (f"\n{hint}" if hint else ""))


def _as_texts(value: Any) -> tuple[str, ...] | None:
    """A cell or JSON value as a tuple of strings (a JSON list in a CSV cell allowed)."""
    if isinstance(value, str):
        text = value
        if text.lstrip().startswith("[") and text.rstrip().endswith("]"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return (text,)
        else:
            return (text,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _parse_row(raw: Any, where: str, metric: str,
               problems: list[tuple[str, str]]) -> PromptRow | None:
    """Check one raw row (a mapping), appending its problems; the row if it has none."""
    if not isinstance(raw, Mapping):
        problems.append((where, f"a row must be an object with keys clean, corrupted, answer, "
                                f"wrong; got {type(raw).__name__}"))
        return None
    before = len(problems)
    required = ("clean", "corrupted", "answer") + (("wrong",) if metric in _NEEDS_WRONG else ())
    missing = [k for k in required if k not in raw or raw[k] is None]
    if missing:
        found = ", ".join(str(k) for k in raw) or "none"
        problems.append((where, f"missing {', '.join(repr(m) for m in missing)} (found: {found})"))
    for key in ("clean", "corrupted"):
        if key in raw and raw[key] is not None:
            if not isinstance(raw[key], str):
                problems.append((where, f"{key!r} must be a string"))
            elif not raw[key].strip():
                problems.append((where, f"empty {key} prompt"))
    answers = wrong = None
    if raw.get("answer") is not None:
        answers = _as_texts(raw["answer"])
        if answers is None or not all(a for a in answers):
            problems.append((where, "'answer' must be a non-empty string or a list of them"))
    wrong_value = raw.get("wrong")
    if wrong_value == "" and metric not in _NEEDS_WRONG:
        wrong_value = None  # an empty optional CSV cell
    if wrong_value is not None:
        wrong = _as_texts(wrong_value)
        if wrong is None or not all(w for w in wrong):
            problems.append((where, "'wrong' must be a non-empty string or a list of them"))
    if answers and wrong and set(answers) & set(wrong):
        same = sorted(set(answers) & set(wrong))
        problems.append((where, f"answer equal to wrong ({', '.join(map(repr, same))})"))
    if len(problems) > before:
        return None
    return PromptRow(raw["clean"], raw["corrupted"], answers or (), wrong or (), where)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise _problems_error(str(path), [(f"line {line}", f"unreadable encoding: byte "
                                           f"{data[err.start]:#04x} at offset {err.start} is not "
                                           "UTF-8; save the file as UTF-8")]) from err


def read_rows(path: str | os.PathLike[str], metric: str = "logit_diff"
              ) -> tuple[list[PromptRow], dict[str, Any]]:
    """Read and check a prompt file.

    Args:
        path: A ``.jsonl``, ``.csv`` or ``.json`` file (UTF-8).
        metric: The metric the rows are for (``wrong`` is required for ``logit_diff`` and
            ``prob_diff`` only).

    Returns:
        ``(rows, header)``: the rows and, for a JSON object file, its other keys (``name``,
        ``description``, ``metric``); ``{}`` otherwise.

    Raises:
        ConfigError: the file does not exist or has another suffix.
        TaskDataError: every problem of the file, each with its line or row.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"The task file {str(path)!r} {what}. A task is a registered name without a suffix "
            f"({', '.join(TASKS.names())}) or a prompt file ending in "
            f"{', '.join(TASK_FILE_SUFFIXES)}.")
    if suffix not in TASK_FILE_SUFFIXES:
        raise ConfigError(f"Cannot read task file {str(path)!r}: the suffix must be one of "
                          f"{', '.join(TASK_FILE_SUFFIXES)}; got {suffix or 'none'}.")
    text = _decode(path)
    problems: list[tuple[str, str]] = []
    raws: list[tuple[str, Any]] = []
    header: dict[str, Any] = {}
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raws.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                problems.append((f"line {number}", f"not valid JSON ({err.msg}, column {err.colno})"))
    elif suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None:
            raws = []
        else:
            reader.fieldnames = [f.strip() for f in reader.fieldnames]
            for record in reader:
                raws.append((f"line {reader.line_num}",
                             {k: v for k, v in record.items() if k is not None}))
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise _problems_error(str(path), [(f"line {err.lineno}", f"not valid JSON ({err.msg}, "
                                               f"column {err.colno})")]) from err
        if isinstance(doc, Mapping):
            header = {k: v for k, v in doc.items() if k != "examples"}
            examples = doc.get("examples")
            if not isinstance(examples, list):
                raise ConfigError(f"{str(path)!r}: a JSON task file is a list of rows or an object "
                                  "with an 'examples' list (and optional 'name', 'description', "
                                  "'metric'), or an MIB task {\"mib\": ..., \"data\": ...}.")
        elif isinstance(doc, list):
            examples = doc
        else:
            raise ConfigError(f"{str(path)!r}: expected a JSON list of rows or an object; got "
                              f"{type(doc).__name__}.")
        raws = [(f"row {i}", raw) for i, raw in enumerate(examples, 1)]
    rows = [row for where, raw in raws
            if (row := _parse_row(raw, where, metric, problems)) is not None]
    if problems:
        raise _problems_error(str(path), problems)
    if not rows:
        raise TaskDataError(f"{str(path)!r} has no rows: a prompt file needs at least one example "
                            "with clean, corrupted, answer and wrong.")
    return rows, header


def _check_metric(metric: str) -> str:
    key = normalize_name(metric) if isinstance(metric, str) else metric
    if key not in METRICS:
        raise ConfigError(f"Unknown metric {metric!r}; use one of {', '.join(METRICS)}.")
    return key


class PromptTask(Task):
    """A task whose examples are given as text: clean/corrupted prompts and continuations.

    Built by :func:`load_prompt_file` (prompt files), :func:`circuitfind.tasks.mib.mib_task`
    (MIB task data) or directly from :class:`PromptRow` objects.

    Args:
        rows: The examples, at least one.
        metric: ``logit_diff`` (default), ``prob_diff``, ``log_prob`` or ``kl`` (see the module
            docstring).
        name: Task name shown in reports and metadata.
        description: One line shown in reports.
        first_token: Use the first token of a multi-token answer instead of rejecting it.
        drop_invalid: Drop rows whose answers do not tokenize as required (recorded in
            ``TaskData.info["dropped"]``) instead of raising; the MIB loaders filter like this.
        source: Where the rows came from (file path), for provenance.

    Data. ``answers`` ``[N, A]`` / ``wrong_answers`` ``[N, W]`` hold each row's token ids,
    padded with ``-1`` where rows have fewer continuations (``wrong_answers`` is all ``-1``
    when no row has one). ``info`` holds the continuations' text.

    Raises:
        ConfigError: unknown metric or no rows.
    """

    def __init__(self, rows: Sequence[PromptRow], metric: str = "logit_diff",
                 name: str = "prompts", description: str = "", first_token: bool = False,
                 drop_invalid: bool = False, source: str | None = None) -> None:
        if not rows:
            raise ConfigError("A PromptTask needs at least one row.")
        self.rows = list(rows)
        self.metric_key = _check_metric(metric)
        self.metric_name, self.metric_unit, self.higher_is_better = METRICS[self.metric_key]
        self.needs_reference_logits = self.metric_key == "kl"
        if self.metric_key in _NEEDS_WRONG:
            lacking = [r.where for r in self.rows if not r.wrong]
            if lacking:
                raise _problems_error(source or name, [(w, f"missing 'wrong' (the {self.metric_key}"
                                                           " metric compares answer and wrong)")
                                                       for w in lacking])
        self.name = name
        self.description = description or f"{len(self.rows)} prompt pairs from {source or name}"
        self.first_token = bool(first_token)
        self.drop_invalid = bool(drop_invalid)
        self.source = source
        self.default_n = len(self.rows)

    def arguments(self) -> dict[str, Any]:
        """``{"metric": ..., "first_token": ...}``: how :func:`get_task` re-reads the file."""
        return {"metric": self.metric_key, "first_token": self.first_token}

    def __repr__(self) -> str:
        return (f"PromptTask(name={self.name!r}, rows={len(self.rows)}, "
                f"metric={self.metric_key!r}, source={self.source!r})")

    # ------------------------------------------------------------------ tokens
    def _continuation(self, tokenizer: Any, prompt: str, prompt_ids: list[int], text: str,
                      where: str, problems: list[tuple[str, str]]) -> int | None:
        full = encode(tokenizer, prompt + text)
        if full[: len(prompt_ids)] != prompt_ids:
            tail = tokenizer.convert_ids_to_tokens(full[max(0, len(prompt_ids) - 2):])
            problems.append((where, f"the continuation {text!r} merges with the end of the "
                                    f"prompt (prompt + continuation ends in tokens {tail}); "
                                    "start it with a space or end the prompt differently"))
            return None
        added = full[len(prompt_ids):]
        if not added:
            problems.append((where, f"the continuation {text!r} adds no token"))
            return None
        if len(added) > 1 and not self.first_token:
            pieces = tokenizer.convert_ids_to_tokens(added)
            problems.append((where, f"the continuation {text!r} is {len(added)} tokens {pieces}; "
                                    "use a single-token answer, or --first-token "
                                    "(first_token=True) to score its first token"))
            return None
        return int(added[0])

    def build(self, tokenizer: Any, n: int | None = None, seed: int = 0) -> TaskData:
        """Tokenize the first ``n`` rows (all when ``None``); ``seed`` is recorded only.

        Args:
            tokenizer: A Hugging Face tokenizer.
            n: Number of rows to use, from the top of the file (default: all).
            seed: Recorded in the data; rows are used in file order.

        Returns:
            :class:`TaskData` with ``P = 1`` metric position per example (the clean prompt's
            last token), right-padded clean and corrupted tokens (BOS prepended where the
            tokenizer has one) and both attention masks.

        Raises:
            ConfigError: ``n`` < 1.
            TaskDataError: every continuation that is several tokens (without ``first_token``),
                adds no token or merges with its prompt, or whose answer and wrong tokens
                coincide; with ``drop_invalid``, only when no row is left.
        """
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"The number of examples n must be an int >= 1 or None; got {n!r}.")
        bos = bos_id(tokenizer)
        prefix = [bos] if bos is not None else []
        problems: list[tuple[str, str]] = []
        kept: list[tuple[PromptRow, list[int], list[int], list[int], list[int]]] = []
        dropped: list[str] = []
        for row in self.rows:
            if n is not None and len(kept) >= n:
                break
            before = len(problems)
            ids_c = encode(tokenizer, row.clean)
            ids_x = encode(tokenizer, row.corrupted)
            found = [self._continuation(tokenizer, row.clean, ids_c, text, row.where, problems)
                     for text in row.answers + row.wrong]
            ids = [i for i in found if i is not None]
            ans, wrong = ids[: len(row.answers)], ids[len(row.answers):]
            same = sorted(set(ans) & set(wrong))
            if len(problems) == before and same:
                problems.append((row.where, f"answer equal to wrong: both give token(s) "
                                            f"{tokenizer.convert_ids_to_tokens(same)}"))
            if len(problems) > before:
                if self.drop_invalid:
                    dropped.append(row.where)
                    del problems[before:]
                continue
            kept.append((row, prefix + ids_c, prefix + ids_x, ans, wrong))
        if problems:
            raise _problems_error(self.source or self.name, problems)
        if not kept:
            raise TaskDataError(f"{self.source or self.name}: no row is usable with this tokenizer "
                                f"({len(dropped)} dropped because their answers are not single "
                                "tokens or equal their wrong answers).")
        return self._tensors(tokenizer, kept, dropped, seed)

    def _tensors(self, tokenizer: Any, kept: list[Any], dropped: list[str], seed: int) -> TaskData:
        n = len(kept)
        t = max(max(len(c), len(x)) for _, c, x, _, _ in kept)
        pad = pad_id(tokenizer)
        clean = torch.full((n, t), pad, dtype=torch.long)
        corrupted = torch.full((n, t), pad, dtype=torch.long)
        mask_c = torch.zeros((n, t), dtype=torch.long)
        mask_x = torch.zeros((n, t), dtype=torch.long)
        width_a = max(len(a) for *_, a, _ in kept)
        width_w = max(1, max(len(w) for *_, w in kept))
        answers = torch.full((n, width_a), -1, dtype=torch.long)
        wrong = torch.full((n, width_w), -1, dtype=torch.long)
        for i, (_, c, x, a, w) in enumerate(kept):
            clean[i, : len(c)] = torch.tensor(c)
            corrupted[i, : len(x)] = torch.tensor(x)
            mask_c[i, : len(c)] = 1
            mask_x[i, : len(x)] = 1
            answers[i, : len(a)] = torch.tensor(a)
            if w:
                wrong[i, : len(w)] = torch.tensor(w)
        positions = (mask_c.sum(1, keepdim=True) - 1).long()
        rows = [k[0] for k in kept]
        info: dict[str, Any] = {"source": self.source, "metric": self.metric_key,
                                "rows": [r.where for r in rows],
                                "answers": [list(r.answers) for r in rows],
                                "wrong": [list(r.wrong) for r in rows],
                                "first_token": self.first_token, "dropped": dropped}
        return TaskData(task=self, clean=clean, corrupted=corrupted, positions=positions,
                        answers=answers, wrong_answers=wrong, attention_mask=mask_c,
                        clean_prompts=[r.clean for r in rows],
                        corrupted_prompts=[r.corrupted for r in rows], seed=seed, info=info,
                        corrupted_attention_mask=mask_x)

    # ------------------------------------------------------------------ metric
    def metric(self, logits: Tensor, data: TaskData) -> Tensor:
        """Per-example metric at the clean prompt's last token (see the module docstring).

        Args:
            logits: ``[..., N, 1, V]`` logits at ``data.positions``.
            data: The task data (answers padded with -1; ``reference_logits`` for ``kl``).

        Returns:
            ``[..., N]`` in ``self.metric_unit``.

        Raises:
            ConfigError: ``kl`` without ``data.reference_logits`` (build the data with
                :func:`circuitfind.build_data`, which adds them).
        """
        if self.metric_key == "kl":
            if data.reference_logits is None:
                raise ConfigError("The kl metric compares with the full model's logits, which "
                                  "these data lack; build them with cf.build_data(model, task).")
            return kl_div(data.reference_logits.to(logits.device), logits)
        at = logits[..., 0, :]
        if self.metric_key == "logit_diff":
            return _mean_at(at, data.answers) - _mean_at(at, data.wrong_answers)
        if self.metric_key == "prob_diff":
            probs = torch.softmax(at.float(), dim=-1)
            return _sum_at(probs, data.answers) - _sum_at(probs, data.wrong_answers)
        got, valid = _gathered(torch.log_softmax(at.float(), dim=-1), data.answers)
        return torch.logsumexp(got.masked_fill(~valid, float("-inf")), dim=-1)


def _gathered(values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """``values [..., N, V]`` at ``ids [N, k]`` (-1 = none) -> values ``[..., N, k]``, valid."""
    valid = ids >= 0
    idx = ids.clamp_min(0).to(values.device).expand(*values.shape[:-1], ids.shape[-1])
    return values.gather(-1, idx), valid.to(values.device)


def _mean_at(values: Tensor, ids: Tensor) -> Tensor:
    got, valid = _gathered(values, ids)
    w = valid.to(got.dtype)
    return (got * w).sum(-1) / w.sum(-1).clamp_min(1)


def _sum_at(values: Tensor, ids: Tensor) -> Tensor:
    got, valid = _gathered(values, ids)
    return (got * valid.to(got.dtype)).sum(-1)


def load_prompt_file(path: str | os.PathLike[str], metric: str | None = None,
                     first_token: bool = False) -> Task:
    """A task from a prompt file (:func:`circuitfind.tasks.lookup.load_task_file` also reads
    MIB task specs).

    Args:
        path: ``.jsonl``, ``.csv`` or ``.json`` (see the module docstring).
        metric: Overrides the file's ``metric`` key (default ``logit_diff``).
        first_token: Score multi-token answers by their first token.

    Returns:
        A :class:`PromptTask` named after the file's ``name`` key or the file's stem.

    Raises:
        ConfigError: missing file, unsupported suffix, unknown metric.
        TaskDataError: every problem of the file, with its line or row.
    """
    path = Path(path).expanduser()
    header: dict[str, Any] = {}
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            doc = json.loads(_decode(path))
        except json.JSONDecodeError:
            doc = None  # read_rows reports it with its line
        if isinstance(doc, Mapping):
            header = dict(doc)
    chosen = _check_metric(metric or header.get("metric") or "logit_diff")
    rows, header = read_rows(path, metric=chosen)
    name = header.get("name") or path.stem
    if not isinstance(name, str):
        raise ConfigError(f"{str(path)!r}: 'name' must be a string; got {name!r}.")
    description = header.get("description") or ""
    return PromptTask(rows, metric=chosen, name=name, description=str(description),
                      first_token=first_token, source=str(path))


def rows_from_records(records: Iterable[Mapping[str, Any]], metric: str = "logit_diff",
                      where: str = "row") -> list[PromptRow]:
    """Check in-memory records (``clean``, ``corrupted``, ``answer``, ``wrong``) as rows.

    Raises:
        TaskDataError: every problem, each with its 1-based row number.
    """
    problems: list[tuple[str, str]] = []
    rows = [row for i, raw in enumerate(records, 1)
            if (row := _parse_row(raw, f"{where} {i}", _check_metric(metric), problems)) is not None]
    if problems:
        raise _problems_error("prompt records", problems)
    return rows
