"""The main job on a real pretrained model: stories260k (Llama, grouped-query attention).

Numbers asserted here were measured with this code (16 examples, seed 0; see
benchmarks/results/stories260k_gendered_pronoun.md for the 64-example table):
EAP/exact Spearman 0.903 (signed) and 0.953 (|score|); top-100 faithfulness 0.839 (EAP) and
0.959 (exact). The assertions keep a margin below those values.
"""

from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import spearmanr

import circuitfind as cf
from circuitfind.algorithms import EAP, ExactPatching
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.selection import prune_dangling, select_top_n
from tolerances import atol_for

pytestmark = pytest.mark.acceptance


@pytest.fixture(scope="module")
def setup(stories_dir):
    model = cf.load_model(stories_dir, device="cpu")
    data = cf.build_data(model, "gendered_pronoun", n=16, seed=0)
    engine = cf.PatchingEngine(model)
    return model, data, engine


@pytest.fixture(scope="module")
def scores(setup):
    _, data, engine = setup
    return {"eap": EAP().score(engine, data),
            "exact": ExactPatching(progress=False).score(engine, data)}


def test_graph_is_exact_for_grouped_query_attention(setup):
    model, _, engine = setup
    g = engine.graph
    assert (g.n_layers, g.n_heads, g.n_kv_heads) == (5, 8, 4)
    assert g.n_nodes == 47 and g.n_edges == 1701
    assert model.cfg.n_key_value_heads == 4


def test_full_and_empty_circuits_equal_plain_hugging_face(setup, stories_dir):
    """The engine's full / empty circuits against the metric on a plain Hugging Face model's
    clean / corrupted logits (an independent forward pass)."""
    from transformers import AutoModelForCausalLM

    _, data, engine = setup
    g = engine.graph
    plain = AutoModelForCausalLM.from_pretrained(str(stories_dir)).eval()

    def hf_metric(tokens):
        with torch.no_grad():
            logits = plain(tokens).logits
        idx = data.positions[:, :, None].expand(-1, -1, logits.shape[-1])
        return float(data.metric(logits.gather(1, idx)).mean())

    report = cf.evaluate(engine, Circuit.full(g), data)
    assert report.metric_full > 3 and report.metric_empty < -3  # the model does the task
    # a float32 model: 1e-4 is ~40 float32 ulps of its largest logit (~21); measured 2.4e-6
    assert report.metric_circuit == pytest.approx(hf_metric(data.clean), abs=1e-4)
    assert report.metric_empty == pytest.approx(hf_metric(data.corrupted), abs=1e-4)
    empty = cf.evaluate(engine, Circuit.empty(g), data)
    assert empty.metric_circuit == pytest.approx(hf_metric(data.corrupted), abs=1e-4)


def test_eap_agrees_with_exact(setup, scores):
    g = setup[2].graph
    eap, exact = g.to_edges(scores["eap"]).numpy(), g.to_edges(scores["exact"]).numpy()
    assert spearmanr(eap, exact).statistic > 0.85
    assert spearmanr(abs(eap), abs(exact)).statistic > 0.90


def test_small_circuits_are_faithful(setup, scores):
    _, data, engine = setup
    g = engine.graph
    faith = {name: cf.evaluate(engine, prune_dangling(select_top_n(g, s, 100)), data).faithfulness
             for name, s in scores.items()}
    assert faith["eap"] > 0.75
    assert faith["exact"] > 0.90


def test_mib_curve_ranks_the_edges_that_support_the_behaviour_first(setup, scores):
    """MIB's signed ranking (measured: EAP CPR 1.093, CMD 0.055; scores negated: CPR 0.246).

    circuitfind's scores are metric(without edge) - metric(full): negative for an edge the
    pronoun logit difference relies on. MIB's are attributions of a loss, positive for such an
    edge; the MIB curve must rank these first, so negating the scores must hurt CPR and leave
    CMD (a |score| ranking) unchanged.
    """
    _, data, engine = setup
    curve = cf.faithfulness_curve(engine, scores["eap"], data)
    flipped = cf.faithfulness_curve(engine, -scores["eap"], data)
    assert curve.convention == "mib"
    assert curve.cpr > 0.9 and flipped.cpr < 0.5
    assert curve.cmd < 0.1 and curve.cmd == pytest.approx(flipped.cmd)


@pytest.mark.parametrize("dot", ["absent", "present"])
def test_main_job_command_offline(stories_dir, tmp_path, monkeypatch, request, dot):
    """The README's main job, on a machine with only the pip packages and (CI) with Graphviz."""
    import sys

    from circuitfind.cli import main

    request.getfixturevalue("without_dot" if dot == "absent" else "with_dot")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["circuitfind", "discover", "--model", str(stories_dir),
                                      "--task", "gendered_pronoun", "--algorithm", "eap",
                                      "--edges", "100", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0
    for name in ("circuit.json", "circuit.graphml", "circuit.svg", "report.md"):
        assert (out / name).stat().st_size > 0
    svg = (out / "circuit.svg").read_text()  # a real drawing, by the renderer available
    assert ("Generated by graphviz" in svg) == (dot == "present")
    assert "<svg" in svg and "logits" in svg and "a4.h" in svg
    saved = Circuit.load(out / "circuit.json")
    assert saved == Circuit.load(out / "circuit.graphml")
    faith = json.loads((out / "circuit.json").read_text())["metadata"]["faithfulness"]
    assert faith["faithfulness"] > 0.75
    assert torch.equal(saved.kept, Circuit.from_graphml(out / "circuit.graphml").kept)


def test_path_patching_on_a_real_model(setup, scores):
    """Single-edge path patching equals exact on sampled edges; the recursive search finds a
    circuit that recovers most of the behaviour (measured: 0.81 with 95 edges at threshold 0.02
    on these 16 examples; asserted with a margin)."""
    _, data, engine = setup
    g = engine.graph
    sample = torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(1))[:60]
    pairs = g.edge_pairs[sample]
    got = cf.path_patch(engine, data, [[g.senders[s].name] for s in pairs[:, 0].tolist()],
                        [[g.receivers[r].name] for r in pairs[:, 1].tolist()])
    torch.testing.assert_close(got.float(), scores["exact"][pairs[:, 0], pairs[:, 1]],
                               atol=1e-4, rtol=0)
    circuit = prune_dangling(
        cf.get_algorithm("path_patching", threshold=0.02).discover(engine, data))
    assert 30 < circuit.n_edges < 300
    assert cf.evaluate(engine, circuit, data).faithfulness > 0.7


def test_ablation_kinds_on_a_real_model(setup):
    """Zero and mean ablation remove the behaviour differently from resample: the empty circuit
    reads 0 (no bias in this Llama: zero logits) and about 0 (every example sees the same
    averaged input, and the two genders cancel), not the flipped metric."""
    model, data, engine = setup
    g = engine.graph
    empty = Circuit.empty(g)
    resample = cf.evaluate(engine, empty, data)
    zero = cf.evaluate(engine, empty, data, ablation="zero")
    mean = cf.evaluate(engine, empty, data, ablation="mean")
    assert resample.metric_empty < -3 and zero.metric_empty == pytest.approx(0, abs=1e-6)
    assert abs(mean.metric_empty) < 0.5
    # the full model in passes of other sizes: equal to float32 rounding of the logits (1.8e-6
    # apart with ATEN_CPU_CAPABILITY=avx2); a logit difference carries two logits' errors
    logits = engine.run(data, g.full_mask())[0]
    assert zero.metric_full == pytest.approx(resample.metric_full, abs=2 * atol_for(model, logits))


def test_block_runner_equals_bridge_and_plain_hugging_face(setup, stories_dir):
    """The engine's own block runner on the real GQA model, right-padded rows included."""
    from transformers import AutoModelForCausalLM

    model, data, engine = setup
    assert engine.runner is not None
    tokens = data.clean[:6]
    ours = engine.runner.logits(tokens)
    with torch.no_grad():
        bridge = model(tokens)
        plain_model = AutoModelForCausalLM.from_pretrained(str(stories_dir)).eval()
        mask = (tokens != -1).long()
        mask[0, 20:] = 0  # a right-padded row: its real positions must not change
        plain = plain_model(tokens, attention_mask=mask).logits
    assert float(bridge.abs().max()) > 1
    # float32 model, other kernels on each side (folded norms, one matmul for many heads): to
    # atol_for's float32 ulps of the largest logit (measured: up to 7 of them, 1.8e-5 of 21)
    atol = atol_for(model, bridge)
    torch.testing.assert_close(ours, bridge, atol=atol, rtol=0)
    torch.testing.assert_close(ours[1:], plain[1:], atol=atol, rtol=0)
    torch.testing.assert_close(ours[0, :20], plain[0, :20], atol=atol, rtol=0)
