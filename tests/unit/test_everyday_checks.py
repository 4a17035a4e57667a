"""Researchers' everyday checks without a model: what counts as a correct answer (accuracy of
``circuitfind check``), each circuit's importance order in ``compare``, ``Circuit.edge_values``."""

from __future__ import annotations

import pytest
import torch

import circuitfind as cf
from circuitfind.evaluation.compare import importance_keys
from circuitfind.graphs import ComputeGraph
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.selection import select_top_n
from circuitfind.tasks.base import Task, TaskData
from circuitfind.tasks.greater_than import GreaterThan
from circuitfind.tasks.induction import Induction

V = 8


class _Rows(Task):
    """A task only to hold hand-written answers (no metric is read)."""

    name = "rows"

    def build(self, tokenizer, n, seed=0):  # pragma: no cover - never built
        raise NotImplementedError

    def metric(self, logits, data):  # pragma: no cover - never read
        raise NotImplementedError


def _data(task: Task, answers: list[list[int]], wrong: list[list[int]], p: int = 1,
          info: dict | None = None) -> TaskData:
    n = len(answers)
    tokens = torch.ones(n, p + 1, dtype=torch.long)
    return TaskData(task=task, clean=tokens, corrupted=tokens,
                    positions=torch.arange(p).expand(n, p).clone(),
                    answers=torch.tensor(answers), wrong_answers=torch.tensor(wrong).reshape(n, -1),
                    attention_mask=torch.ones_like(tokens), clean_prompts=[""] * n,
                    corrupted_prompts=[""] * n, seed=0, info=info or {})


def test_default_correct_ignores_padding_and_falls_back_to_top1():
    """Token 0 has the largest logit everywhere: read as padding (-1 -> 0), it would decide
    every example."""
    logits = torch.tensor([[9.0, 1, 2, 3, 0, 0, 0, 0]]).repeat(4, 1)[:, None, :]  # [4, 1, V]
    data = _data(_Rows(), answers=[[3, -1], [1, 2], [3, -1], [1, -1]],
                 wrong=[[2, -1], [3, -1], [-1, -1], [-1, -1]])
    got = data.task.correct(logits, data)
    # 3 beats 2; best of {1, 2} loses to 3; no wrong answer: 3 is not top-1 (token 0 is);
    assert got[:, 0].tolist() == [True, False, False, False]
    logits[2:, 0, 0] = -9.0  # token 0 no longer top: 3 is top-1 of row 2, 1 is not of row 3
    assert data.task.correct(logits, data)[:, 0].tolist() == [True, False, True, False]


def test_default_correct_reads_one_answer_column_per_position():
    logits = torch.zeros(1, 2, V)
    logits[0, 0, 4], logits[0, 1, 6] = 1.0, 1.0
    data = _data(_Rows(), answers=[[4, 5]], wrong=[[5, 6]], p=2)
    assert data.task.correct(logits, data).tolist() == [[True, False]]


def test_greater_than_counts_a_later_year_as_correct():
    """The answer column holds the start year YY itself, which is *not* a correct completion."""
    years = list(range(100, 200))  # token id of year y is 100 + y
    logits = torch.zeros(2, 1, 200)
    logits[0, 0, 100 + 50] = 5.0  # most likely year 50 = YY: not later
    logits[1, 0, 100 + 51] = 5.0  # 51 > 50
    data = _data(GreaterThan(), answers=[[150], [150]], wrong=[[101], [101]],
                 info={"year_token_ids": years})
    assert data.task.correct(logits, data)[:, 0].tolist() == [False, True]


def test_induction_accuracy_is_top1():
    logits = torch.zeros(2, 2, V)
    logits[:, :, 7] = 1.0  # token 7 most likely everywhere
    logits[0, 0, 3] = 2.0
    data = _data(Induction(), answers=[[3, 3], [7, 3]], wrong=[[1, 1], [1, 1]], p=2)
    assert data.task.correct(logits, data).tolist() == [[True, False], [True, False]]


def test_edge_values_are_the_real_edges_scores_in_edge_name_order():
    g = ComputeGraph(2, 3)
    scores = torch.randn(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(1))
    circuit = select_top_n(g, scores * g.edge_mask, 7)
    values = circuit.edge_values
    assert values.shape == (g.n_edges,) and g.n_edges < g.n_senders * g.n_receivers
    for i, name in enumerate(g.edge_names):
        s, r = g.edge_index(name)
        assert values[i] == scores[s, r]
    assert circuit.edge_scores() == {n: float(values[g.edge_names.index(n)])
                                     for n in circuit.edge_scores()}
    assert Circuit(g, circuit.kept, None).edge_values is None


def test_importance_keys_follow_each_circuits_own_order():
    g = ComputeGraph(2, 3)
    scores = torch.randn(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(2))
    scores = scores * g.edge_mask
    values = g.to_edges(scores)
    # discover's default: top-n by |score|
    assert torch.equal(importance_keys(select_top_n(g, scores, 5)), values.abs())
    # signed selection of a higher-is-better metric change: most negative first
    signed = select_top_n(g, scores, 5, absolute=False)
    assert torch.equal(importance_keys(signed), -values)
    lower = select_top_n(g, scores, 5, absolute=False,
                         metadata={"scores": {"kind": "metric_change", "higher_is_better": False}})
    assert torch.equal(importance_keys(lower), values)
    # importances (ACDC's KL effects) as they are, whatever the selection
    acdc = Circuit(g, signed.kept, scores, {"algorithm": "acdc"})
    assert torch.equal(importance_keys(acdc), values)
    assert importance_keys(Circuit(g, signed.kept, None)) is None
    # the top-k of a signed circuit is its kept set, in its own order
    result = cf.compare(signed, signed, ks=(5,))
    assert result.top_k == {5: 1.0} and result.spearman == pytest.approx(1.0)
    assert set(torch.topk(importance_keys(signed), 5).indices.tolist()) == set(
        signed.edge_ids.tolist())


def test_parameter_sums_in_chunks_equal_the_whole_tensor_sum(monkeypatch):
    """Resume fingerprints sum each parameter in float64 a chunk at a time (no whole-tensor
    float64 copy of a large embedding); the sum is the whole tensor's."""
    from circuitfind.algorithms import lifecycle

    monkeypatch.setattr(lifecycle, "_SUM_CHUNK", 7)  # many chunks, a ragged last one
    g = torch.Generator().manual_seed(0)
    for p in (torch.randn(13, 11, generator=g).to(torch.bfloat16),
              torch.randn(5, 9, generator=g).t(),  # not contiguous
              torch.randn(3, generator=g, dtype=torch.float64)):
        assert abs(lifecycle._float64_sum(p) - float(p.double().sum())) < 1e-12
