"""The run lifecycle long algorithms share: checkpoints, resume, progress, interruption.

Every long algorithm (``exact``, ``acdc``, later ones) runs through one :class:`RunContext`,
which the caller (:func:`circuitfind.discover`, the CLI, a user) creates and passes to
:meth:`~circuitfind.algorithms.base.Algorithm.score` / ``discover``. The calling order inside an
algorithm is always:

1. ``key = fingerprint(engine, data, settings)`` — a hash of the model's parameters, the task
   data, the graph and every setting that changes the result (threshold, mode, objective ...);
2. ``state = context.resume(key)`` — the saved state dict, ``None`` for a fresh run, or a
   :class:`~circuitfind.errors.CheckpointMismatchError` when the file belongs to another run;
3. the work loop, calling ``context.save(key, state)`` after each unit of work (the context
   writes at most every ``save_every_s`` seconds or ``save_every`` units, atomically with
   :func:`circuitfind._files.atomic_write`: a temporary file then ``os.replace``) and
   updating ``context.bar(...)``;
4. on ``KeyboardInterrupt`` or an error: ``context.save(key, state, force=True)`` then re-raise,
   so the same call (or CLI command) continues where it stopped with the identical result;
5. at the end: ``context.save(key, final_state, force=True)`` (a rerun then returns the result
   at once); the caller may delete the checkpoint (the CLI does once the outputs are written).

State dicts hold tensors, numbers, strings and lists (``torch.save`` / ``torch.load`` with
``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from circuitfind._files import atomic_write
from circuitfind._progress import progress, resuming
from circuitfind.errors import CheckpointMismatchError, ConfigError


@dataclass
class RunContext:
    """Checkpointing and progress for one algorithm run.

    Args:
        checkpoint: File to save state to and resume from (``None``: no checkpoint).
        progress: Show progress: a tqdm bar when stderr is a terminal, else one line per
            phase (:func:`circuitfind._progress.progress`).
        save_every_s: Write the checkpoint at most this often (seconds; ``0``: every unit).
        save_every: Also write after this many units of work since the last write
            (``None``: time only).

    Raises:
        ConfigError: a negative ``save_every_s`` or ``save_every`` < 1.
    """

    checkpoint: str | os.PathLike[str] | None = None
    progress: bool = True
    save_every_s: float = 10.0
    save_every: int | None = None
    _last_save: float = field(default=0.0, init=False, repr=False)
    _since_save: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.save_every_s >= 0:
            raise ConfigError(f"save_every_s must be >= 0 seconds; got {self.save_every_s}.")
        if self.save_every is not None and self.save_every < 1:
            raise ConfigError(f"save_every must be None or >= 1; got {self.save_every}.")
        self._last_save = time.monotonic()

    @property
    def path(self) -> Path | None:
        """The checkpoint path (``None`` when not checkpointing)."""
        return None if self.checkpoint is None else Path(self.checkpoint)

    def resume(self, key: str) -> dict[str, Any] | None:
        """The saved state of the run ``key``, or ``None`` when there is no checkpoint yet.

        Raises:
            CheckpointMismatchError: the checkpoint was written by a run with another
                fingerprint (different model, data, threshold or settings).
        """
        path = self.path
        if path is None or not path.exists():
            return None
        state = torch.load(path, weights_only=True)
        if state.get("key") != key:
            raise CheckpointMismatchError(
                f"The checkpoint {str(path)!r} belongs to a different run (model, task data, "
                f"threshold or settings differ: saved by {state.get('settings', '?')}); delete "
                "it, choose another --out, or rerun with the original settings.")
        return state["state"]

    def save(self, key: str, state: dict[str, Any], units: int = 1, force: bool = False,
             settings: str = "") -> bool:
        """Write ``state`` atomically when due (or ``force``); returns whether it wrote.

        Args:
            key: The run's fingerprint.
            state: The algorithm's state (tensors, numbers, strings, lists).
            units: Units of work done since the previous call (for ``save_every``).
            force: Write now (end of run, interruption, error).
            settings: A short human-readable description of the run, shown when a mismatching
                run tries to resume from this file.
        """
        path = self.path
        if path is None:
            return False
        self._since_save += units
        now = time.monotonic()
        due = (force or now - self._last_save >= self.save_every_s
               or (self.save_every is not None and self._since_save >= self.save_every))
        if not due:
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save({"key": key, "settings": settings, "state": state}, buffer)
        atomic_write(path, buffer.getvalue())
        self._last_save, self._since_save = now, 0
        return True

    def bar(self, total: int, initial: int = 0, desc: str = "", unit: str = "edge") -> Any:
        """Progress of one phase: a tqdm bar on a terminal, one line when it ends in a log
        (:func:`circuitfind._progress.progress`); nothing when ``progress`` is False."""
        return progress(total, initial=initial, desc=desc, unit=unit, show=self.progress)

    def resumed(self, what: str, done: int, total: int, unit: str) -> None:
        """Say that the run resumes from the checkpoint with ``done`` of ``total`` units done
        (``resuming ACDC: 120 of 1701 edges done``, on the ``circuitfind.progress`` logger),
        also when progress is not shown: the result rests on the checkpoint."""
        resuming(what, done, total, unit)


_SUM_CHUNK = 1 << 22  # elements a float64 sum converts at a time: 32 MiB


def _float64_sum(p: torch.Tensor) -> float:
    """The sum of ``p``'s values in float64, converting at most :data:`_SUM_CHUNK` values at
    a time: a whole-tensor ``p.double()`` of a large model's embedding (Gemma-2's 256k x
    2304) would briefly hold 4 GiB beside the weights, outside any memory budget."""
    flat = p.detach().reshape(-1)
    return float(sum(chunk.double().sum() for chunk in flat.split(_SUM_CHUNK)))


def fingerprint(engine: Any, data: Any, settings: dict[str, Any] | None = None,
                version: str = "") -> str:
    """A hash of the graph, the engine's ablation, the model's parameters (shapes and sums), the
    task data and settings.

    Args:
        engine: The :class:`~circuitfind.patching.PatchingEngine` (its model and graph).
        data: The :class:`~circuitfind.tasks.TaskData`.
        settings: JSON-serialisable settings that change the result (threshold, mode ...).
        version: The algorithm's state-layout version (bump it when the state changes).

    Returns:
        A hex SHA-256 digest.
    """
    h = hashlib.sha256()
    h.update(version.encode())
    h.update(repr(engine.graph.config()).encode())
    h.update(json.dumps(settings or {}, sort_keys=True, default=str).encode())
    ablation = getattr(engine, "ablation", None)  # what removed edges carry changes every result
    h.update(repr(None if ablation is None else ablation.to_dict()).encode())
    with torch.no_grad():
        for name, p in engine.model.named_parameters():
            h.update(name.encode())
            h.update(f"{tuple(p.shape)}:{_float64_sum(p):.12e}".encode())
    for t in (data.clean, data.corrupted, data.positions, data.answers, data.wrong_answers):
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()
