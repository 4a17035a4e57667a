"""Threshold search as an Optuna study: in-process, and two worker processes sharing SQLite."""

from __future__ import annotations

import pytest

import circuitfind as cf
from circuitfind.benchmark import create_study
from circuitfind.errors import ConfigError
from circuitfind.testing import make_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tune") / "model", arch="gpt2")


def test_tune_finds_the_smallest_circuit_reaching_the_target(tiny_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    model = cf.load_model(tiny_dir, device="cpu")
    result = cf.tune(model, "induction", target=0.5, n_trials=4, low=1e-4, high=0.1,
                     storage=storage, study_name="s", n_examples=6)
    study = create_study(storage, "s")
    trials = study.get_trials()
    assert result.n_trials == len(trials) == 4
    for t in trials:
        assert {"n_edges", "faithfulness", "threshold"} <= set(t.user_attrs)
        assert 1e-4 <= t.user_attrs["threshold"] <= 0.1
    feasible = [t.user_attrs for t in trials if t.user_attrs["faithfulness"] >= 0.5]
    if feasible:
        assert result.n_edges == min(a["n_edges"] for a in feasible)
        assert result.faithfulness >= 0.5
    else:
        assert result.threshold is None


def test_the_default_range_comes_from_the_data_and_trials_land_in_it(tmp_path, caplog):
    """No range given: τ spans the single-edge effects, so the trials give circuits between
    empty and full (the old fixed range put 8 of 8 outside on stories260k), and each trial is
    reported as τ → edges, faithfulness."""
    import logging

    from circuitfind.benchmark.tune import tau_range

    model = cf.load_model("zoo:ioi-small", device="cpu")
    data = cf.build_data(model, "ioi", n=12)
    low, high, measured = tau_range(cf.PatchingEngine(model), data)
    assert 0 < low < high and measured == 110
    with caplog.at_level(logging.INFO, logger="circuitfind.progress"):
        result = cf.tune(model, data=data, n_trials=6, storage=f"sqlite:///{tmp_path / 'd.db'}",
                         study_name="d")
    trials = create_study(f"sqlite:///{tmp_path / 'd.db'}", "d").get_trials()
    sizes = [t.user_attrs["n_edges"] for t in trials]
    assert sum(0 < n < 110 for n in sizes) >= 5, sizes
    assert all(low <= t.user_attrs["threshold"] <= high for t in trials)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trial ")]
    assert len(lines) == 6 and all("τ" in line and "of 110 edges, faithfulness" in line
                                   for line in lines)
    assert result.n_trials == 6
    if result.trial is not None:  # the explanation names the best trial as it was printed
        best = [line for line in lines if line.startswith(f"trial {result.trial}:")][0]
        assert result.explanation.startswith(f"best: {best.split(' (reaches')[0]} — the "
                                             "smallest circuit reaching")
    else:
        assert result.explanation.startswith("no trial reached")


def test_the_result_says_which_trial_is_best_and_why(tmp_path):
    """The smallest circuit reaching the target wins (ties: the largest τ); when none reaches
    it, the most faithful trial is named with where to search next."""
    import optuna

    from circuitfind.benchmark.tune import summarize

    study = create_study(f"sqlite:///{tmp_path / 's.db'}", "s")
    for tau, edges, faith in ((0.1, 10, 0.5), (0.01, 40, 0.92), (0.02, 40, 0.95),
                              (0.001, 90, 0.99), (0.5, 2, float("nan"))):
        study.add_trial(optuna.trial.create_trial(
            params={"threshold": tau}, value=float(edges),
            distributions={"threshold": optuna.distributions.FloatDistribution(1e-4, 1.0,
                                                                               log=True)},
            user_attrs={"threshold": tau, "n_edges": edges, "faithfulness": faith,
                        "total_edges": 110}))
    best = summarize(study, "url", 0.9)
    assert (best.trial, best.threshold, best.n_edges) == (2, 0.02, 40)
    assert best.explanation == (
        "best: trial 2: τ 0.02 → 40 of 110 edges, faithfulness 0.950 — the smallest circuit "
        "reaching normalized faithfulness 0.9 (3 of 5 trials reached it; of equal sizes, the "
        "largest τ)")
    none = summarize(study, "url", 0.995)
    assert none.trial is None and none.threshold is None
    assert none.explanation == (
        "no trial reached normalized faithfulness 0.995; the most faithful: trial 3: τ 0.001 "
        "→ 90 of 110 edges, faithfulness 0.990. Smaller τ keep more edges: search below "
        "τ 0.001, or lower the target")


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 0}, "target"), ({"low": 0.1, "high": 0.01}, "0 < low < high"),
    ({"low": 0.1}, "both ends"),
    ({"algorithm": "eap"}, "pruning algorithm"),
    ({"algorithm_params": {"threshold": 0.1}}, "searches the threshold")])
def test_tune_bad_input(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cf.tune("unused", "induction", n_trials=1, storage=f"sqlite:///{tmp_path / 'x.db'}",
                **kwargs)


def test_two_workers_share_one_sqlite_study(tiny_dir, tmp_path, cli_workers):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    create_study(storage, "shared")  # before the workers: creation on fresh SQLite races
    outputs = cli_workers(*[
        ["tune", "--model", str(tiny_dir), "--task", "induction", "--trials", "2", "--examples",
         "6", "--storage", storage, "--study", "shared", "--target", "0.5", "--low", "1e-4",
         "--high", "0.1",
         "--sampler-seed", str(i)] for i in range(2)])
    for out in outputs:
        assert out.returncode == 0, out.stderr
        assert "trials in study 'shared'" in out.stdout
    trials = create_study(storage, "shared").get_trials()
    assert len(trials) == 4
    assert all("faithfulness" in t.user_attrs for t in trials)


def test_no_progress_keeps_only_the_result(run, tmp_path):
    args = ["tune", "--task", "ioi", "--trials", "2", "--examples", "6", "--storage",
            f"sqlite:///{tmp_path / 'q.db'}", "--study", "q"]
    loud = run(*args)
    assert loud.returncode == 0, loud.stderr
    assert "trial 0: τ" in loud.stderr and "τ range" in loud.stderr
    quiet = run(*args[:-1], "q2", "--no-progress")
    assert quiet.returncode == 0, quiet.stderr
    assert "trial " not in quiet.stderr and "τ range" not in quiet.stderr
    assert "trials in study 'q2'" in quiet.stdout
