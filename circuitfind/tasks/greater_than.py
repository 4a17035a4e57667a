"""Greater-than: complete a year range with a year later than the start year.

    "The war lasted from the year 1732 to the year 17"  ->  any of "33" ... "99"

The data set of Hanna, Liu & Variengien (2023): the event nouns of their code, centuries
``XX`` in 11..17 and two-digit years ``YY`` in 02..98, kept only where the tokenizer splits
``" XXYY"`` into the century token ``" XX"`` plus the two-digit token ``"YY"`` (so that the
model's prediction after ``" XX"`` is one token out of ``"00"`` ... ``"99"``). Under GPT-2 that
removes the years that are single tokens (" 1800"-style round years and a few others).

Corrupted prompts are the paper's "01-dataset": the same prompt with ``YY = 01``, which makes
every completion ``"02"`` ... ``"99"`` valid, so it carries no information about the start year.

Metric: the probability difference of Hanna et al.,
``PD = sum_{y > YY} p(y) - sum_{y <= YY} p(y)`` over the hundred two-digit year tokens at the
last prompt position, in probability units (between -1 and 1); higher is better.

Data layout: ``answers[:, 0]`` is the token id of the clean ``YY`` and ``wrong_answers[:, 0]``
the id of ``"01"`` (the corrupted start year); ``info["year_token_ids"]`` lists the ids of
``"00"`` ... ``"99"`` (index = year), from which the metric builds its masks, so the metric
needs nothing but the TaskData.

References:
    Hanna, Liu, Variengien. "How does GPT-2 compute greater-than? Interpreting mathematical
    abilities in a pre-trained language model." NeurIPS 2023, arXiv:2305.00586 (Section 2:
    task, data set, probability difference; the 01-dataset).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import TaskDataError
from circuitfind.tasks import metrics
from circuitfind.tasks.base import TASKS, Task, TaskData
from circuitfind.tasks.tokens import encode, encode_pairs, last_positions, sample_balanced

#: The event nouns of Hanna et al.'s code (as reused by the ACDC paper).
NOUNS: tuple[str, ...] = (
    "abduction", "accord", "affair", "agreement", "appraisal", "assaults", "assessment",
    "attack", "attempts", "campaign", "captivity", "case", "challenge", "chaos", "clash",
    "collaboration", "coma", "competition", "confrontation", "consequence", "conspiracy",
    "construction", "consultation", "contact", "contract", "convention", "cooperation",
    "custody", "deal", "decline", "decrease", "demonstrations", "development", "disagreement",
    "disorder", "dispute", "domination", "dynasty", "effect", "effort", "employment",
    "endeavor", "engagement", "epidemic", "evaluation", "exchange", "existence", "expansion",
    "expedition", "experiments", "fall", "fame", "flights", "friendship", "growth", "hardship",
    "hostility", "illness", "impact", "imprisonment", "improvement", "incarceration",
    "increase", "insurgency", "invasion", "investigation", "journey", "kingdom", "marriage",
    "modernization", "negotiation", "notoriety", "obstruction", "operation", "order",
    "outbreak", "outcome", "overhaul", "patrols", "pilgrimage", "plague", "plan", "practice",
    "process", "program", "progress", "project", "pursuit", "quest", "raids", "reforms",
    "reign", "relationship", "retaliation", "riot", "rise", "rivalry", "romance", "rule",
    "sanctions", "shift", "siege", "slump", "stature", "stint", "strikes", "study", "test",
    "testing", "tests", "therapy", "tour", "tradition", "treaty", "trial", "trip",
    "unemployment", "voyage", "warfare", "work",
)
CENTURIES: tuple[int, ...] = tuple(range(11, 18))
YEARS: tuple[int, ...] = tuple(range(2, 99))  # YY in 02..98, as in the paper
CORRUPTED_YEAR = 1  # the "01-dataset"
TEMPLATE = "The {noun} lasted from the year {xx}{yy:02d} to the year {xx}"


@TASKS.register("greater_than")
class GreaterThan(Task):
    """Greater-than (Hanna et al. 2023) with the 01-dataset as corrupted prompts.

    See the module docstring for the data. ``info`` holds ``year_token_ids`` (the 100 ids of
    "00".."99"), per-example ``nouns``, ``centuries`` and ``years`` (YY), and
    ``n_valid_years`` (how many century/year pairs the tokenizer allows).
    """

    name = "greater_than"
    description = "Greater-than on year spans (Hanna et al. 2023), 01-dataset corrupted prompts"
    metric_name = "probability difference"
    metric_unit = "probability"
    higher_is_better = True
    accuracy_description = ("the most likely two-digit year token is later than the start "
                            "year")

    def build(self, tokenizer: Any, n: int, seed: int = 0) -> TaskData:
        """Build ``n`` greater-than examples (see :meth:`Task.build`).

        Args:
            tokenizer: A Hugging Face tokenizer that writes "00".."99" as single tokens and
                splits " XXYY" into " XX" + "YY" (GPT-2's does).
            n: Number of examples, >= 1; at most nouns x valid (century, year) pairs (about
                77,000 under GPT-2).
            seed: Seed of the sampler (Python ``random.Random``).

        Returns:
            TaskData with clean/corrupted ``[N, T]``, positions ``[N, 1]`` (last prompt token),
            answers ``[N, 1]`` (the YY token) and wrong answers ``[N, 1]`` (the "01" token).

        Raises:
            ConfigError: ``n`` < 1 or larger than the number of distinct prompts.
            TaskDataError: the tokenizer does not write the years as one century token plus
                one two-digit token (e.g. stories260k's, which spells numbers digit by digit).

        References:
            Hanna et al. 2023, arXiv:2305.00586, Section 2.
        """
        year_ids = _year_token_ids(tokenizer, self.name)
        valid = _valid_years(tokenizer, year_ids)
        if not valid:
            raise TaskDataError(
                "Task 'greater_than' found no century XX in 11..17 and year YY in 02..98 for "
                "which this tokenizer writes ' XXYY' as ' XX' + 'YY' and ' XX01' as ' XX' + "
                "'01'. The task needs a GPT-2-style tokenizer.")
        draws = sample_balanced(random.Random(seed), n, [(len(NOUNS), len(valid))], self.name)
        nouns, centuries, years = [], [], []
        for _, _, (noun_i, year_i) in draws:
            nouns.append(NOUNS[noun_i])
            centuries.append(valid[year_i][0])
            years.append(valid[year_i][1])
        clean = [TEMPLATE.format(noun=w, xx=xx, yy=yy)
                 for w, xx, yy in zip(nouns, centuries, years)]
        corrupted = [TEMPLATE.format(noun=w, xx=xx, yy=CORRUPTED_YEAR)
                     for w, xx in zip(nouns, centuries)]
        clean_t, corrupted_t, mask = encode_pairs(tokenizer, clean, corrupted, self.name)
        answers = torch.tensor([[year_ids[yy]] for yy in years], dtype=torch.long)
        wrong = torch.full_like(answers, year_ids[CORRUPTED_YEAR])
        return TaskData(
            task=self, clean=clean_t, corrupted=corrupted_t, positions=last_positions(mask),
            answers=answers, wrong_answers=wrong, attention_mask=mask, clean_prompts=clean,
            corrupted_prompts=corrupted, seed=seed,
            info={"year_token_ids": year_ids, "nouns": nouns, "centuries": centuries,
                  "years": years, "n_valid_years": len(valid)})

    def metric(self, logits: Tensor, data: TaskData) -> Tensor:
        """Probability difference ``sum_{y > YY} p(y) - sum_{y <= YY} p(y)``.

        The sums run over the year tokens ``info["year_token_ids"]``; the softmax is over the
        whole vocabulary.

        Args:
            logits: ``[..., N, 1, V]`` logits gathered at ``data.positions``.
            data: The TaskData the logits belong to.

        Returns:
            ``[..., N]`` probability differences, in probability units (-1 to 1; higher is
            better).

        Raises:
            TaskDataError: ``data`` lacks ``info["year_token_ids"]`` or an answer is not one
                of the year tokens.

        References:
            Hanna et al. 2023, arXiv:2305.00586, Section 2 ("probability difference").
        """
        good, bad = year_masks(data, logits.shape[-1], logits.device)
        return metrics.prob_diff(logits, good, bad)

    def correct(self, logits: Tensor, data: TaskData) -> Tensor:
        """Whether the most likely of the hundred year tokens is later than ``YY``.

        Args:
            logits: ``[N, 1, V]`` logits at the last prompt position.
            data: Greater-than TaskData.

        Returns:
            ``[N, 1]`` bool.

        References:
            Hanna et al. 2023, arXiv:2305.00586, Section 2 (a correct completion is a later
            year).
        """
        good, bad = year_masks(data, logits.shape[-1], logits.device)
        at = logits[:, 0].float()
        later = at.masked_fill(~good, float("-inf")).max(-1).values
        earlier = at.masked_fill(~bad, float("-inf")).max(-1).values
        return (later > earlier)[:, None]


def year_masks(data: TaskData, vocab_size: int, device: torch.device | str
               ) -> tuple[Tensor, Tensor]:
    """Boolean masks of the year tokens after and up to each example's start year.

    Args:
        data: Greater-than TaskData (``answers[:, 0]`` the YY token, ``info["year_token_ids"]``).
        vocab_size: V, the logits' last dimension.
        device: Where to build the masks.

    Returns:
        ``(good, bad)``, each ``[N, V]`` bool: ``good[n, id("YY'")]`` for ``YY' > YY``,
        ``bad[n, id("YY'")]`` for ``YY' <= YY``.

    Raises:
        TaskDataError: ``info["year_token_ids"]`` is missing or an answer is not a year token.
    """
    if "year_token_ids" not in data.info:
        raise TaskDataError("The greater-than metric needs info['year_token_ids'] (the ids of "
                            "'00'..'99'); build the data with the greater_than task.")
    ids = torch.as_tensor(data.info["year_token_ids"], dtype=torch.long, device=device)  # [100]
    match = data.answers[:, :1].to(device) == ids[None, :]  # [N, 100]
    if not bool(match.any(-1).all()):
        raise TaskDataError("The greater-than answers must be year tokens '00'..'99'.")
    yy = match.long().argmax(-1)  # [N]
    after = torch.arange(ids.numel(), device=device)[None, :] > yy[:, None]  # [N, 100]
    good = torch.zeros(data.n, vocab_size, dtype=torch.bool, device=device)
    bad = torch.zeros_like(good)
    good[:, ids] = after
    bad[:, ids] = ~after
    return good, bad


def _year_token_ids(tokenizer: Any, task: str) -> list[int]:
    """Ids of the tokens "00".."99" (index = year).

    Raises:
        TaskDataError: some two-digit year is not a single token.
    """
    ids = []
    for yy in range(100):
        pieces = encode(tokenizer, f"{yy:02d}")
        if len(pieces) != 1:
            raise TaskDataError(
                f"Task {task!r} needs the two-digit years '00'..'99' to be single tokens, but "
                f"this tokenizer splits '{yy:02d}' into {tokenizer.convert_ids_to_tokens(pieces)}. "
                "Use a GPT-2-style tokenizer.")
        ids.append(int(pieces[0]))
    return ids


def _valid_years(tokenizer: Any, year_ids: list[int]) -> list[tuple[int, int]]:
    """(century, YY) pairs where " XXYY" and " XX01" tokenize to " XX" + the year token."""
    valid = []
    for xx in CENTURIES:
        century = encode(tokenizer, f" {xx}")
        if len(century) != 1 or encode(tokenizer, f" {xx}{CORRUPTED_YEAR:02d}") != [
                century[0], year_ids[CORRUPTED_YEAR]]:
            continue
        valid += [(xx, yy) for yy in YEARS
                  if encode(tokenizer, f" {xx}{yy:02d}") == [century[0], year_ids[yy]]]
    return valid
