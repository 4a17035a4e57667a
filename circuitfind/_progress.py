"""Progress for long work: a bar on a terminal, one line per phase in a log.

A tqdm bar redraws itself with carriage returns and cursor codes, which fill a redirected log
(a grid worker's, a cluster job's) with hundreds of partial lines. :func:`progress` therefore
draws a bar only when it is asked for, standard error is a terminal and ``TQDM_DISABLE`` is not
set; otherwise it reports each phase in one line on the ``circuitfind.progress`` logger when
the phase ends (``exact patching: 3628 of 3628 edges in 4.1 s``), which the command line prints
and a library user sees only if they configure logging. A phase longer than
:data:`LOG_EVERY_S` also logs a line each time that much time has passed, so that a log of an
hours-long run shows it is alive (``ACDC τ=0.01: 5200 of 32491 edges, 60 s so far``).

:func:`quiet` switches every bar and phase line off for a block (the command line's
``--no-progress``), including the weight-loading bars of Hugging Face that
:func:`circuitfind.load_model` shows through :func:`bars_wanted`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

LOGGER = logging.getLogger("circuitfind.progress")
LOG_EVERY_S = 60.0
"""Seconds between the lines a long phase logs while it runs (a log, not a terminal)."""
_QUIET: list[bool] = []  # one entry per active quiet() block


@contextlib.contextmanager
def quiet(active: bool = True) -> Iterator[None]:
    """No progress bars or phase lines inside the block (when ``active``).

    Args:
        active: Whether to switch progress off (``False``: the block runs unchanged).

    Returns:
        A context manager; blocks nest.
    """
    if active:
        _QUIET.append(True)
    try:
        yield
    finally:
        if active:
            _QUIET.pop()


def shown(requested: bool = True) -> bool:
    """Whether progress (a bar or phase lines) was requested and not switched off by
    :func:`quiet`."""
    return requested and not _QUIET


def bars_wanted(requested: bool = True) -> bool:
    """Whether to draw a progress bar: requested, not inside :func:`quiet`, ``TQDM_DISABLE``
    unset (or 0/false/no) and standard error a terminal."""
    if not shown(requested):
        return False
    if os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class PhaseLog:
    """A stand-in for a tqdm bar that logs one line when the phase ends (or is interrupted).

    It takes the bar methods the algorithms use (``update``, ``n``, ``set_postfix``,
    ``set_postfix_str``, ``refresh``, ``close``) and keeps only the count and the last postfix.

    Args:
        total: Units of work in the phase (``None``: unknown).
        initial: Units already done (a resumed run).
        desc: The phase's name.
        unit: The unit's name (``edge``, ``cell``).
        quiet: Log nothing (progress was not requested at all).
    """

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", unit: str = "it",
                 quiet: bool = False) -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.initial, self.quiet, self.postfix = initial, quiet, ""
        self.started = self.last_line = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; log a line when :data:`LOG_EVERY_S` seconds have passed
        since the last one."""
        self.n += n
        now = time.monotonic()
        if not self.quiet and not self.closed and now - self.last_line >= LOG_EVERY_S:
            self.last_line = now
            of = f" of {self.total}" if self.total is not None else ""
            LOGGER.info(f"{self.desc}: {self.n}{of} {self.unit}s, {now - self.started:.0f} s "
                        "so far")

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """Keep ``key=value`` details for the closing line."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        """Keep a detail string for the closing line."""
        self.postfix = text

    def refresh(self) -> None:
        """Nothing to redraw in a log."""

    def close(self) -> None:
        """Log the phase's one line (once)."""
        if self.closed or self.quiet:
            self.closed = True
            return
        self.closed = True
        of = f" of {self.total}" if self.total is not None else ""
        resumed = f" ({self.initial} done before resuming)" if self.initial else ""
        extra = f"; {self.postfix}" if self.postfix else ""
        LOGGER.info(f"{self.desc}: {self.n}{of} {self.unit}s in "
                    f"{time.monotonic() - self.started:.1f} s{resumed}{extra}")

    def __enter__(self) -> PhaseLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None, initial: int = 0, desc: str = "", unit: str = "it",
             show: bool = True, leave: bool = False) -> Any:
    """A tqdm bar on a terminal (see :func:`bars_wanted`), else a :class:`PhaseLog`.

    Args:
        total, initial, desc, unit: As tqdm's.
        show: Whether progress was requested (``False``, or inside :func:`quiet`: a silent
            :class:`PhaseLog`).
        leave: Keep the finished bar on screen.

    Returns:
        An object with tqdm's ``update``/``n``/``set_postfix``/``refresh``/``close``.
    """
    if bars_wanted(show):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                    dynamic_ncols=True)
    return PhaseLog(total, initial, desc, unit, quiet=not shown(show))


def resuming(what: str, done: int, total: int, unit: str) -> None:
    """Say that a run resumes from a checkpoint (``resuming ACDC: 632 of 1701 edges done``).

    Logged whether or not progress is shown: it says what the run's result rests on.

    Args:
        what: The run's name (``ACDC``, ``exact patching``).
        done: Units of work the checkpoint holds.
        total: Units of work in the whole run.
        unit: The unit's name (``edge``).
    """
    LOGGER.info(f"resuming {what}: {done} of {total} {unit}s done")
