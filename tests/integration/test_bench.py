"""Benchmark grids on the zoo organisms: config validation, skipped cells, records, resumption,
dead workers, two worker processes on one SQLite file, crashing cells, and the leaderboard."""

from __future__ import annotations

import datetime
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

import circuitfind as cf
from circuitfind.benchmark import grid
from circuitfind.benchmark.grid import STUDY_MARKER, iter_records, load_config, plan_grid
from circuitfind.benchmark.leaderboard import aggregate, markdown, to_csv
from circuitfind.benchmark.storage import open_storage
from circuitfind.errors import ConfigError
from circuitfind.zoo import zoo_model_dir

TrialState = optuna.trial.TrialState

# two task/model pairs that fit, one that does not (induction-2l's tokenizer has no names)
GRID = """
examples = 4
seeds = [0, 1]
algorithms = ["eap", "exact"]

[[grid]]
models = ["zoo:ioi-small"]
tasks = ["ioi"]

[[grid]]
models = ["zoo:induction-2l"]
tasks = ["induction", "ioi"]
algorithms = ["eap"]
"""


SMALL = """
models = ["zoo:induction-2l"]
tasks = ["induction"]
algorithms = ["eap"]
seeds = [0, 1, 2, 3]
examples = 4
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(GRID)
    return path


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text(SMALL)
    return path


def storage_url(tmp_path, name="bench.db"):
    return f"sqlite:///{tmp_path / name}"


def trials_by_cell(url, study):
    out = {}
    for t in optuna.load_study(study_name=study, storage=url).get_trials():
        out.setdefault(t.user_attrs["cell"], []).append(t)
    return out


def test_config_problems_are_all_listed_at_once():
    raw = {"models": ["zoo:ioi-smal", "zoo:induction-2l"], "tasks": ["ioi", "inductoin"],
           "algorithms": {"eap": {}, "eapp": {}, "eap_ig": {"stepz": [1, 2]},
                          "acdc": {"threshold": [0.01, -1]}},
           "seeds": [0, "one"], "colour": "red", "convention": "nope"}
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    text = str(err.value)
    for needle in ("'colour'", "convention", "zoo:ioi-smal", "'inductoin'", "'eapp'",
                   "stepz", "'threshold' parameter of ACDC", "seeds must be"):
        assert needle in text, needle
    assert "8 problems" in text


def test_bad_storage_url_and_missing_config(config, tmp_path):
    with pytest.raises(ConfigError, match="Cannot open the Optuna storage"):
        cf.bench(config, storage=f"sqlite:///{tmp_path}/no/such/dir/x.db", progress=False)
    with pytest.raises(ConfigError, match="SQLAlchemy URL"):
        cf.bench(config, storage="bench.db", progress=False)
    with pytest.raises(ConfigError, match="Cannot read the bench config"):
        cf.bench(tmp_path / "missing.toml", storage=storage_url(tmp_path), progress=False)
    (tmp_path / "bad.toml").write_text("models = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_hyperparameter_grid_and_skipped_cells(config):
    cfg = load_config({"models": ["zoo:induction-2l"], "tasks": ["induction", "ioi"],
                       "algorithms": {"eap_ig": {"steps": [2, 3], "interpolation": "inputs"}},
                       "seeds": [0], "examples": 4})
    assert [c.label for c in cfg.cells[:2]] == ['eap_ig(interpolation="inputs", steps=2)',
                                               'eap_ig(interpolation="inputs", steps=3)']
    plan = plan_grid(cfg)
    assert {c.task for c in plan.cells} == {"induction"} and len(plan.cells) == 2
    assert [(s["model"], s["task"], s["seeds"]) for s in plan.skipped] == [
        ("zoo:induction-2l", "ioi", [0])]
    assert "single-token names" in plan.skipped[0]["reason"]


def test_grid_end_to_end_then_resume_runs_nothing(config, tmp_path, run):
    url = storage_url(tmp_path)
    board = tmp_path / "board"
    out = run("bench", str(config), "--storage", url, "--no-progress", "--out", str(board))
    assert out.returncode == 0, out.stderr
    assert "skipped: ioi on zoo:induction-2l (seeds 0, 1)" in out.stderr
    assert "6 of 6 cells done (6 by this worker), 0 failed" in out.stdout
    # one command from a config to the leaderboard: its tables hold every cell's algorithm
    assert f"leaderboard written to {board}" in out.stdout
    table = (board / "leaderboard.md").read_text()
    assert "zoo:ioi-small" in table and "exact" in table and (board / "leaderboard.csv").exists()
    records = {(r["model"], r["task"], r["algorithm"], r["seed"]): r
               for r in iter_records(optuna.load_study(study_name="grid", storage=url))}
    assert len(records) == 6 and ("zoo:induction-2l", "induction", "exact", 0) not in records
    rec = records[("zoo:ioi-small", "ioi", "exact", 1)]
    assert rec["convention"] == "mib" and "MIB convention" in rec["convention_label"]
    assert rec["n_edges"] == 110 and rec["n_nodes"] == 12 and rec["n_examples"] == 4
    assert rec["edge_auc"] > 0.8 and 0 <= rec["node_auc"] <= 1
    assert rec["versions"]["torch"] == torch.__version__ and "transformer-lens" in rec["versions"]
    assert rec["hyperparameters"] == {"masks_per_pass": None, "batch_size": None,
                                      "progress": False}
    assert rec["wall_time_s"] >= rec["score_time_s"] > 0 and rec["peak_memory_bytes"] > 2**20
    assert len(rec["curve"]["faithfulness"]) == 10
    # the record is the library's own curve on the same data
    model = cf.load_model("zoo:ioi-small")
    data = cf.build_data(model, "ioi", 4, seed=1)
    curve = cf.faithfulness_curve(model, cf.score_edges(model, data=data, algorithm="exact"),
                                  data)
    assert rec["cpr"] == pytest.approx(curve.cpr, abs=1e-6)
    assert rec["cmd"] == pytest.approx(curve.cmd, abs=1e-6)
    # the per-example metrics behind the intervals average to the curve's points; the cost is
    # in forwards of the cell's batch
    per_example = np.asarray(rec["curve"]["example_metrics"])
    assert per_example.shape == (22, 4)
    assert per_example.mean(1)[:10] == pytest.approx(rec["curve"]["metric"], abs=1e-9)
    assert per_example.mean(1)[-2:] == pytest.approx(
        [rec["curve"]["metric_full"], rec["curve"]["metric_empty"]], abs=1e-9)
    assert rec["forward_s"] > 0 and rec["score_forwards"] > 1  # exact: 110 masked passes
    row = next(r for r in aggregate(list(records.values()))
               if r["task"] == "ioi" and r["algorithm"] == "exact")
    assert row["ci_source"] == "seeds and examples"
    assert row["cpr_ci"][0] <= row["cpr_mean"] <= row["cpr_ci"][1]
    assert records[("zoo:induction-2l", "induction", "eap", 0)]["edge_auc"] is not None
    # a second run finds every cell done
    again = cf.bench(config, storage=url, progress=False)
    assert again.executed == 0 and again.completed == 6 and again.ok
    assert all(len(ts) == 1 for ts in trials_by_cell(url, "grid").values())


def test_dead_workers_cell_is_retried(small, tmp_path):
    url = storage_url(tmp_path)
    created = cf.bench(small, storage=url, create_only=True, progress=False)
    assert created.pending == 4 and created.executed == 0
    storage = open_storage(url, heartbeat_interval=1)
    study_id = storage.get_study_id_from_name("grid")
    waiting = storage.get_all_trials(study_id, states=(TrialState.WAITING,))
    held = waiting[2]
    # a worker claims a cell, beats once, then dies
    assert storage.set_trial_state_values(held._trial_id, TrialState.RUNNING)
    storage.record_heartbeat(held._trial_id)
    result = cf.bench(small, storage=url, progress=False, heartbeat_interval=1, grace_period=1)
    assert result.completed == 4 and result.executed == 4 and result.ok
    trials = trials_by_cell(url, "grid")[held.user_attrs["cell"]]
    assert sorted(t.state for t in trials) == sorted([TrialState.FAIL, TrialState.COMPLETE])
    assert all(len(ts) == 1 for k, ts in trials_by_cell(url, "grid").items()
               if k != held.user_attrs["cell"])


def test_rerun_replaces_old_results_once(small, tmp_path, run):
    url = storage_url(tmp_path)
    first = cf.bench(small, storage=url, progress=False)
    assert first.executed == 4 and first.ok
    fixed_at = datetime.datetime.now().isoformat()  # "the fix": results before it are stale
    key1 = "model=zoo:induction-2l task=induction algorithm=eap seed=1 examples=4 " \
           "ablation=resample"
    out = run("bench", str(small), "--storage", url, "--no-progress",
              "--rerun", "*seed=1 *", "--rerun", "*seed=3 *", "--rerun-before", fixed_at)
    assert out.returncode == 0, out.stderr
    assert "4 of 4 cells done (2 by this worker)" in out.stdout
    trials = trials_by_cell(url, "grid")
    old, new = trials[key1]
    assert old.state == new.state == TrialState.COMPLETE
    assert new.user_attrs["rerun_of"] == old.number
    # the leaderboard reads each cell's latest run; the replaced trial stays in the study
    records = {r["seed"]: r for r in iter_records(optuna.load_study(study_name="grid",
                                                                    storage=url))}
    assert len(records) == 4 and records[1]["trial"] == new.number
    assert records[1]["rerun_of"] == old.number and records[0]["rerun_of"] is None
    assert records[1]["cpr"] == pytest.approx(old.user_attrs["record"]["cpr"], abs=1e-6)
    # the same request again (a restarted or second worker) finds the reruns newer: no work
    again = cf.bench(small, storage=url, progress=False, rerun=["*seed=1 *"],
                     rerun_before=fixed_at)
    assert again.executed == 0 and again.completed == 4
    assert len(trials_by_cell(url, "grid")[key1]) == 2
    for kwargs, message in (({"rerun": ["*seed=7 *"], "rerun_before": fixed_at}, "match no cell"),
                            ({"rerun": ["*"]}, "--rerun-before"),
                            ({"rerun": ["*"], "rerun_before": "2999-01-01"}, "in the future"),
                            ({"rerun": ["*"], "rerun_before": "yesterday"}, "ISO 8601")):
        with pytest.raises(ConfigError, match=message):
            cf.bench(small, storage=url, progress=False, **kwargs)


def test_worker_taken_for_dead_keeps_its_result(small, tmp_path, monkeypatch):
    """A live worker starved of CPU misses its heartbeats; another fails its trial and queues
    the cell again. Its finished result is kept, and the queued copy is not run."""
    url = storage_url(tmp_path)
    real = grid.run_cell

    def starved(cell, cfg, model, **kwargs):
        record = real(cell, cfg, model, **kwargs)
        if cell.seed == 1:  # what another worker's fail_stale_trials and _schedule do
            kwargs["storage"].set_trial_state_values(kwargs["trial_id"], TrialState.FAIL)
            optuna.load_study(study_name="grid", storage=url).enqueue_trial(
                {}, user_attrs={"cell": cell.key, "spec": cell.to_dict()})
        return record

    monkeypatch.setattr(grid, "run_cell", starved)
    with pytest.warns(RuntimeWarning, match="taken for dead"):
        result = cf.bench(small, storage=url, progress=False)
    assert result.ok and result.completed == 4 and result.executed == 4
    (trials,) = [ts for k, ts in trials_by_cell(url, "grid").items() if "seed=1 " in k]
    failed, queued, kept = trials
    assert (failed.state, queued.state, kept.state) == (
        TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE)
    assert kept.user_attrs["taken_over_from"] == failed.number and queued.user_attrs["duplicate"]
    records = list(iter_records(optuna.load_study(study_name="grid", storage=url)))
    assert len(records) == 4 and kept.number in {r["trial"] for r in records}


def test_cell_claimed_by_a_worker_killed_before_its_first_heartbeat_is_run(small, tmp_path):
    url = storage_url(tmp_path)
    cf.bench(small, storage=url, create_only=True, progress=False)
    storage = open_storage(url, heartbeat_interval=1)
    waiting = storage.get_all_trials(storage.get_study_id_from_name("grid"),
                                     states=(TrialState.WAITING,))
    # claimed (RUNNING), then killed before any heartbeat: Optuna never fails such a trial
    assert storage.set_trial_state_values(waiting[1]._trial_id, TrialState.RUNNING)
    time.sleep(1.5)
    result = cf.bench(small, storage=url, progress=False, grace_period=1)
    assert result.completed == 4 and result.executed == 4 and result.ok
    trials = trials_by_cell(url, "grid")[waiting[1].user_attrs["cell"]]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]


def test_two_worker_processes_share_one_sqlite_file(small, tmp_path, cli_workers):
    """Two live workers split the grid, each cell run once. The automatic grace period (5-16 s
    here) takes a cell from a worker silent that long, which a live worker on a loaded machine
    can be (it flaked at load 10-14 on 2 cores: the cell was run again by the other worker and
    kept twice); no worker dies here, so a grace no live worker misses. Taking a dead worker's
    cell over is the SIGKILL tests' subject."""
    url = storage_url(tmp_path)
    cf.bench(small, storage=url, create_only=True, progress=False)  # before the workers
    outputs = cli_workers(*[["bench", str(small), "--storage", url, "--no-progress",
                             "--threads", "1", "--grace-period", "600"]] * 2)
    for out in outputs:
        assert out.returncode == 0, out.stderr
        assert "4 of 4 cells done" in out.stdout, out.stdout + out.stderr
    by_cell = trials_by_cell(url, "grid")
    assert len(by_cell) == 4
    for trials in by_cell.values():  # each cell ran once, by one of the workers
        assert [t.state for t in trials] == [TrialState.COMPLETE], (
            [(t.state, t.user_attrs.get("worker")) for t in trials], [o.stderr for o in outputs])
    assert sum(int(out.stdout.split("(")[1].split(" by")[0]) for out in outputs) == 4


def test_crashing_cell_is_recorded_and_fails_the_run(tmp_path, run):
    broken = tmp_path / "broken"
    shutil.copytree(zoo_model_dir("induction-2l"), broken)
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    config = tmp_path / "crash.toml"
    config.write_text(f'models = ["zoo:induction-2l", "{broken}"]\ntasks = ["induction"]\n'
                      'algorithms = ["eap"]\nexamples = 4\n')
    url = storage_url(tmp_path)
    out = run("bench", str(config), "--storage", url, "--no-progress")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "1 of 2 cells done" in out.stdout and "1 failed" in out.stdout
    assert f"failed: model={broken} task=induction" in out.stderr
    trials = trials_by_cell(url, "crash")
    (failed,) = [t for k, ts in trials.items() for t in ts if str(broken) in k]
    assert failed.state == TrialState.FAIL and "ModelLoadError" in failed.user_attrs["error"]
    assert "Traceback" in failed.user_attrs["traceback"]
    # not rerun by default; rerun with --retry-failed once the model is repaired
    assert run("bench", str(config), "--storage", url, "--no-progress").returncode == 1
    (broken / "model.safetensors").write_bytes(weights)
    fixed = run("bench", str(config), "--storage", url, "--no-progress", "--retry-failed")
    assert fixed.returncode == 0, fixed.stderr
    assert "2 of 2 cells done (1 by this worker)" in fixed.stdout


def fake_record(model, task, label, seed, cpr, cmd, auc, time_s, curve):
    """A completed cell as bench records it (the leaderboard reads nothing else)."""
    spec = {"model": model, "task": task, "algorithm": label.split("(")[0], "params": {},
            "seed": seed, "examples": 4, "ablation": "resample", "label": label,
            "key": f"{model} {task} {label} {seed}"}
    fractions = [0.01, 0.1, 1.0]
    record = {"cpr": cpr, "cmd": cmd, "edge_auc": auc, "node_auc": auc, "wall_time_s": time_s,
              "score_time_s": time_s / 2, "peak_memory_bytes": 2**20 * (100 + seed),
              "n_edges": 110, "n_nodes": 12, "n_examples": 4, "ablation": "resample",
              "circuit": None, "convention": "mib", "convention_label": "MIB convention",
              "metric": "logit difference", "metric_unit": "logits",
              "curve": {"fractions": fractions, "faithfulness": curve,
                        "faithfulness_cmd": [c / 2 for c in curve]}}
    return {"cell": spec["key"], "spec": spec, "record": record}


def test_leaderboard_aggregates_over_seeds(tmp_path, run):
    url = storage_url(tmp_path)
    study = optuna.create_study(storage=url, study_name="known", direction="maximize")
    study.set_user_attr(STUDY_MARKER, {"convention": "mib", "fractions": [0.01, 0.1, 1.0]})
    rows = [("zoo:ioi-small", "ioi", "eap", 0, 0.5, 0.4, 0.9, 1.0, [0.1, 0.5, 1.0]),
            ("zoo:ioi-small", "ioi", "eap", 1, 0.7, 0.2, 0.8, 3.0, [0.3, 0.7, 1.0]),
            ("zoo:ioi-small", "ioi", "exact", 0, 0.9, 0.1, 1.0, 5.0, [0.2, 0.9, 1.0]),
            ("zoo:ioi-small", "ioi", "exact", 1, 0.8, 0.3, None, 7.0, [0.4, 0.8, 1.0]),
            ("zoo:induction-2l", "induction", "eap", 0, math.nan, 0.5, None, 2.0,
             [0.0, 0.2, 1.0])]
    for row in rows:
        study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=0.0,
                                                  user_attrs=fake_record(*row)))
    study.add_trial(optuna.trial.create_trial(  # a failed cell is not on the board
        state=TrialState.FAIL, user_attrs={**fake_record(*rows[0]), "error": "boom"}))
    out = run("leaderboard", "--storage", url, "--out", str(tmp_path / "lb"), "--sort", "cmd")
    assert out.returncode == 0, out.stderr
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json", "faithfulness_cpr.png",
                 "faithfulness_cpr.pdf", "faithfulness_cmd.png", "faithfulness_cmd.pdf"):
        assert (tmp_path / "lb" / name).stat().st_size > 0, name
    board = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    got = {(r["task"], r["algorithm"]): r for r in board["rows"]}
    assert board["convention"] == "mib" and board["sort"] == "cmd"
    eap, exact = got[("ioi", "eap")], got[("ioi", "exact")]
    assert eap["cpr_mean"] == pytest.approx(0.6) and eap["cpr_std"] == pytest.approx(
        np.std([0.5, 0.7], ddof=1))
    assert exact["edge_auc_mean"] == 1.0 and exact["edge_auc_std"] is None  # one seed has AUC
    assert eap["faithfulness_mean"] == pytest.approx([0.2, 0.6, 1.0])
    assert exact["wall_time_s_mean"] == 6.0 and eap["n_seeds"] == 2 and eap["seeds"] == [0, 1]
    assert got[("induction", "eap")]["cpr_mean"] is None
    # sorted by CMD (ascending) within a task/model: exact (0.2) before eap (0.3)
    ioi_rows = [r["algorithm"] for r in board["rows"] if r["task"] == "ioi"]
    assert ioi_rows == ["exact", "eap"]
    assert [r["algorithm"] for r in aggregate(list(iter_records(study)), "time")
            if r["task"] == "ioi"] == ["eap", "exact"]
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    # cells without per-example metrics: intervals over seeds only ({0.5, 0.7} → [0.5, 0.7]);
    # by CMD, exact [0.1, 0.3] and eap [0.2, 0.4] overlap: tied first
    assert eap["ci_source"] == "seeds" and eap["cpr_ci"] == pytest.approx([0.5, 0.7])
    assert "MIB convention" in md and "| 1= | eap | 0.600 [0.500, 0.700] | 0.300 [0.200, 0.400] |" in md
    assert "## induction on zoo:induction-2l" in md and "| — | eap | — |" in md
    assert "| eap | — | 1= | 1.00 |" in md  # rank table: unranked on induction, tied first on ioi
    csv_lines = (tmp_path / "lb" / "leaderboard.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("task,model,n_examples")
    with pytest.raises(ConfigError, match="No study 'nope'"):
        cf.leaderboard(url, tmp_path / "x", studies=["nope"])
    with pytest.raises(ConfigError, match="Unknown sort key"):
        cf.leaderboard(url, tmp_path / "x", sort="speed")


def test_leaderboard_says_what_each_algorithms_scores_are():
    """ACDC's KL effects are importances, EAP's metric changes: the table says so per algorithm,
    from the record's declaration or, for records written before it, from the algorithm."""
    curve = [0.1, 0.5, 1.0]
    records = [fake_record("zoo:ioi-small", "ioi", label, 0, 0.5, 0.4, None, 1.0, curve)
               for label in ("eap", "acdc", "acdc(metric)")]
    records = [{**r["spec"], **r["record"]} for r in records]
    records[2]["params"] = {"objective": "metric"}
    declared = {**records[1], "label": "acdc(new)",
                "scores": {"kind": "importance", "unit": "nats", "higher_is_better": True,
                           "what": "the KL divergence to the full model"}}
    rows = {r["algorithm"]: r for r in aggregate([*records, declared])}
    assert [rows[k]["score_kind"] for k in ("eap", "acdc", "acdc(metric)", "acdc(new)")] == [
        "metric_change", "importance", "metric_change", "importance"]
    assert rows["acdc"]["scores"] == rows["acdc(new)"]["scores"]
    md = markdown(list(rows.values()))
    line = next(x for x in md.splitlines() if x.startswith("Scores"))
    assert ("**acdc**, **acdc(new)**: increase of the KL divergence to the full model (nats) "
            "when the edge is removed" in line)
    assert "**acdc(metric)**, **eap**: estimated change of the metric (logits)" in line
    assert "CPR (or a curve point) above 1" in md
    header, *lines = to_csv(list(rows.values())).splitlines()
    assert header.endswith(",score_kind,score_unit")
    assert {line.split(",")[4]: line.split(",")[-2:] for line in lines} == {
        "eap": ["metric_change", "logits"], "acdc": ["importance", "nats"],
        "acdc(metric)": ["metric_change", "logits"], "acdc(new)": ["importance", "nats"]}


def test_automatic_grace_follows_cell_durations_and_heartbeats():
    from circuitfind.benchmark.grid import auto_grace

    assert auto_grace([], [1]) == 10  # nothing measured yet
    assert auto_grace([0.4, 0.6, 0.5], [1]) == 5  # small cells: seconds
    assert auto_grace([12.0, 20.0, 16.0], [1]) == 32
    assert auto_grace([600.0], [1]) == 60  # long cells: at most a minute
    assert auto_grace([0.5], [1, 10]) == 50  # never under five beats of a running worker


def test_claimed_cells_record_their_heartbeat_and_unrecorded_ones_count_as_ten_s(small,
                                                                                 tmp_path):
    from circuitfind.benchmark.grid import UNRECORDED_HEARTBEAT_S, _claim, _grid_grace

    url = storage_url(tmp_path)
    cf.bench(small, storage=url, create_only=True, progress=False)
    storage = open_storage(url, heartbeat_interval=2)
    study = optuna.load_study(study_name="grid", storage=storage)
    keys = {c.key: c for c in plan_grid(load_config(small)).cells}
    claimed = _claim(storage, study._study_id, keys)
    assert claimed.state == TrialState.RUNNING and claimed.user_attrs["heartbeat_s"] == 2
    assert _grid_grace(study, 1) == 10  # five of its 2 s beats; nothing measured yet: 10 s
    # a cell claimed by a worker that recorded no interval (an earlier version's)
    other = storage.get_all_trials(study._study_id, states=(TrialState.WAITING,))[0]
    assert storage.set_trial_state_values(other._trial_id, TrialState.RUNNING)
    assert _grid_grace(study, 1) == 5 * UNRECORDED_HEARTBEAT_S


def test_dead_workers_cell_is_taken_over_within_seconds_by_default(small, tmp_path):
    """No heartbeat or grace settings: a cell whose worker died is queued again once its
    heartbeat is older than the automatic grace period, and every cell is done once."""
    url = storage_url(tmp_path)
    cf.bench(small, storage=url, create_only=True, progress=False)
    storage = open_storage(url, heartbeat_interval=1)
    study_id = storage.get_study_id_from_name("grid")
    held = storage.get_all_trials(study_id, states=(TrialState.WAITING,))[1]
    assert storage.set_trial_state_values(held._trial_id, TrialState.RUNNING)
    storage.set_trial_user_attr(held._trial_id, "heartbeat_s", 1)
    storage.record_heartbeat(held._trial_id)
    started = time.monotonic()
    result = cf.bench(small, storage=url, progress=False)
    assert result.completed == 4 and result.ok
    trials = trials_by_cell(url, "grid")[held.user_attrs["cell"]]
    assert sorted(t.state for t in trials) == sorted([TrialState.FAIL, TrialState.COMPLETE])
    assert all(len(ts) == 1 for k, ts in trials_by_cell(url, "grid").items()
               if k != held.user_attrs["cell"])
    # reported, not asserted as a timing: the default waited seconds, not the old minute
    print(f"grid with a dead worker's cell finished in {time.monotonic() - started:.1f} s")


def test_killed_worker_process_is_taken_over_within_seconds(small, tmp_path):
    """Two real worker processes, one killed with SIGKILL while it holds a cell: the other
    takes the cell over once the automatic grace period (seconds for these small cells; it
    was a fixed minute) has passed since the dead worker's last heartbeat, and every cell is
    completed exactly once."""
    import datetime
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    url = storage_url(tmp_path)
    cf.bench(small, storage=url, create_only=True, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "circuitfind", "bench", str(small), "--storage", url,
               "--no-progress", "--threads", "1"]
    root = Path(__file__).resolve().parents[2]
    doomed = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        storage = open_storage(url)
        study_id = storage.get_study_id_from_name("grid")
        deadline = time.monotonic() + 120
        held = None
        while held is None and time.monotonic() < deadline and doomed.poll() is None:
            held = next((t for t in storage.get_all_trials(study_id, deepcopy=False,
                                                           states=(TrialState.RUNNING,))
                         if str(t.user_attrs.get("worker", "")).endswith(f":{doomed.pid}")),
                        None)
            time.sleep(0.02)
        assert held is not None, "the first worker never ran a cell"
        os.kill(doomed.pid, signal.SIGKILL)  # it holds a cell (loading the model, or running)
        killed_at = datetime.datetime.now()
    finally:
        if doomed.poll() is None:
            os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait()
    survivor = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True,
                              timeout=600)
    assert survivor.returncode == 0, survivor.stderr
    assert "4 of 4 cells done" in survivor.stdout
    by_cell = trials_by_cell(url, "grid")
    assert len(by_cell) == 4
    for key, trials in by_cell.items():  # one completed run per cell; the dead one failed
        assert [t.state for t in trials].count(TrialState.COMPLETE) == 1, key
    dead = [t for t in by_cell[held.user_attrs["cell"]] if t.number == held.number][0]
    assert dead.state == TrialState.FAIL and "error" not in dead.user_attrs
    waited = (dead.datetime_complete - killed_at).total_seconds()
    # the grace period is 10 s before any cell completed and 5 s after: never the old 60 s
    assert waited < 45, waited
    print(f"killed worker's cell taken over {waited:.1f} s after the kill")


def test_methods_b_config_runs_every_new_method(tmp_path):
    """The shipped config of EAP-GP, IFR and edge pruning loads, and one cell of each runs
    (edge pruning with a few steps instead of the config's 3000)."""
    import tomllib

    raw = tomllib.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
                         / "methods_b.toml").read_text())
    # the zoo grids (stories260k sits in ../shared, which this check does not need)
    raw["grid"] = [g for g in raw["grid"] if all(m.startswith("zoo:") for m in g["models"])]
    shipped = load_config(raw)
    assert {"eap_gp", "ifr", "edge_pruning"} <= {c.algorithm for c in shipped.cells}
    path = tmp_path / "grid.toml"
    path.write_text('models = ["zoo:induction-2l"]\ntasks = ["induction"]\nexamples = 4\n'
                    'seeds = [0]\n[algorithms.eap_gp]\n[algorithms.ifr]\n'
                    '[algorithms.edge_pruning]\nsteps = 3\nwarmup_steps = 2\n')
    url = storage_url(tmp_path)
    result = cf.bench(path, storage=url, progress=False)
    assert result.ok and result.completed == 3
    records = {r["algorithm"]: r for r in iter_records(optuna.load_study(study_name="grid",
                                                                         storage=url))}
    assert set(records) == {"eap_gp", "ifr", "edge_pruning"}
    assert all(0 <= r["edge_auc"] <= 1 for r in records.values())
