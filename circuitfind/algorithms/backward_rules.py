"""The shared base of attribution methods that change EAP's backward pass (GIM, RelP).

Each such method is EAP's contraction ``sum (a'_u - a_u) . g~_r`` with ``g~_r`` from a backward
pass under :class:`~circuitfind.patching.backward_rules.BackwardRules`; a subclass only builds
its rules from its hyperparameters (``self.rules``) and documents them.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from circuitfind.algorithms.base import Algorithm
from circuitfind.algorithms.eap import require_clean_gradient
from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.errors import ConfigError
from circuitfind.patching.backward_rules import PLAIN, BackwardRules
from circuitfind.patching.engine import PatchingEngine
from circuitfind.tasks.base import TaskData


def check_batch_size(method: str, batch_size: int | None) -> None:
    """Raise :class:`ConfigError` unless ``batch_size`` is ``None`` or an int >= 1."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ConfigError(f"The 'batch_size' parameter of {method} must be None or an int "
                          f">= 1. Got {batch_size!r}.")


class RulesAttribution(Algorithm):
    """EAP under modified backward rules: subclasses set ``self.rules`` and ``self.batch_size``
    in ``__init__``.

    Attributes:
        label: The method's name in messages (``"GIM"``).
    """

    label: ClassVar[str] = ""
    rules: BackwardRules = PLAIN
    batch_size: int | None = None

    def score(self, engine: PatchingEngine, data: TaskData,
              context: RunContext | None = None) -> Tensor:
        """Scores ``[S, R]`` in the task's metric unit: EAP's contraction with the gradient of
        the backward pass under ``self.rules`` (one corrupted forward, one clean forward and
        backward pass; ``context`` is ignored).

        Raises:
            ConfigError: the task's metric has no gradient in the clean run (KL to the full
                model), or the model's family has no block runner.
        """
        require_clean_gradient(self.label, data)
        return engine.edge_attribution(data, batch_size=self.batch_size, rules=self.rules)
