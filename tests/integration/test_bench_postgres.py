"""Benchmark grids on a real PostgreSQL server (``.ci/run`` starts one with ``.ci/postgres``):
two worker processes started at once on a fresh study, one killed with SIGKILL while it holds a
cell, every cell completed exactly once, then the leaderboard from the same URL. The SQLite
version of the test is in ``test_bench.py``. Without a server these tests skip (CI fails)."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest

from circuitfind.benchmark.storage import database_url, open_storage

TrialState = optuna.trial.TrialState
ROOT = Path(__file__).resolve().parents[2]

GRID = """
models = ["zoo:induction-2l"]
tasks = ["induction"]
algorithms = ["eap"]
seeds = [0, 1, 2]
examples = 3
"""


def test_bare_postgresql_urls_go_to_the_installed_driver(monkeypatch):
    have = {"psycopg": True, "psycopg2": False}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if have.get(name) else None)
    assert database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url("postgres://u@/db?host=/s") == "postgresql+psycopg://u@/db?host=/s"
    for explicit in ("postgresql+psycopg2://u@h/db", "sqlite:///x.db", "mysql+pymysql://u@h/d"):
        assert database_url(explicit) == explicit
    have["psycopg2"] = True  # SQLAlchemy's own default then
    assert database_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_two_workers_on_postgres_one_killed_every_cell_once_then_leaderboard(
        postgres_url, tmp_path, run):
    config = tmp_path / "grid.toml"
    config.write_text(GRID)
    study = f"grid_{uuid.uuid4().hex[:12]}"  # the database outlives the test: a fresh study
    command = [sys.executable, "-m", "circuitfind", "bench", str(config), "--storage",
               postgres_url, "--study", study, "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # both at once on a study that does not exist yet: they create and enqueue it together
    workers = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    pids = {w.pid: w for w in workers}
    storage = open_storage(postgres_url)
    try:
        held, deadline = None, time.monotonic() + 180
        while held is None and time.monotonic() < deadline and all(
                w.poll() is None for w in workers):
            try:
                study_id = storage.get_study_id_from_name(study)
            except KeyError:  # not created yet
                time.sleep(0.05)
                continue
            held = next((t for t in storage.get_all_trials(study_id, deepcopy=False,
                                                           states=(TrialState.RUNNING,))
                         if int(str(t.user_attrs.get("worker", ":0")).rsplit(":", 1)[1])
                         in pids), None)
            time.sleep(0.02)
        assert held is not None, [w.communicate(timeout=600) for w in workers]
        doomed_pid = int(held.user_attrs["worker"].rsplit(":", 1)[1])
        os.kill(doomed_pid, signal.SIGKILL)  # mid-grid, holding a cell
        killed_at = datetime.datetime.now()
        doomed = pids.pop(doomed_pid)
        doomed.communicate()
        assert doomed.returncode == -signal.SIGKILL
        (survivor,) = pids.values()
        stdout, stderr = survivor.communicate(timeout=600)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.communicate()
    assert survivor.returncode == 0, stderr
    assert "3 of 3 cells done" in stdout
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    by_cell: dict[str, list] = {}
    for t in trials:
        by_cell.setdefault(t.user_attrs["cell"], []).append(t)
    assert len(by_cell) == 3
    for key, cell_trials in by_cell.items():
        assert [t.state for t in cell_trials].count(TrialState.COMPLETE) == 1, key
        ran = [t for t in cell_trials if "worker" in t.user_attrs]  # claimed and started
        # once, or twice where the killed worker held it; duplicates enqueued by the two
        # workers at once were pruned at their claim, never run
        assert len(ran) == (2 if key == held.user_attrs["cell"] else 1), key
        assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
                   for t in cell_trials), key
    dead = next(t for t in trials if t.number == held.number)
    assert dead.state == TrialState.FAIL and "error" not in dead.user_attrs
    waited = (dead.datetime_complete - killed_at).total_seconds()

    board = tmp_path / "board"
    out = run("leaderboard", "--storage", postgres_url, "--study", study, "--out", str(board))
    assert out.returncode == 0, out.stderr
    (row,) = json.loads((board / "leaderboard.json").read_text())["rows"]
    assert (row["task"], row["algorithm"], row["n_seeds"], row["seeds"]) == (
        "induction", "eap", 3, [0, 1, 2])
    cprs = [t.user_attrs["record"]["cpr"] for t in trials if t.state == TrialState.COMPLETE]
    assert row["cpr_mean"] == pytest.approx(sum(cprs) / 3)
    optuna.delete_study(study_name=study, storage=storage)
    print(f"PostgreSQL: killed worker's cell taken over {waited:.1f} s after the kill")
