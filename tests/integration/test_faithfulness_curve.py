"""The MIB-exact faithfulness curve, checked point by point against single evaluations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid

import circuitfind as cf
from circuitfind.errors import ConfigError
from circuitfind.graphs.selection import prune_dangling, select_top_n
from circuitfind.testing import ToyTask

FRACTIONS = (0.01, 0.05, 0.2, 0.5, 1.0)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_mib_curve_matches_pruned_signed_and_absolute_top_k(tiny_models, name):
    torch.set_num_threads(1)
    model = tiny_models(name)
    data = ToyTask().build(model.tokenizer, 4, seed=3)
    engine = cf.PatchingEngine(model)
    g = engine.graph
    scores = cf.score_edges(model, data=data, algorithm="eap")
    curve = cf.faithfulness_curve(engine, scores, data, fractions=FRACTIONS)
    assert curve.convention == "mib" and curve.pruned and curve.absolute is None
    assert "signed" in curve.label and "|score|" in curve.label
    assert curve.to_dict()["label"] == curve.label
    # MIB's sizes: int(p * E), floor, no minimum of one edge
    assert curve.n_edges == [int(p * g.n_edges) for p in FRACTIONS]
    # the two rankings pick different circuits somewhere (else this test could not tell them apart)
    assert any(not torch.equal(select_top_n(g, scores, k, absolute=False).kept,
                               select_top_n(g, scores, k, absolute=True).kept)
               for k in curve.n_edges)
    # ToyTask's metric: higher is better, so MIB's signed ranking is by -score (most negative
    # circuitfind score = corrupting the edge lowers the metric most): select_top_n's signed
    # ranking of metric changes, most important first
    assert data.task.higher_is_better
    for i, k in enumerate(curve.n_edges):
        for ranked, absolute, faith, kept in (
                (scores, False, curve.faithfulness, curve.n_kept),
                (scores, True, curve.faithfulness_cmd, curve.n_kept_cmd)):
            circuit = prune_dangling(select_top_n(g, ranked, k, absolute=absolute))
            assert kept[i] == circuit.n_edges
            assert faith[i] == pytest.approx(cf.evaluate(engine, circuit, data).faithfulness,
                                             abs=1e-6)
    assert curve.cpr == pytest.approx(trapezoid(curve.faithfulness, FRACTIONS))
    assert curve.cmd == pytest.approx(trapezoid(np.abs(1 - np.array(curve.faithfulness_cmd)),
                                                FRACTIONS))
    assert curve.faithfulness[-1] == pytest.approx(1.0)


def test_single_convention_shares_one_curve_and_bad_arguments(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=4)
    scores = cf.score_edges(model, data=data, algorithm="eap")
    single = cf.faithfulness_curve(model, scores, data, fractions=(0.001, 0.5), convention="single",
                                   absolute=False)
    assert single.convention == "single" and single.absolute is False and not single.pruned
    assert single.n_edges[0] == 1  # max(1, round(p * E))
    assert single.faithfulness_cmd == single.faithfulness and "signed" in single.label
    with pytest.raises(ConfigError, match="absolute applies to convention='single'"):
        cf.faithfulness_curve(model, scores, data, absolute=True)
    with pytest.raises(ConfigError, match="Unknown faithfulness-curve convention"):
        cf.faithfulness_curve(model, scores, data, convention="MIB")


def test_score_kind_importance_ranks_scores_that_grow_with_importance(tiny_models):
    """ACDC-style scores (larger = more important, e.g. KL effects) under
    score_kind="importance" give the curve that metric-change scores give by default."""
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=4)
    scores = cf.score_edges(model, data=data, algorithm="exact")
    default = cf.faithfulness_curve(model, scores, data)
    as_importance = cf.faithfulness_curve(model, -scores, data, score_kind="importance")
    assert as_importance.score_kind == "importance"
    assert as_importance.faithfulness == pytest.approx(default.faithfulness)
    assert as_importance.cpr == pytest.approx(default.cpr)
    assert as_importance.cmd == pytest.approx(default.cmd)
    # read the wrong way, the signed ranking puts the least important edges first
    wrong = cf.faithfulness_curve(model, -scores, data)
    assert wrong.cpr < default.cpr - 0.05
    single = cf.faithfulness_curve(model, scores, data, convention="single", absolute=False)
    assert single.faithfulness == pytest.approx(
        cf.faithfulness_curve(model, -scores, data, convention="single", absolute=False,
                              score_kind="importance").faithfulness)
    with pytest.raises(ConfigError, match="score_kind"):
        cf.faithfulness_curve(model, scores, data, score_kind="loss")
