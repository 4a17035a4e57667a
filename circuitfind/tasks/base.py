"""Task protocol, the tokenized data it builds (:class:`TaskData`) and the task registry.

A task turns a tokenizer, a size ``n`` and a ``seed`` into a deterministic batch of clean and
corrupted prompts plus everything a metric needs. A task never loads a model.

Conventions (all tasks):

- Token tensors are ``[N, T]`` int64, **right-padded** with ``pad_id``. Because every model
  here is causal, right padding never changes the logits at real positions, so no attention
  mask has to be passed to the model; ``attention_mask`` (clean) and
  ``corrupted_attention_mask`` mark the real tokens, for reference and for users.
- Clean and corrupted token tensors have the same shape ``[N, T]`` (so that sender activations
  can be swapped position by position). The built-in tasks make each clean prompt and its
  corrupted prompt equally long; prompt-file tasks (:mod:`circuitfind.tasks.files`) may not, in
  which case both are right-padded to a common length and the metric is read at the **clean**
  prompt's last real token (position ``t`` of the clean run receives the corrupted run's
  position ``t``, padding included, which cannot reach an earlier position of a causal model).
- ``positions`` ``[N, P]`` are the token positions whose next-token logits the metric reads
  (``P = 1`` for single-answer tasks such as IOI). The engine gathers logits there, so metrics
  receive ``[N, P, V]`` logits, not the full sequence.
- ``answers`` ``[N, A]`` and ``wrong_answers`` ``[N, W]`` are token ids; their meaning is the
  task's (for IOI: column 0 is the indirect object, the wrong answer the subject).
- A metric returns one value per example ``[N]``; ``Task.higher_is_better`` says which way is
  better; circuitfind averages over examples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from circuitfind.errors import TaskDataError
from circuitfind.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from circuitfind.graphs.circuit import Circuit
    from circuitfind.graphs.graph import ComputeGraph


@dataclass(frozen=True, eq=False)
class TaskData:
    """A tokenized batch of clean/corrupted prompt pairs for one task.

    Attributes:
        task: The task that built the data (its ``metric`` is used by :meth:`metric`).
        clean: Clean token ids, ``[N, T]`` int64, right-padded.
        corrupted: Corrupted token ids, ``[N, T]`` int64, aligned with ``clean``.
        positions: Metric positions, ``[N, P]`` int64 (the logits at ``positions[n, p]``
            predict the token after it).
        answers: Correct answer token ids, ``[N, A]`` int64.
        wrong_answers: Wrong/counterfactual answer token ids, ``[N, W]`` int64.
        attention_mask: ``[N, T]`` int64, 1 for real tokens and 0 for padding.
        clean_prompts: The clean prompt strings (without BOS), length N.
        corrupted_prompts: The corrupted prompt strings, length N.
        seed: The seed the data were built with.
        info: Free-form, JSON-serialisable details (template ids, names used ...).
        corrupted_attention_mask: ``[N, T]`` int64 real-token mask of the corrupted prompts
            (``None``: the same as ``attention_mask``).
        reference_logits: ``[N, P, V]`` float32 logits of the full model at ``positions``, for
            metrics measured against the full model (KL divergence); ``None`` otherwise.
    """

    task: Task
    clean: Tensor
    corrupted: Tensor
    positions: Tensor
    answers: Tensor
    wrong_answers: Tensor
    attention_mask: Tensor
    clean_prompts: list[str]
    corrupted_prompts: list[str]
    seed: int
    info: dict[str, Any] = field(default_factory=dict)
    corrupted_attention_mask: Tensor | None = None
    reference_logits: Tensor | None = None

    _TENSORS: ClassVar[tuple[str, ...]] = (
        "clean", "corrupted", "positions", "answers", "wrong_answers", "attention_mask",
        "corrupted_attention_mask", "reference_logits")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n(self) -> int:
        """Number of examples N."""
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        """Padded sequence length T."""
        return int(self.clean.shape[1])

    def validate(self) -> None:
        """Check shapes, dtypes and alignment.

        Raises:
            TaskDataError: shapes disagree, tokens are not int64, clean and corrupted examples
                have different lengths, or a metric position is outside the real tokens.
        """
        name = getattr(self.task, "name", "?")
        if self.clean.ndim != 2 or self.clean.dtype != torch.long:
            raise TaskDataError(f"Task {name!r}: clean tokens must be an int64 [N, T] tensor; "
                                f"got {self.clean.dtype} of shape {tuple(self.clean.shape)}.")
        if self.corrupted.shape != self.clean.shape:
            raise TaskDataError(
                f"Task {name!r}: clean and corrupted tokens must have the same shape; got "
                f"{tuple(self.clean.shape)} and {tuple(self.corrupted.shape)}. Corrupted prompts "
                "must tokenize to as many tokens as their clean prompt.")
        n, t = self.clean.shape
        if n == 0:
            raise TaskDataError(f"Task {name!r}: the data set is empty (N = 0).")
        for label, tensor in (("positions", self.positions), ("answers", self.answers),
                              ("wrong_answers", self.wrong_answers)):
            if tensor.ndim != 2 or tensor.shape[0] != n or tensor.dtype != torch.long:
                raise TaskDataError(f"Task {name!r}: {label} must be an int64 [N, k] tensor with "
                                    f"N = {n}; got {tensor.dtype} of shape {tuple(tensor.shape)}.")
        if self.attention_mask.shape != self.clean.shape:
            raise TaskDataError(f"Task {name!r}: attention_mask must have shape {(n, t)}.")
        if (self.corrupted_attention_mask is not None
                and self.corrupted_attention_mask.shape != self.clean.shape):
            raise TaskDataError(f"Task {name!r}: corrupted_attention_mask must have shape "
                                f"{(n, t)}.")
        if self.reference_logits is not None and (
                self.reference_logits.ndim != 3
                or tuple(self.reference_logits.shape[:2]) != tuple(self.positions.shape)):
            raise TaskDataError(f"Task {name!r}: reference_logits must be [N, P, V] with "
                                f"[N, P] = {tuple(self.positions.shape)}; got "
                                f"{tuple(self.reference_logits.shape)}.")
        lengths = self.attention_mask.sum(1)
        if len(self.clean_prompts) != n or len(self.corrupted_prompts) != n:
            raise TaskDataError(f"Task {name!r}: expected {n} clean and corrupted prompt strings.")
        if (self.positions < 0).any() or (self.positions >= lengths[:, None]).any():
            raise TaskDataError(f"Task {name!r}: a metric position lies outside its prompt's "
                                "real (unpadded) tokens.")

    def metric(self, logits: Tensor) -> Tensor:
        """The task metric per example.

        Args:
            logits: ``[N, P, V]`` logits gathered at ``positions`` (or ``[K, N, P, V]``).

        Logits of a half-precision (float16 / bfloat16) model are read in float32, so that
        the metric's arithmetic (a logit difference of two values near 10 would otherwise be
        rounded to bfloat16's 1/16) adds no rounding of its own; gradients flow back through
        the cast.

        Returns:
            ``[N]`` (or ``[K, N]``) metric values, in the task's unit (see ``task.metric_unit``):
            float32 for half-precision logits, else the logits' dtype.
        """
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return self.task.metric(logits, self)

    def to(self, device: torch.device | str) -> TaskData:
        """A copy with every tensor moved to ``device``."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in self._TENSORS:
            if kwargs[key] is not None:
                kwargs[key] = kwargs[key].to(device)
        return TaskData(**kwargs)

    def subset(self, index: slice | Tensor | list[int]) -> TaskData:
        """A TaskData restricted to the examples ``index`` selects (prompts included)."""
        idx = torch.arange(self.n)[index] if isinstance(index, slice) else torch.as_tensor(index)
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in self._TENSORS:
            if kwargs[key] is not None:
                kwargs[key] = kwargs[key][idx.to(kwargs[key].device)]
        kwargs["clean_prompts"] = [self.clean_prompts[i] for i in idx.tolist()]
        kwargs["corrupted_prompts"] = [self.corrupted_prompts[i] for i in idx.tolist()]
        return TaskData(**kwargs)


class Task(ABC):
    """A circuit-discovery task: builds :class:`TaskData` and defines the metric.

    Subclasses set the class attributes and implement :meth:`build` and :meth:`metric`, then
    register themselves with ``@TASKS.register("name")``.

    Attributes:
        name: Registry key (an identifier).
        description: One line shown by ``circuitfind tasks``.
        metric_name: Field term for the metric ("logit difference", "probability difference").
        metric_unit: "logits", "probability" or "nats".
        higher_is_better: Direction of the metric.
        default_n: Examples built when the caller does not say (``build_data(..., n=None)``).
        needs_reference_logits: The metric compares with the full model's logits
            (``TaskData.reference_logits``, filled by :func:`circuitfind.build_data`).
        source: Where the task's data come from (a file path), or ``None`` for generated
            data; recorded with circuits so that they can be re-evaluated.
        accuracy_description: What :meth:`correct` counts as a correct answer (for
            ``circuitfind check``).

    Tasks built from data (prompt files, MIB) set these per instance.
    """

    name: str = ""
    description: str = ""
    metric_name: str = ""
    metric_unit: str = ""
    higher_is_better: bool = True
    default_n: int = 64
    needs_reference_logits: bool = False
    source: str | None = None
    accuracy_description: str = ("the answer's logit beats every wrong answer's (top-1 where "
                                 "an example has no wrong answer)")

    @abstractmethod
    def build(self, tokenizer: Any, n: int, seed: int = 0) -> TaskData:
        """Build ``n`` clean/corrupted examples deterministically from ``seed``.

        Args:
            tokenizer: A Hugging Face tokenizer (``PreTrainedTokenizerBase``).
            n: Number of examples, >= 1.
            seed: Seed of the example sampler.

        Raises:
            ConfigError: ``n`` < 1 or more examples than the task can make.
            TaskDataError: the tokenizer does not make the task's words single tokens, or
                clean and corrupted prompts tokenize to different lengths.
        """

    @abstractmethod
    def metric(self, logits: Tensor, data: TaskData) -> Tensor:
        """Per-example metric from logits ``[..., N, P, V]`` gathered at ``data.positions``.

        Returns:
            ``[..., N]`` values in ``metric_unit``.
        """

    def correct(self, logits: Tensor, data: TaskData) -> Tensor:
        """Whether the model answers correctly at each metric position (for accuracy).

        The default: the best of an example's answers has a higher logit than every one of its
        wrong answers (``-1`` padding ignored); for an example without wrong answers, the
        answer is the most likely token (top-1). With ``P > 1`` positions and one answer
        column per position (induction), position ``p`` reads answer column ``p`` and, where
        there is one per position, wrong-answer column ``p``. Tasks whose answer is not one
        token (greater-than's "any later year") override this and
        :attr:`accuracy_description`.

        Args:
            logits: ``[N, P, V]`` logits gathered at ``data.positions`` (one model run).
            data: The TaskData the logits belong to (on the logits' device).

        Returns:
            ``[N, P]`` bool.
        """
        n, p, _ = logits.shape
        answers, wrong = data.answers.to(logits.device), data.wrong_answers.to(logits.device)
        per_position = p > 1 and answers.shape[1] == p
        out = torch.zeros(n, p, dtype=torch.bool, device=logits.device)
        for j in range(p):
            at = logits[:, j].float()
            good = answers[:, j: j + 1] if per_position else answers
            bad = wrong[:, j: j + 1] if per_position and wrong.shape[1] == p else wrong
            best = _max_logit(at, good)
            others = at.scatter(1, torch.where(good >= 0, good, good[:, :1]).clamp(min=0),
                                float("-inf")).max(1).values
            rival = (torch.where((bad >= 0).any(1), _max_logit(at, bad), others)
                     if bad.numel() else others)
            out[:, j] = best > rival
        return out

    def reference_circuit(self, model: str | ComputeGraph) -> Circuit:
        """The reference circuit of this task on a named model, where the literature has one.

        The default looks the pair (``self.name``, model) up in the registry of
        :mod:`circuitfind.tasks.references` (built in: ``ioi`` and ``greater_than`` on GPT-2
        small); a task with its own reference may override this. Nothing is loaded: the
        circuit is built from the model's ComputeGraph configuration.

        Args:
            model: A model name (``"gpt2"``, ``"openai-community/gpt2"``, ``"gpt2-small"``) or a
                ComputeGraph whose ``model_name`` is set.

        Returns:
            The reference :class:`~circuitfind.graphs.circuit.Circuit` (node classes in
            ``metadata["node_classes"]`` where the source gives them).

        Raises:
            NoReferenceError: no reference for this task on ``model`` (a ConfigError listing
                the models that have one).
            ConfigError: a graph without ``model_name`` or of another shape than the model's.

        References:
            Conmy et al. 2023, arXiv:2304.14997 (reference circuits as ground truth for ROC
            evaluation); the sources of each reference are given in
            :mod:`circuitfind.tasks.references`.
        """
        from circuitfind.tasks.references import reference_circuit

        return reference_circuit(self.name, model)

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of :func:`get_task` that rebuild this task from ``source``.

        Empty for registered tasks; a prompt file's metric and ``first_token`` otherwise.
        Recorded with discovered circuits so that ``circuitfind evaluate`` reads the file the
        same way.
        """
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _max_logit(logits: Tensor, ids: Tensor) -> Tensor:
    """``[N]`` the largest of ``logits[n, ids[n, :]]`` over ids >= 0 (``-inf`` if none).

    Args:
        logits: ``[N, V]``.
        ids: ``[N, k]`` token ids, ``-1`` for padding.
    """
    values = logits.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf"))
    return values.max(1).values if ids.shape[1] else torch.full_like(logits[:, 0],
                                                                        float("-inf"))


TASKS: Registry[type[Task]] = Registry("task", entry_point_group="circuitfind.tasks")


TASK_FILE_SUFFIXES = (".jsonl", ".csv", ".json")
"""Suffixes of task files :func:`get_task` reads."""
