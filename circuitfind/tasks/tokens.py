"""Helpers shared by the tasks: single-token checks, aligned padded batches, example sampling."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError, TaskDataError


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def bos_id(tokenizer: Any) -> int | None:
    """The tokenizer's BOS id (GPT-2: ``<|endoftext|>``), or ``None`` if it has none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None else None


def pad_id(tokenizer: Any) -> int:
    """Id used for right padding: pad, else EOS, else BOS, else 0 (never read by a metric)."""
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def single_token_id(tokenizer: Any, word: str, task: str) -> int:
    """The id of ``word`` if it is exactly one token under ``tokenizer``.

    A word with a leading space is checked as it tokenizes *after other text*, which is how it
    appears inside a prompt. For most BPE tokenizers (GPT-2) that is the same as encoding the
    word on its own; tokenizers that prepend a word-boundary marker to every input
    (SentencePiece-style, e.g. stories260k's: ``" Lily"`` alone gives ``['▁', '▁Lily']``) are
    handled by encoding ``"a" + word`` and removing the tokens of ``"a"``.

    Args:
        word: The text, including its leading space where it follows a word (" Mary").
        task: Task name, for the message.

    Returns:
        The token id (an int).

    Raises:
        TaskDataError: ``word`` is not a single token, or it maps to the unknown token.
    """
    ids = encode(tokenizer, word)
    if len(ids) != 1 and word[:1].isspace():
        ids = _ids_after_context(tokenizer, word) or ids
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 1 and unk is not None and ids[0] == unk:
        raise TaskDataError(
            f"Task {task!r} needs {word!r} to be a single token, but this tokenizer maps it to "
            "the unknown token. Use a tokenizer the task supports, or remove the word from the "
            "task's word lists.")
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise TaskDataError(
            f"Task {task!r} needs {word!r} to be a single token, but this tokenizer splits it "
            f"into {len(ids)} tokens {pieces}. Use a tokenizer the task supports, or remove the "
            "word from the task's word lists.")
    return int(ids[0])


def _ids_after_context(tokenizer: Any, word: str, context: str = "a") -> list[int] | None:
    """Tokens ``word`` adds after ``context``, or ``None`` if the context tokens change."""
    ctx = encode(tokenizer, context)
    full = encode(tokenizer, context + word)
    if full[: len(ctx)] != ctx:
        return None
    return full[len(ctx):]


def single_token_ids(tokenizer: Any, words: Sequence[str], task: str
                     ) -> tuple[dict[str, int], list[str]]:
    """Split ``words`` into those that are single tokens (with their ids) and those that are not.

    Args:
        words: Candidate words, each with its leading space where it follows a word.
        task: Task name, for messages.

    Returns:
        ``(kept, dropped)``: ``{word: token_id}`` for the single-token words, in input order,
        and the list of words that are not single tokens.
    """
    kept: dict[str, int] = {}
    dropped: list[str] = []
    for word in words:
        try:
            kept[word] = single_token_id(tokenizer, word, task)
        except TaskDataError:
            dropped.append(word)
    return kept, dropped


def aligned_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]
                  ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split word pairs into those whose two words tokenize to equally many tokens and the rest.

    Words are measured as they tokenize after other text (see :func:`single_token_id`), so a
    pair that passes can be swapped inside a prompt without changing its token length (for
    tokenizers without merges across a space, which is every tokenizer circuitfind supports).

    Returns:
        ``(aligned, dropped)`` lists of pairs, in input order.
    """
    def length(word: str) -> int:
        ids = _ids_after_context(tokenizer, word)
        return len(ids) if ids is not None else len(encode(tokenizer, word))

    aligned = [p for p in pairs if length(p[0]) == length(p[1])]
    return aligned, [p for p in pairs if p not in aligned]


def check_n(n: int, task: str) -> int:
    """Validate the number of examples ``n`` (an int >= 1).

    Raises:
        ConfigError: ``n`` is not an int or is < 1.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"The number of examples n of task {task!r} must be an int >= 1. "
                          f"Got {n!r}.")
    return n


def sample_balanced(rng: random.Random, n: int, groups: Sequence[Sequence[int]], task: str,
                    n_classes: int = 1) -> list[tuple[int, int, tuple[int, ...]]]:
    """Draw ``n`` distinct combinations, balanced over ``n_classes`` classes, without repeats.

    The space of one class is the disjoint union over groups ``g`` of the Cartesian product
    ``range(groups[g][0]) x range(groups[g][1]) x ...`` (a group is typically a template, its
    sizes the word lists its slots draw from). Example ``i`` belongs to class ``i % n_classes``
    (so any prefix of the data is balanced); within a class, no combination repeats.
    Sampling is uniform without replacement (``random.sample`` over a lazy ``range``), so it is
    cheap even when the space has billions of combinations.

    Args:
        rng: The random generator (seeded by the task).
        n: Number of examples, >= 1.
        groups: For each group, the sizes of its slots (an empty tuple is one combination).
        task: Task name, for messages.
        n_classes: Number of classes (e.g. 2 for the two IOI name orders).

    Returns:
        ``n`` tuples ``(class, group, digits)`` with ``digits[k] < groups[group][k]``.

    Raises:
        ConfigError: ``n`` < 1, or a class would need more examples than it has combinations.
    """
    check_n(n, task)
    sizes = [math.prod(g) for g in groups]
    total = sum(sizes)
    per_class = [len(range(c, n, n_classes)) for c in range(n_classes)]
    if max(per_class) > total:
        raise ConfigError(
            f"Task {task!r} can make at most {total * n_classes} distinct examples with this "
            f"tokenizer ({total} per class, {n_classes} classes); got n = {n}. Ask for fewer "
            "examples.")
    draws = [iter(rng.sample(range(total), k)) for k in per_class]
    out = []
    for i in range(n):
        cls = i % n_classes
        flat = next(draws[cls])
        group = 0
        while flat >= sizes[group]:
            flat -= sizes[group]
            group += 1
        digits = []
        for size in reversed(groups[group]):
            flat, d = divmod(flat, size)
            digits.append(d)
        out.append((cls, group, tuple(reversed(digits))))
    return out


def encode_pairs(tokenizer: Any, clean: Sequence[str], corrupted: Sequence[str], task: str,
                 prepend_bos: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Tokenize aligned clean/corrupted prompts into right-padded ``[N, T]`` batches.

    Returns:
        ``(clean_tokens, corrupted_tokens, attention_mask)``, each ``[N, T]`` int64; a BOS
        token is prepended when ``prepend_bos`` and the tokenizer has one.

    Raises:
        TaskDataError: a clean prompt and its corrupted prompt tokenize to different lengths.
    """
    bos = bos_id(tokenizer) if prepend_bos else None
    prefix = [bos] if bos is not None else []
    rows_c, rows_x = [], []
    for i, (c, x) in enumerate(zip(clean, corrupted, strict=True)):
        ids_c, ids_x = prefix + encode(tokenizer, c), prefix + encode(tokenizer, x)
        if len(ids_c) != len(ids_x):
            raise TaskDataError(
                f"Task {task!r}, example {i}: the clean prompt has {len(ids_c)} tokens but the "
                f"corrupted prompt has {len(ids_x)}; they must align token by token.\n"
                f"  clean:     {c!r}\n  corrupted: {x!r}")
        rows_c.append(ids_c)
        rows_x.append(ids_x)
    t = max(len(r) for r in rows_c)
    pad = pad_id(tokenizer)
    out_c = torch.full((len(rows_c), t), pad, dtype=torch.long)
    out_x = torch.full((len(rows_c), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows_c), t), dtype=torch.long)
    for i, (rc, rx) in enumerate(zip(rows_c, rows_x)):
        out_c[i, : len(rc)] = torch.tensor(rc)
        out_x[i, : len(rx)] = torch.tensor(rx)
        mask[i, : len(rc)] = 1
    return out_c, out_x, mask


def last_positions(attention_mask: Tensor) -> Tensor:
    """``[N, 1]`` index of the last real token of each row of a right-padded ``[N, T]`` mask."""
    return (attention_mask.sum(1, keepdim=True) - 1).long()
