"""Tokenizer helpers shared by the tasks: single-token checks and aligned, padded batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import TaskDataError


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

    Args:
        word: The text, including its leading space where it follows a word (" Mary").
        task: Task name, for the message.

    Raises:
        TaskDataError: ``word`` is not a single token.
    """
    ids = encode(tokenizer, word)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise TaskDataError(
            f"Task {task!r} needs {word!r} to be a single token, but this tokenizer splits it "
            f"into {len(ids)} tokens {pieces}. Use a tokenizer the task supports, or remove the "
            "word from the task's word lists.")
    return int(ids[0])


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
