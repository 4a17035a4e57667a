"""Induction: predict the continuation of a repeated sequence of random tokens.

A clean example is a sequence ``A`` of ``half_len`` random tokens followed by a copy of itself,
``[BOS] A A`` (BOS only where the tokenizer has one). Once the copy has started, an induction
head can predict each next token by finding the previous occurrence of the current token and
copying the token that followed it.

Corrupted example: ``[BOS] B A``, with ``B`` a second random sequence (no token shared with
``A``) in place of the first half. The second half and every metric position are unchanged,
but nothing before it repeats, so the context carries no information about what comes next.
(This is the noising direction of the ACDC paper's induction task, which corrupts the
*context* rather than the tokens read by the metric.)

Metric positions, precisely. With ``o = 1`` if BOS is prepended else ``0`` and ``h = half_len``,
the first half sits at ``o .. o+h-1`` and the copy at ``o+h .. o+2h-1``. The logits at position
``t`` predict the token at ``t + 1``. The prediction of the copy's first token (at ``o+h``,
read at ``o+h-1``) is *not* inductive, because the token at ``o+h-1`` has not occurred before.
The inductive predictions are those of the copy's tokens 1..h-1, read at the copy's positions
``o+h .. o+2h-2``. So ``positions`` is ``[N, h-1]`` with ``positions[n, p] = o + h + p`` and
``answers[n, p] = clean[n, o + h + p + 1] = A[p + 1]``.

Metric: mean log-probability of the correct next token over those positions, in nats (<= 0);
higher is better.

Token pool. Ids of the tokenizer's vocabulary, excluding ``all_special_ids``, byte-fallback
tokens (``<0x0A>``-style), tokens that decode to nothing or only whitespace, and tokens that
do not re-encode to themselves when decoded on their own (so the prompt strings are faithful
displays of the token ids). The token ids are built directly, not by tokenizing strings.

Sampling. Each example draws ``2 h`` distinct pool tokens (``A`` then ``B``) with a
``torch.Generator`` seeded by ``seed``: examples are drawn independently, i.e. *with
replacement* across examples. For h = 10 a repeated example has probability about
``n^2 / 10^94`` under GPT-2 (a pool of 49,889 tokens) and ``n^2 / 10^38`` under stories260k's
tokenizer (a pool of 90 tokens: its word-initial tokens; word-internal pieces such as ``"nd"``
re-encode on their own with a word-boundary marker and are left out).

References:
    Olsson et al. "In-context Learning and Induction Heads." Transformer Circuits Thread, 2022
    (repeated random tokens).
    Conmy et al. "Towards Automated Circuit Discovery for Mechanistic Interpretability."
    NeurIPS 2023, arXiv:2304.14997 (induction task).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError, TaskDataError
from circuitfind.tasks import metrics
from circuitfind.tasks.base import TASKS, Task, TaskData
from circuitfind.tasks.tokens import bos_id, check_n

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@TASKS.register("induction")
class Induction(Task):
    """Repeated random tokens; the corrupted prompts replace the first half.

    See the module docstring for the exact layout of positions and answers.

    Args:
        half_len: Length h of the random sequence that is repeated, >= 2.

    Raises:
        ConfigError: ``half_len`` is not an int >= 2.
    """

    name = "induction"
    description = "Induction on repeated random tokens ([A, A] vs [B, A])"
    metric_name = "log probability"
    metric_unit = "nats"
    higher_is_better = True
    accuracy_description = "the repeated token is the most likely next token (top-1)"

    def __init__(self, half_len: int = 10) -> None:
        if isinstance(half_len, bool) or not isinstance(half_len, int) or half_len < 2:
            raise ConfigError(f"The 'half_len' parameter of Induction must be an int >= 2. "
                              f"Got {half_len!r}.")
        self.half_len = half_len

    def __repr__(self) -> str:
        return f"Induction(half_len={self.half_len})"

    def build(self, tokenizer: Any, n: int, seed: int = 0) -> TaskData:
        """Build ``n`` induction examples (see :meth:`Task.build`).

        Args:
            tokenizer: A Hugging Face tokenizer (any vocabulary with >= 2 h usable tokens).
            n: Number of examples, >= 1 (drawn independently; see the module docstring).
            seed: Seed of the ``torch.Generator`` that draws the tokens.

        Returns:
            TaskData with clean/corrupted ``[N, o + 2h]``, positions and answers
            ``[N, h - 1]``, wrong answers ``[N, h - 1]`` (the corrupted first half's tokens
            at the same offsets, ``B[p + 1]``, for reference; the metric does not use them).

        Raises:
            ConfigError: ``n`` < 1.
            TaskDataError: the tokenizer has fewer than ``2 * half_len`` usable tokens.

        References:
            Olsson et al. 2022, Section "Definitions" (repeated random tokens).
        """
        check_n(n, self.name)
        h = self.half_len
        pool = token_pool(tokenizer)
        if pool.numel() < 2 * h:
            raise TaskDataError(
                f"Task 'induction' needs at least {2 * h} usable vocabulary tokens for "
                f"half_len={h}; this tokenizer has {pool.numel()}. Use a smaller half_len.")
        gen = torch.Generator().manual_seed(seed)
        picks = torch.stack([torch.randperm(pool.numel(), generator=gen)[: 2 * h]
                             for _ in range(n)])
        a, b = pool[picks[:, :h]], pool[picks[:, h:]]  # [N, h] each, disjoint per row
        bos = bos_id(tokenizer)
        prefix = (torch.full((n, 1), bos, dtype=torch.long) if bos is not None
                  else torch.zeros((n, 0), dtype=torch.long))
        clean = torch.cat([prefix, a, a], dim=1)
        corrupted = torch.cat([prefix, b, a], dim=1)
        o = prefix.shape[1]
        positions = (o + h + torch.arange(h - 1)).expand(n, -1).clone()
        return TaskData(
            task=self, clean=clean, corrupted=corrupted, positions=positions,
            answers=a[:, 1:].clone(), wrong_answers=b[:, 1:].clone(),
            attention_mask=torch.ones_like(clean),
            clean_prompts=_decode(tokenizer, torch.cat([a, a], 1)),
            corrupted_prompts=_decode(tokenizer, torch.cat([b, a], 1)),
            seed=seed, info={"half_len": h, "pool_size": int(pool.numel())})

    def metric(self, logits: Tensor, data: TaskData) -> Tensor:
        """Mean log-probability of the correct next token over the repeated half.

        Args:
            logits: ``[..., N, h - 1, V]`` logits gathered at ``data.positions``.
            data: The TaskData the logits belong to.

        Returns:
            ``[..., N]`` mean log-probabilities, in nats (<= 0; higher is better).

        References:
            Olsson et al. 2022 (in-context loss on repeated tokens).
        """
        return metrics.log_prob(logits, data.answers)

    def correct(self, logits: Tensor, data: TaskData) -> Tensor:
        """Whether the repeated token is the most likely next token (top-1 accuracy).

        Args:
            logits: ``[N, h - 1, V]`` logits gathered at ``data.positions``.
            data: The TaskData the logits belong to.

        Returns:
            ``[N, h - 1]`` bool.

        References:
            Olsson et al. 2022 (induction heads predict the repeated token).
        """
        answers = data.answers.to(logits.device)
        return logits.gather(-1, answers[..., None])[..., 0] >= logits.max(-1).values


def _decode(tokenizer: Any, rows: Tensor) -> list[str]:
    """Decode each row of ``[N, L]`` token ids to a string (no clean-up of spaces)."""
    return [tokenizer.decode(r, clean_up_tokenization_spaces=False) for r in rows.tolist()]


def token_pool(tokenizer: Any) -> Tensor:
    """The vocabulary ids induction sequences are drawn from, ascending.

    Excludes special tokens, byte-fallback tokens (``<0xNN>``), tokens that decode to nothing
    or only whitespace, and tokens that do not re-encode to themselves on their own.

    Args:
        tokenizer: A Hugging Face tokenizer.

    Returns:
        ``[M]`` int64 token ids.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    ids = [i for i, p in zip(ids, pieces) if p is not None and not _BYTE_TOKEN.match(p)]
    texts = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
    keep = [(i, t) for i, t in zip(ids, texts) if t.strip()]
    if not keep:
        return torch.zeros(0, dtype=torch.long)
    encoded = tokenizer([t for _, t in keep], add_special_tokens=False)["input_ids"]
    return torch.tensor([i for (i, _), e in zip(keep, encoded) if list(e) == [i]],
                        dtype=torch.long)
