"""Tiny random models for integration tests (built once per session, in float64), the
in-process CLI runner ``run``, and ``cli_workers`` (concurrent ``circuitfind`` processes)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from circuitfind.cli import main
from circuitfind.testing import tiny_model

MODEL_SPECS = {
    "gpt2": dict(arch="gpt2", n_layers=2, n_heads=4, seed=0),
    "llama": dict(arch="llama", n_layers=2, n_heads=4, seed=1),
    "llama_gqa": dict(arch="llama", n_layers=3, n_heads=4, n_kv_heads=2, seed=2),
    # post-attention and post-MLP norms, soft-capping, local and global layers
    "gemma2": dict(arch="gemma2", n_layers=3, n_heads=4, n_kv_heads=2, seed=9),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> float64 TransformerBridge, built lazily."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            cache[name] = tiny_model(path, dtype=torch.float64, **MODEL_SPECS[name])
        return cache[name]

    return get


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run(capsys, monkeypatch):
    """Run ``circuitfind ARGS`` in-process through the console entry point (fast)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def invoke(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["circuitfind", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return invoke


@pytest.fixture
def ctrl_c(monkeypatch):
    """``with ctrl_c(PatchingEngine, "run", 6): ...``: inside the block the 6th call of the
    method raises KeyboardInterrupt (a Ctrl-C in the middle of a run); the method is restored
    when the block ends."""

    @contextlib.contextmanager
    def during(cls: type, name: str, call: int):
        original, calls = getattr(cls, name), {"n": 0}

        def interrupted(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, interrupted)
        try:
            yield
        finally:
            monkeypatch.setattr(cls, name, original)

    return during


@pytest.fixture
def cli_workers():
    """Run ``python -m circuitfind ARGS`` for each argument list at once (one thread each,
    offline) from the repository root; returns a :class:`Result` per process."""

    def invoke(*arg_lists: list[str]) -> list[Result]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        workers = [subprocess.Popen([sys.executable, "-m", "circuitfind", *args],
                                    cwd=Path(__file__).resolve().parents[2], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for args in arg_lists]
        return [_finish(w) for w in workers]

    return invoke


def _finish(worker: subprocess.Popen) -> Result:
    out, err = worker.communicate(timeout=600)
    return Result(worker.returncode, out, err)
