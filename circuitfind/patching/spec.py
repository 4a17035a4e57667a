"""What a removed edge carries: the ablation specification, as data.

A masked pass (:meth:`circuitfind.patching.PatchingEngine.run`) is described by data only: a
keep-mask ``M [K, S, R]``, an :class:`Ablation` saying what value a removed edge carries instead
of its sender's current output, and optionally a mask of kept edges *frozen* to their clean
values (path patching). The engine compiles these into one masked pass in one place
(:mod:`circuitfind.patching.runner`); algorithms only choose a specification.

Ablation kinds (sender outputs ``a'_u`` that removed edges carry):

- ``resample`` (default): the sender's output on the task's corrupted prompt of the same example
  (interchange intervention; Geiger et al. 2021; Wang et al. 2022 call it resample ablation with
  a matched counterfactual).
- ``zero``: zero (the sender's contribution is deleted; per-head outputs exclude the attention
  output bias, see :mod:`circuitfind.patching.runner`).
- ``mean``: the sender's output averaged over the task's corrupted examples and their real
  (unpadded) positions: one vector per sender.
- ``mean_positional``: the same average taken separately at each position (over the examples
  whose prompt reaches that position): one vector per sender and position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from circuitfind.errors import ConfigError

ABLATIONS = ("resample", "zero", "mean", "mean_positional")
#: The ablation used wherever none is given: the sender's output on the corrupted prompt.
DEFAULT_ABLATION = "resample"
#: Working memory (bytes) a run may use beyond the model's weights when no budget is given
#: (2 GiB): the engine's default budget is the weights plus this.
DEFAULT_MEMORY_BUDGET = 2 * 2**30
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}


def parse_memory(value: int | float | str | None) -> int:
    """A memory budget in bytes from ``4GiB``, ``512 MiB``, ``2GB``, ``1.5G`` or a number.

    Binary units (KiB, MiB, GiB, TiB and the bare K, M, G, T) are powers of 1024, decimal
    ones (kB, MB, GB, TB) powers of 1000; case is ignored. ``None`` gives
    :data:`DEFAULT_MEMORY_BUDGET`.

    Args:
        value: Bytes, or a number with a unit.

    Returns:
        The budget in bytes (int).

    Raises:
        ConfigError: not a positive size with a known unit.
    """
    if value is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(value, bool):
        raise ConfigError(f"A memory budget must be a size such as 4GiB or 512MiB; got {value!r}.")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        text = str(value).strip().lower().replace(" ", "").replace("_", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        number_text, unit = digits, text[len(digits):]
        try:
            number = float(number_text)
        except ValueError:
            number = float("nan")
        if unit not in _UNITS:
            number = float("nan")
    if not number > 0 or number == float("inf"):
        raise ConfigError(f"A memory budget must be a positive size such as 4GiB, 512MiB, 2GB "
                          f"or a number of bytes; got {value!r}.")
    return int(number * _UNITS[unit])


@dataclass(frozen=True)
class Ablation:
    """What removed edges carry.

    Args:
        kind: One of ``resample``, ``zero``, ``mean``, ``mean_positional`` (dashes accepted).

    Raises:
        ConfigError: an unknown kind (the message lists the valid ones).
    """

    kind: str = DEFAULT_ABLATION

    def __post_init__(self) -> None:
        kind = str(self.kind).replace("-", "_")
        if kind not in ABLATIONS:
            raise ConfigError(f"Unknown ablation {self.kind!r}; use one of {', '.join(ABLATIONS)}.")
        object.__setattr__(self, "kind", kind)

    @classmethod
    def parse(cls, value: Ablation | str | None) -> Ablation:
        """An :class:`Ablation` from an instance, a kind name or ``None`` (the default,
        :data:`DEFAULT_ABLATION`)."""
        if isinstance(value, Ablation):
            return value
        return cls() if value is None else cls(str(value))

    def values(self, corrupted: Tensor, data: Any) -> Tensor:
        """The ablation value of every sender.

        Args:
            corrupted: ``[S, N, T, d]`` sender outputs on the corrupted prompts.
            data: The :class:`~circuitfind.tasks.TaskData` (its ``corrupted_attention_mask``,
                or ``attention_mask`` where that is ``None``, marks the corrupted prompts'
                real positions).

        Returns:
            ``[S, N, T, d]`` (resample), ``[S, 1, 1, d]`` (zero, mean) or ``[S, 1, T, d]``
            (mean_positional), in the model's dtype.

        Raises:
            ConfigError: a mean ablation over fewer than two examples.
        """
        s, n, t, d = corrupted.shape
        if self.kind == "resample":
            return corrupted
        if self.kind == "zero":
            return corrupted.new_zeros(s, 1, 1, d)
        if n < 2:
            raise ConfigError(f"A {self.kind} ablation averages over the task's corrupted "
                              f"examples, but there is only {n}; build the data with n >= 2 "
                              "(more is better) or use the resample ablation.")
        # the corrupted prompts' own real tokens (prompt files may pad them differently
        # from the clean prompts)
        mask = (data.attention_mask if data.corrupted_attention_mask is None
                else data.corrupted_attention_mask)
        real = mask[:, :t].to(corrupted.device, corrupted.dtype)  # [N, T]
        weighted = corrupted * real[None, :, :, None]
        if self.kind == "mean":
            return weighted.sum((1, 2), keepdim=True) / real.sum().clamp_min(1)
        per_pos = real.sum(0)  # [T]
        return weighted.sum(1, keepdim=True) / per_pos.clamp_min(1)[None, None, :, None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for circuit metadata and reports)."""
        return {"kind": self.kind}

