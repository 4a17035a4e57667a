"""Gendered pronoun: predict " she" or " he" for a person introduced by a gendered noun and name.

    "Once upon a time, there was a little girl named Lily. She liked to play. One day,"
        -> " she" (not " he")

A prompt is an opening sentence that introduces the person (a gendered noun and a name), a
middle sentence that refers to them with a capitalised pronoun (and, in some templates, a
possessive), and an ending after which the next word is naturally the subject pronoun. The
corrupted prompt flips the gender of every gendered word (girl <-> boy, Lily <-> Tim,
She <-> He, her <-> his); the metric still reads the clean answer, so the corrupted logit
difference is negative in a model that tracks gender. Examples alternate between female and
male clean prompts (any prefix of the data is balanced) and never repeat.

Word lists are filtered for the tokenizer: names and pronouns must be single tokens (with
their leading space), and a female/male word pair must tokenize to equally many tokens so that
clean and corrupted prompts align token by token. Under stories260k's 512-token vocabulary
only the name pair Lily/Tim and the noun pairs girl/boy and sister/brother survive (5 openings
x 5 middles x 5 endings x 1 name pair x 2 noun pairs = 250 prompts per gender, 500 in all);
under GPT-2 everything survives (7,500 prompts in all). ``info["dropped"]`` records what was
removed.

Metric: the logit difference ``logit(correct pronoun) - logit(other pronoun)`` at the last
prompt position (``answers[:, 0]`` = " she" for a female clean prompt, " he" for a male one),
in logits; higher is better.

References:
    Mathwin, Corlouer, Kran, Barez, Nanda. "Identifying a Preliminary Circuit for Predicting
    Gendered Pronouns in GPT-2 Small." 2023 (the task this follows, with story-style prompts
    for TinyStories models).
    Eldan, Li. "TinyStories: How Small Can Language Models Be and Still Speak Coherent
    English?" arXiv:2305.07759, 2023 (the register of the templates).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import TaskDataError
from circuitfind.tasks import metrics
from circuitfind.tasks.base import TASKS, Task, TaskData
from circuitfind.tasks.tokens import (
    aligned_pairs,
    encode_pairs,
    last_positions,
    sample_balanced,
    single_token_id,
    single_token_ids,
)

#: Opening sentences; ``{noun}`` and ``{name}`` introduce the person.
OPENINGS: tuple[str, ...] = (
    "Once upon a time, there was a little {noun} named {name}.",
    "Once upon a time, there was a {noun} named {name}.",
    "There was a little {noun} named {name}.",
    "Once upon a time, a little {noun} named {name} lived in a small house.",
    "One day, a little {noun} named {name} went to the park.",
)
#: Middle sentences; ``{Pron}`` is She/He, ``{poss}`` her/his.
MIDDLES: tuple[str, ...] = (
    "{Pron} liked to play.",
    "{Pron} loved to play with {poss} toys.",
    "{Pron} was very happy.",
    "{Pron} had a big red ball.",
    "{Pron} had a lot of friends.",
)
#: Endings after which the next word is the subject pronoun.
ENDINGS: tuple[str, ...] = ("One day,", "Every day,", "After that,", "Later,", "The next day,")

#: (female, male) name pairs; names must be single tokens and appear in one pair only (so
#: that no clean prompt repeats).
NAME_PAIRS: tuple[tuple[str, str], ...] = (
    ("Lily", "Tim"), ("Mary", "John"), ("Sarah", "Tom"), ("Anna", "Ben"),
    ("Emma", "Jack"), ("Lucy", "Sam"), ("Sue", "Bob"), ("Amy", "Max"), ("Kate", "Mike"),
    ("Jane", "Mark"),
)
#: (female, male) noun pairs; the two nouns must tokenize to equally many tokens.
NOUN_PAIRS: tuple[tuple[str, str], ...] = (
    ("girl", "boy"), ("princess", "prince"), ("sister", "brother"))
#: (female, male) pronouns: subject (the answer), capitalised subject, possessive.
PRONOUNS: dict[str, tuple[str, str]] = {
    "answer": (" she", " he"), "Pron": (" She", " He"), "poss": (" her", " his")}
GENDERS: tuple[str, ...] = ("female", "male")


@TASKS.register("gendered_pronoun")
class GenderedPronoun(Task):
    """Gendered pronoun prediction on story-style prompts, gender-flipped corrupted prompts.

    See the module docstring for the data. ``info`` holds per-example ``genders`` (of the
    clean prompt), ``names`` (clean name) and ``template_ids`` (opening, middle, ending
    indices), and ``dropped`` (word pairs unusable under this tokenizer).
    """

    name = "gendered_pronoun"
    description = "Predict ' she' vs ' he' after a gendered noun and name (TinyStories style)"
    metric_name = "logit difference"
    metric_unit = "logits"
    higher_is_better = True

    def build(self, tokenizer: Any, n: int, seed: int = 0) -> TaskData:
        """Build ``n`` gendered-pronoun examples (see :meth:`Task.build`).

        Args:
            tokenizer: A Hugging Face tokenizer.
            n: Number of examples, >= 1; at most twice the number of distinct prompts per
                gender (500 under stories260k's tokenizer, 7,500 under GPT-2's).
            seed: Seed of the sampler (Python ``random.Random``).

        Returns:
            TaskData with clean/corrupted ``[N, T]``, positions ``[N, 1]`` (last prompt token),
            answers ``[N, 1]`` (correct pronoun) and wrong answers ``[N, 1]`` (other pronoun).

        Raises:
            ConfigError: ``n`` < 1 or larger than the number of distinct prompts.
            TaskDataError: the pronouns are not single tokens, or no name pair (both names
                single tokens) or noun pair (equal token lengths) is usable under
                ``tokenizer``; or a corrupted prompt does not align with its clean one.

        References:
            Mathwin et al. 2023 (gendered pronoun task).
        """
        pronoun_ids = {key: [single_token_id(tokenizer, w, self.name) for w in pair]
                       for key, pair in PRONOUNS.items()}
        single, _ = single_token_ids(
            tokenizer, sorted({" " + w for pair in NAME_PAIRS for w in pair}), self.name)
        names = [p for p in NAME_PAIRS if all(" " + w in single for w in p)]
        nouns, dropped_nouns = aligned_pairs(
            tokenizer, [(" " + f, " " + m) for f, m in NOUN_PAIRS])
        nouns = [(f[1:], m[1:]) for f, m in nouns]
        if not names or not nouns:
            raise TaskDataError(
                f"Task 'gendered_pronoun' found {len(names)} usable name pairs (both names single "
                f"tokens; candidates {list(NAME_PAIRS)}) and {len(nouns)} usable noun pairs "
                f"(equal token lengths; candidates {list(NOUN_PAIRS)}) under this tokenizer; it "
                "needs at least one of each. Use a tokenizer with common English names as "
                "single tokens.")
        sizes = (len(OPENINGS), len(MIDDLES), len(ENDINGS), len(names), len(nouns))
        draws = sample_balanced(random.Random(seed), n, [sizes], self.name,
                                n_classes=len(GENDERS))
        clean, corrupted, genders, clean_names, template_ids = [], [], [], [], []
        for gender, _, (o, m, e, name_i, noun_i) in draws:
            other = 1 - gender
            clean.append(_prompt(o, m, e, names[name_i], nouns[noun_i], gender))
            corrupted.append(_prompt(o, m, e, names[name_i], nouns[noun_i], other))
            genders.append(GENDERS[gender])
            clean_names.append(names[name_i][gender])
            template_ids.append([o, m, e])
        clean_t, corrupted_t, mask = encode_pairs(tokenizer, clean, corrupted, self.name)
        g = torch.tensor([d[0] for d in draws], dtype=torch.long)
        ids = torch.tensor(pronoun_ids["answer"], dtype=torch.long)
        dropped = ([list(p) for p in NAME_PAIRS if p not in names]
                   + [[f[1:], m[1:]] for f, m in dropped_nouns])
        return TaskData(
            task=self, clean=clean_t, corrupted=corrupted_t, positions=last_positions(mask),
            answers=ids[g][:, None], wrong_answers=ids[1 - g][:, None], attention_mask=mask,
            clean_prompts=clean, corrupted_prompts=corrupted, seed=seed,
            info={"genders": genders, "names": clean_names, "template_ids": template_ids,
                  "dropped": dropped})

    def metric(self, logits: Tensor, data: TaskData) -> Tensor:
        """Logit difference ``logit(correct pronoun) - logit(other pronoun)``.

        Args:
            logits: ``[..., N, 1, V]`` logits gathered at ``data.positions``.
            data: The TaskData the logits belong to.

        Returns:
            ``[..., N]`` logit differences, in logits (higher is better).

        References:
            Mathwin et al. 2023 (logit difference of the gendered pronouns).
        """
        return metrics.logit_diff(logits, data.answers, data.wrong_answers)


def _prompt(opening: int, middle: int, ending: int, names: tuple[str, str],
            nouns: tuple[str, str], gender: int) -> str:
    """The prompt for one template and word choice, with every gendered word of ``gender``."""
    words = {"name": names[gender], "noun": nouns[gender],
             "Pron": PRONOUNS["Pron"][gender].strip(), "poss": PRONOUNS["poss"][gender].strip()}
    return " ".join((OPENINGS[opening].format(**words), MIDDLES[middle].format(**words),
                     ENDINGS[ending]))
