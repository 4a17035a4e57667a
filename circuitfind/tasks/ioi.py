"""Indirect object identification (IOI), the data set of Wang et al. (2022).

A prompt introduces two people and repeats one of them (the subject S); the model should
complete it with the other one (the indirect object IO):

    "When Mary and John went to the store, John gave a drink to"  ->  " Mary"

The fifteen templates, the names, places and objects are those of the authors' code
(``ioi_dataset.py``, also used by the ACDC paper). Each template comes in both name orders:
``BABA`` ("Then, [B] and [A] went ... [B] gave ... to") and ``ABBA`` ("Then, [A] and [B] went
... [B] gave ... to"), where ``[A]`` is the IO and ``[B]`` the subject; the prompt ends right
before the IO name. Examples alternate between the two orders.

Corrupted prompts are the "ABC" data set of the ACDC paper (Conmy et al. 2023, their
``gen_flipped_prompts(..., "ABB->XYZ, BAB->XYZ")``): the three names of the clean prompt (S1, IO,
S2) are replaced by three distinct names, all different from the clean IO and S, so that the
corrupted prompt carries no information about which name is the indirect object. All names
are single tokens, so clean and corrupted prompts have the same token length.

Word lists are filtered to the words that are single tokens (with their leading space) under
the given tokenizer; ``info["dropped_names"]``, ``info["dropped_places"]`` and
``info["dropped_objects"]`` record what was removed. Under GPT-2 nothing is dropped.

Metric: the logit difference ``logit(IO) - logit(S)`` at the last prompt position
(``answers[:, 0]`` = IO, ``wrong_answers[:, 0]`` = S), in logits; higher is better.

References:
    Wang, Variengien, Conmy, Shlegeris, Steinhardt. "Interpretability in the Wild: a Circuit
    for Indirect Object Identification in GPT-2 small." ICLR 2023, arXiv:2211.00593
    (Section 2, Appendix E / Figure 14 for the templates).
    Conmy, Mavor-Parker, Lynch, Heimersheim, Garriga-Alonso. "Towards Automated Circuit
    Discovery for Mechanistic Interpretability." NeurIPS 2023, arXiv:2304.14997 (the ABC
    corrupted data set).
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
    encode_pairs,
    last_positions,
    sample_balanced,
    single_token_ids,
)

#: The fifteen templates of Wang et al.'s code in the BABA order ([B] = subject S, [A] = IO).
#: The final "[A]" (the answer) is not part of the prompt.
BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] "
    "to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)

#: The ABBA order: the first [B] and [A] swapped (as the authors' code derives it).
ABBA_TEMPLATES: tuple[str, ...] = tuple(
    t.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1)
    for t in BABA_TEMPLATES)

#: Names of Wang et al.'s code (all single tokens under GPT-2 with a leading space).
NAMES: tuple[str, ...] = (
    "Aaron", "Adam", "Alan", "Alex", "Alice", "Amy", "Anderson", "Andre", "Andrew", "Andy",
    "Anna", "Anthony", "Arthur", "Austin", "Blake", "Brandon", "Brian", "Carter", "Charles",
    "Charlie", "Christian", "Christopher", "Clark", "Cole", "Collins", "Connor", "Crew",
    "Crystal", "Daniel", "David", "Dean", "Edward", "Elizabeth", "Emily", "Eric", "Eva", "Ford",
    "Frank", "George", "Georgia", "Graham", "Grant", "Henry", "Ian", "Jack", "Jacob", "Jake",
    "James", "Jamie", "Jane", "Jason", "Jay", "Jennifer", "Jeremy", "Jessica", "John",
    "Jonathan", "Jordan", "Joseph", "Joshua", "Justin", "Kate", "Kelly", "Kevin", "Kyle",
    "Laura", "Leon", "Lewis", "Lisa", "Louis", "Luke", "Madison", "Marco", "Marcus", "Maria",
    "Mark", "Martin", "Mary", "Matthew", "Max", "Michael", "Michelle", "Morgan", "Patrick",
    "Paul", "Peter", "Prince", "Rachel", "Richard", "River", "Robert", "Roman", "Rose", "Ruby",
    "Russell", "Ryan", "Sarah", "Scott", "Sean", "Simon", "Stephen", "Steven", "Sullivan",
    "Taylor", "Thomas", "Tyler", "Victoria", "Warren", "William",
)
PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")

ORDERS: tuple[str, ...] = ("ABBA", "BABA")
_MIN_NAMES = 5  # IO, S and three other names for the ABC corrupted prompt


@TASKS.register("ioi")
class IOI(Task):
    """Indirect object identification (Wang et al. 2022) with the ABC corrupted data set.

    See the module docstring for the data. ``build`` draws examples without repeats,
    alternating ABBA and BABA orders; ``info`` holds per-example ``template_ids``,
    ``orders``, ``io_names``, ``s_names`` and the words dropped for this tokenizer.
    """

    name = "ioi"
    description = "Indirect object identification (Wang et al. 2022), ABC corrupted prompts"
    metric_name = "logit difference"
    metric_unit = "logits"
    higher_is_better = True

    def build(self, tokenizer: Any, n: int, seed: int = 0) -> TaskData:
        """Build ``n`` IOI examples (see :meth:`Task.build`).

        Args:
            tokenizer: A Hugging Face tokenizer.
            n: Number of examples, >= 1; at most the number of distinct prompts per order
                times 2 (about 20 million under GPT-2).
            seed: Seed of the sampler (Python ``random.Random``).

        Returns:
            TaskData with clean/corrupted ``[N, T]``, positions ``[N, 1]`` (last prompt token),
            answers ``[N, 1]`` (IO) and wrong answers ``[N, 1]`` (S).

        Raises:
            ConfigError: ``n`` < 1 or larger than the number of distinct prompts.
            TaskDataError: fewer than five names, or no place or object, are single tokens
                under ``tokenizer``; or a corrupted prompt does not align with its clean one.

        References:
            Wang et al. 2022, arXiv:2211.00593, Appendix E; Conmy et al. 2023,
            arXiv:2304.14997, Section 4 (ABC data set).
        """
        names, dropped_names = single_token_ids(tokenizer, [" " + w for w in NAMES], self.name)
        places, dropped_places = single_token_ids(tokenizer, [" " + w for w in PLACES], self.name)
        objects, dropped_objects = single_token_ids(
            tokenizer, [" " + w for w in OBJECTS], self.name)
        if len(names) < _MIN_NAMES or not places or not objects:
            raise TaskDataError(
                f"Task 'ioi' needs at least {_MIN_NAMES} single-token names and one single-token "
                f"place and object; this tokenizer has {len(names)} names ({list(names)[:10]}), "
                f"{len(places)} places and {len(objects)} objects. Use a tokenizer whose "
                "vocabulary holds common English names as single tokens (e.g. GPT-2's).")
        name_list = [w[1:] for w in names]
        place_list = [w[1:] for w in places]
        object_list = [w[1:] for w in objects]
        k = len(name_list)

        def slots(template: str) -> tuple[int, ...]:
            # (IO, S != IO) name pair, then the place and object where the template has them
            return ((k * (k - 1),) + ((len(place_list),) if "[PLACE]" in template else ())
                    + ((len(object_list),) if "[OBJECT]" in template else ()))

        rng = random.Random(seed)
        draws = sample_balanced(rng, n, [slots(t) for t in BABA_TEMPLATES], self.name,
                                n_classes=len(ORDERS))
        clean, corrupted, io_names, s_names, template_ids, orders = [], [], [], [], [], []
        for order, tid, digits in draws:
            io, s_offset = divmod(digits[0], k - 1)
            s = s_offset + (s_offset >= io)
            rest = list(digits[1:])
            place = place_list[rest.pop(0)] if "[PLACE]" in BABA_TEMPLATES[tid] else ""
            obj = object_list[rest.pop(0)] if "[OBJECT]" in BABA_TEMPLATES[tid] else ""
            template = (ABBA_TEMPLATES if ORDERS[order] == "ABBA" else BABA_TEMPLATES)[tid]
            prompt = template.removesuffix(" [A]").replace("[PLACE]", place).replace(
                "[OBJECT]", obj)
            others = rng.sample([i for i in range(k) if i not in (io, s)], 3)
            clean.append(_fill_names(prompt, [name_list[io], name_list[s]]))
            corrupted.append(_fill_names(prompt, [name_list[i] for i in others]))
            io_names.append(name_list[io])
            s_names.append(name_list[s])
            template_ids.append(tid)
            orders.append(ORDERS[order])
        clean_t, corrupted_t, mask = encode_pairs(tokenizer, clean, corrupted, self.name)
        answers = torch.tensor([[names[" " + w]] for w in io_names], dtype=torch.long)
        wrong = torch.tensor([[names[" " + w]] for w in s_names], dtype=torch.long)
        return TaskData(
            task=self, clean=clean_t, corrupted=corrupted_t, positions=last_positions(mask),
            answers=answers, wrong_answers=wrong, attention_mask=mask, clean_prompts=clean,
            corrupted_prompts=corrupted, seed=seed,
            info={"template_ids": template_ids, "orders": orders, "io_names": io_names,
                  "s_names": s_names, "dropped_names": [w[1:] for w in dropped_names],
                  "dropped_places": [w[1:] for w in dropped_places],
                  "dropped_objects": [w[1:] for w in dropped_objects]})

    def metric(self, logits: Tensor, data: TaskData) -> Tensor:
        """Logit difference ``logit(IO) - logit(S)`` at the last prompt position.

        Args:
            logits: ``[..., N, 1, V]`` logits gathered at ``data.positions``.
            data: The TaskData the logits belong to.

        Returns:
            ``[..., N]`` logit differences, in logits (higher is better).

        References:
            Wang et al. 2022, arXiv:2211.00593, Section 3 ("logit difference").
        """
        return metrics.logit_diff(logits, data.answers, data.wrong_answers)


def _fill_names(prompt: str, names: list[str]) -> str:
    """Fill the name slots of ``prompt`` in reading order.

    With two names ``[IO, S]`` this fills ``[A]`` with IO and every ``[B]`` with S (the clean
    prompt); with three names it fills the first, second and third name slot in reading order
    with them (the ABC corrupted prompt), whatever their letters.
    """
    if len(names) == 2:
        return prompt.replace("[A]", names[0]).replace("[B]", names[1])
    out = prompt
    for name in names:
        at = min(i for i in (out.find("[A]"), out.find("[B]")) if i >= 0)
        out = out[:at] + name + out[at + 3:]
    return out
