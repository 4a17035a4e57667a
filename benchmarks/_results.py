"""Shared by the benchmark scripts: write a result as JSON plus its Markdown table; time
functions in interleaved rounds; label a run with its date and commit."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def interleaved_rounds(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """CPU seconds (``time.process_time``) of each of ``fns`` per round, the functions
    alternating within each round after one warm-up call each, so that a busy shared machine
    slows all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return times


def fresh_scorers(algos: dict[str, Any], engine: Any, data: Any) -> dict[str, Callable[[], Any]]:
    """``{name: () -> algo.score(engine, data')}`` with ``data'`` holding a new corrupted
    tensor each call, so that the engine's memo of the corrupted run never hits."""
    import dataclasses

    def scorer(algo: Any) -> Callable[[], Any]:
        return lambda: algo.score(engine, dataclasses.replace(
            data, corrupted=data.corrupted.clone()))

    return {name: scorer(algo) for name, algo in algos.items()}


def git(*args: str) -> str:
    """``git ARGS`` in the repository (e.g. ``rev-parse --short HEAD``), or ``"unknown"``."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, ``"2.6 4.4 6.2"``."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``"AMD EPYC"``, ``"Intel(R) Xeon(R) ..."``),
    or the architecture where there is none: speed ratios differ between Intel and AMD."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The processor, its model and torch's version, ``"x86_64 (AMD EPYC), torch
    2.13.0+cpu"``."""
    import torch

    return (f"{platform.processor() or platform.machine()} ({cpu_model()}), "
            f"torch {torch.__version__}")


def utc_now() -> str:
    """The date and time now, ``YYYY-MM-DD HH:MM UTC``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_results(out: str | Path, result: dict[str, Any],
                  markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write ``OUT.json`` (raw numbers) and ``OUT.md`` (``markdown(result)``), then print it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
