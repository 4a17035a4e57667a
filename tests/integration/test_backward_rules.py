"""GIM, RelP and AtP* on every model family, against slow references on plain Hugging Face.

The references (:mod:`rules_reference`) apply each method's backward rules to the Hugging Face
modules the way the authors' code does (swapped norm forwards, a patched softmax, gradient
scaling hooks, swapped activations) and take each receiver's score column as the derivative of
the metric with respect to the amount of each sender's difference added to that receiver's
input, one forward and backward pass per receiver. AtP*'s QK fix is checked edge by edge
against patterns captured from forward passes with the edge patched.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from circuitfind.algorithms import GIM, AtPStar, RelP
from circuitfind.errors import ConfigError
from circuitfind.patching import PatchingEngine
from circuitfind.patching.backward_rules import BackwardRules
from circuitfind.testing import ToyTask, tiny_model
from rules_reference import Layout, applied, plain_hf, qk_fixed_scores, reference_scores
from tolerances import float32_atol

FAMILIES = {
    "gpt2": dict(arch="gpt2", n_layers=2, seed=0),
    "gpt_neox": dict(arch="gpt_neox", n_layers=2, seed=7),  # parallel attention and MLP
    "llama": dict(arch="llama", n_layers=2, n_kv_heads=2, seed=3),
    "mistral": dict(arch="mistral", n_layers=2, n_kv_heads=2, seed=4),
    "qwen2": dict(arch="qwen2", n_layers=2, n_kv_heads=2, seed=5),
    "qwen3": dict(arch="qwen3", n_layers=2, n_kv_heads=2, seed=6),
    "gemma2": dict(arch="gemma2", n_layers=2, n_kv_heads=2, seed=9),
}
SEQ = 8  # longer than the sliding windows (4)

# method -> (its scores on an engine, the same rules on plain Hugging Face)
METHODS = {
    "gim": (lambda e, d: GIM().score(e, d),
            dict(freeze_norm=True, temperature=2.0, qkv=(0.25, 0.25, 0.5), gate_up=(0.5, 0.5))),
    "relp": (lambda e, d: RelP().score(e, d),
             dict(freeze_norm=True, identity=True, gate_up=(0.5, 0.5))),
    "relp_ah": (lambda e, d: RelP(ah_rule=True).score(e, d),
                dict(freeze_norm=True, identity=True, gate_up=(0.5, 0.5), detach_pattern=True)),
    "grad_drop": (lambda e, d: e.edge_attribution(d, rules=BackwardRules(drop_layer=0)),
                  dict(drop_layer=0)),
}


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """family -> (engine, data, plain HF layout, sender differences a' - a), built lazily."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            model = tiny_model(tmp_path_factory.mktemp(name), dtype=torch.float64,
                               **FAMILIES[name])
            data = ToyTask(seq_len=SEQ, positions=2).build(model.tokenizer, 3, seed=1)
            engine = PatchingEngine(model)
            delta = engine.sender_outputs(data.corrupted) - engine.sender_outputs(data.clean)
            cache[name] = engine, data, Layout(plain_hf(model)), delta
        return cache[name]

    return get


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want, atol=float32_atol(want), rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_scores_equal_the_hugging_face_reference(setups, name, method):
    """Every edge's score under the method's backward rules = the slow reference's."""
    if method in ("relp_ah", "grad_drop") and name not in ("gpt2", "llama", "gemma2"):
        pytest.skip("one rule at a time: checked on three families (one each of LayerNorm, "
                    "RMSNorm with grouped queries, post-norms)")
    engine, data, lay, delta = setups(name)
    score, rules = METHODS[method]
    got = score(engine, data)
    with applied(lay, **rules):
        want = reference_scores(lay, engine.graph, data, delta)
    assert want.abs().max() > 1e-2
    _close(got, want)
    # the rules change the scores: the comparison could not pass with plain EAP
    eap = engine.edge_attribution(data).double()
    assert float((eap - want).abs().max()) > 100 * float32_atol(want)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_qk_fix_equals_patterns_recomputed_edge_by_edge(setups, name):
    """AtP* without GradDrop: q and k edges score ``sum (A' - A) dM/dA`` with ``A'`` the
    pattern of a forward pass with that edge patched; every other edge keeps EAP's score."""
    engine, data, lay, delta = setups(name)
    g = engine.graph
    got = AtPStar(grad_drop=False).score(engine, data).double()
    eap = engine.edge_attribution(data).double()
    qk = torch.tensor([rec.kind in ("q", "k") for rec in g.receivers])
    want = qk_fixed_scores(lay, g, data, delta) * g.edge_mask
    want[:, ~qk] = eap[:, ~qk]
    assert want[:, qk].abs().max() > 1e-3
    _close(got, want)
    # the fix matters on these prompts (saturating softmax), else the test would prove nothing
    assert float((eap[:, qk] - want[:, qk]).abs().max()) > 100 * float32_atol(want)


@pytest.mark.parametrize("name", ["qwen3", "gpt_neox"])
def test_qk_fix_in_float32_at_metric_positions_that_differ_by_example(tmp_path, name):
    """The QK fix's trimmed last block (each example's own metric positions put back among
    all query rows) and, in float32, Qwen3's in-place q/k norms of the patched projections
    equal the edge-by-edge reference (sequential and parallel blocks)."""
    model = tiny_model(tmp_path, dtype=torch.float32, **FAMILIES[name])
    data = ToyTask(seq_len=SEQ, positions=2).build(model.tokenizer, 3, seed=1)
    data = dataclasses.replace(data, positions=torch.tensor([[7, 8], [5, 8], [3, 6]]))
    engine = PatchingEngine(model)
    g = engine.graph
    delta = engine.sender_outputs(data.corrupted) - engine.sender_outputs(data.clean)
    got = AtPStar(grad_drop=False).score(engine, data).double()
    eap = engine.edge_attribution(data).double()
    qk = torch.tensor([rec.kind in ("q", "k") for rec in g.receivers])
    want = (qk_fixed_scores(Layout(plain_hf(model)), g, data, delta) * g.edge_mask).double()
    want[:, ~qk] = eap[:, ~qk]
    assert want[:, qk].abs().max() > 1e-3
    _close(got, want)


# GradDrop's shared-forward passes on every family, and on three layers (passes that start
# mid-model, receiver groups reached in part)
DEEPER = {"llama_3l": dict(arch="llama", n_layers=3, n_kv_heads=2, seed=3),
          "gpt_neox_3l": dict(arch="gpt_neox", n_layers=3, seed=7)}


def _dropped(engine: PatchingEngine, data, qk_fix: bool = True) -> torch.Tensor:
    """``[L, N, S, R]`` GradDrop's estimates taken literally: example by example (a batch of
    that one prompt pair), one pass per dropped layer whose backward pass zeroes the gradient
    of that layer's outputs (:attr:`BackwardRules.drop_layer`, checked against Hugging Face
    above)."""
    return torch.stack([torch.stack([
        engine.edge_attribution(data.subset([i]),
                                rules=BackwardRules(qk_fix=qk_fix, drop_layer=layer)).double()
        for i in range(data.n)]) for layer in range(engine.graph.n_layers)])


def _mean_magnitude(dropped: torch.Tensor) -> torch.Tensor:
    """AtP* (Kramar et al. 2024, eq. 11) from ``[L, N, S, R]`` estimates: ``1/(L-1) sum_l``
    of the mean over prompt pairs of each pair's ``|AtP_(l)|``."""
    return dropped.abs().mean(1).sum(0) / (dropped.shape[0] - 1)


@pytest.mark.parametrize("name", sorted(FAMILIES) + sorted(DEEPER))
def test_grad_drop_is_the_mean_over_prompts_of_each_prompts_magnitude(setups, tmp_path, name):
    """AtP* = ``E_pairs[1/(L-1) sum_l |AtP_(l)(pair)|]`` (Kramar et al. 2024, eq. 11: the
    absolute value of each prompt pair's estimate, then the mean over pairs), its ``L``
    estimates from one forward pass equal to one pass per example and dropped layer; a
    receiver of the dropped layer scores 0 in that layer's pass; scores do not depend on the
    batch split."""
    if name in DEEPER:
        model = tiny_model(tmp_path, dtype=torch.float64, **DEEPER[name])
        data = ToyTask(seq_len=SEQ, positions=2).build(model.tokenizer, 3, seed=1)
        engine = PatchingEngine(model)
    else:
        engine, data, _, _ = setups(name)
    g = engine.graph
    dropped = _dropped(engine, data)
    layer_of = torch.tensor([rec.layer for rec in g.receivers])
    for layer in range(g.n_layers):
        assert float(dropped[layer][..., layer_of == layer].abs().max()) == 0.0
    shared = engine.edge_attribution(data, rules=BackwardRules(qk_fix=True),
                                     drop_each_layer=True)
    assert shared.shape == (g.n_layers, g.n_senders, g.n_receivers)
    _close(shared, dropped.abs().mean(1))
    want = _mean_magnitude(dropped)
    _close(AtPStar().score(engine, data), want)
    _close(AtPStar(batch_size=2).score(engine, data), want)
    # the magnitude per prompt pair differs from that of the mean over pairs here, and
    # dropping a layer changes the scores below it: else the checks would prove nothing
    tol = 100 * float32_atol(want)
    assert float((dropped.abs().mean(1) - dropped.mean(1).abs()).max()) > tol
    below = layer_of < g.n_layers - 1
    assert float((dropped[-1] - dropped[0])[..., below].abs().max()) > tol
    assert AtPStar().score_meaning(data.task).kind == "importance"
    assert AtPStar(grad_drop=False).score_meaning(data.task).kind == "metric_change"


@pytest.mark.parametrize("name", ["gpt2", "qwen3", "gemma2"])
def test_grad_drop_at_metric_positions_that_differ_by_example(setups, name):
    """The last block runs at each example's own metric positions (one repeated) under
    GradDrop too, the pass dropping the last layer seeded from them, and the last receivers
    are contracted there per example: still one pass per example and dropped layer."""
    engine, data, _, _ = setups(name)
    data = dataclasses.replace(data, positions=torch.tensor([[7, 8], [5, 8], [3, 3]]))
    want = _mean_magnitude(_dropped(engine, data))
    _close(AtPStar().score(engine, data), want)
    _close(AtPStar(qk_fix=False).score(engine, data),
           _mean_magnitude(_dropped(engine, data, qk_fix=False)))


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_grad_drop_equals_the_paper_on_plain_hugging_face(setups, name):
    """AtP* against eq. 11 computed from scratch on the plain Hugging Face model: for each
    prompt pair and dropped layer, forward hooks zero the gradient of that layer's attention
    and MLP outputs (one backward pass per receiver for the v, MLP and logits edges; the
    patched patterns of a forward pass per q/k edge with that pass's pattern gradient), each
    pair's estimate in absolute value, then the mean over pairs and ``1/(L-1)`` the sum over
    dropped layers."""
    engine, data, lay, _ = setups(name)
    g = engine.graph
    qk = torch.tensor([rec.kind in ("q", "k") for rec in g.receivers])
    want = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    for i in range(data.n):
        one = data.subset([i])
        delta = engine.sender_outputs(one.corrupted) - engine.sender_outputs(one.clean)
        for layer in range(g.n_layers):
            with applied(lay, drop_layer=layer):
                estimate = reference_scores(lay, g, one, delta)
                estimate[:, qk] = (qk_fixed_scores(lay, g, one, delta) * g.edge_mask)[:, qk]
            want += estimate.abs()
    want /= data.n * (g.n_layers - 1)
    assert want.abs().max() > 1e-2
    _close(AtPStar().score(engine, data), want)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_qk_fix_leaves_the_other_edges_of_every_grad_drop_pass_alone(setups, name):
    """Under the QK fix the q and k receivers' gradients are only summed into the residual's
    (never written per head): each GradDrop pass's v, MLP and logits edges still equal those
    of the same pass without the QK fix (plain ``drop_layer`` passes, checked against Hugging
    Face above), in the layers below the dropped one too, so the residual's gradient through
    the q/k/v projections is right."""
    engine, data, _, _ = setups(name)
    g = engine.graph
    other = torch.tensor([rec.kind not in ("q", "k") for rec in g.receivers])
    shared = engine.edge_attribution(data, rules=BackwardRules(qk_fix=True),
                                     drop_each_layer=True).double()
    plain = _dropped(engine, data, qk_fix=False).abs().mean(1)
    assert plain[:, :, other].abs().max() > 1e-3
    _close(shared[:, :, other], plain[:, :, other])


def test_qk_fix_follows_weights_changed_in_place(tmp_path):
    """The QK fix keeps weight products on the family adapter between calls: after a weight
    is changed in place the scores equal a new engine's (a new adapter, nothing kept) on the
    changed model, not those of the old weights."""
    model = tiny_model(tmp_path, dtype=torch.float64, **FAMILIES["gpt2"])
    data = ToyTask(seq_len=SEQ, positions=2).build(model.tokenizer, 3, seed=1)
    engine = PatchingEngine(model)
    g = engine.graph
    qk = torch.tensor([rec.kind in ("q", "k") for rec in g.receivers])
    before = AtPStar(grad_drop=False).score(engine, data).double()
    lay = engine.runner.arch
    with torch.no_grad():
        lay.w_out(0)[0].mul_(1.5)  # layer 0's heads: their products with layer 1's q/k
        lay.head_weights(1, "k")[0].mul_(0.5)
    # a new corrupted tensor: the engine's own memo of the corrupted run does not hit
    data = dataclasses.replace(data, corrupted=data.corrupted.clone())
    after = AtPStar(grad_drop=False).score(engine, data).double()
    fresh = PatchingEngine(model)
    assert fresh.runner.arch is not lay
    want = AtPStar(grad_drop=False).score(fresh, data).double()
    _close(after[:, qk], want[:, qk])
    assert float((after - before)[:, qk].abs().max()) > 100 * float32_atol(want)


def test_grad_drop_without_the_qk_fix(setups):
    """GradDrop alone (plain gradients through the softmax) from one forward pass equals
    one pass per example and dropped layer, in any batch split."""
    engine, data, _, _ = setups("gpt2")
    want = _mean_magnitude(_dropped(engine, data, qk_fix=False))
    _close(AtPStar(qk_fix=False).score(engine, data), want)
    _close(AtPStar(qk_fix=False, batch_size=1).score(engine, data), want)


def test_plain_rules_are_eap_and_rules_leave_the_forward_alone(setups):
    """The default rules reproduce EAP bit for bit; after a modified pass the adapter's rules
    are plain again and masked passes are unchanged."""
    engine, data, _, _ = setups("qwen3")
    g = engine.graph
    eap = engine.edge_attribution(data)
    assert torch.equal(engine.edge_attribution(data, rules=BackwardRules()), eap)
    full = engine.run(data, g.full_mask(torch.float64))
    GIM().score(engine, data)
    assert engine.runner.arch.rules == BackwardRules()
    assert engine.runner.arch.attention_tap is None
    assert torch.equal(engine.run(data, g.full_mask(torch.float64)), full)
    with pytest.raises(ConfigError, match="gradient points"):
        from circuitfind.patching.engine import GradientPoint

        engine.edge_attribution(data, points=[GradientPoint(1.0)],
                                rules=BackwardRules(freeze_norm=True))


def test_methods_run_from_python_the_cli_and_a_bench_config(tiny_models, run, tmp_path):
    """``cf.discover(..., algorithm=...)``, ``circuitfind discover -a ... -p KEY=VALUE`` and
    ``benchmarks/configs/methods.toml`` reach the three methods with their parameters."""
    import json
    from pathlib import Path

    import circuitfind as cf
    from circuitfind.benchmark.grid import load_config

    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 4, seed=1)
    for name, params in (("gim", {"softmax_temperature": 3.0}), ("relp", {"ah_rule": True}),
                         ("atp_star", {"grad_drop": False})):
        circuit = cf.discover(model, data=data, algorithm=name, algorithm_params=params,
                              n_edges=10)
        assert circuit.metadata["algorithm"] == name and circuit.n_edges > 0
    result = run("discover", "--task", "induction", "--algorithm", "gim", "-p",
                 "softmax_temperature=3", "--edges", "5", "--examples", "4",
                 "--out", str(tmp_path / "run"), "--renderer", "matplotlib")
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "circuit.json").read_text())
    assert saved["metadata"]["algorithm"] == "gim"
    assert saved["metadata"]["algorithm_params"]["softmax_temperature"] == 3
    config = Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "methods.toml"
    cells = load_config(config).cells
    assert {c.algorithm for c in cells} == {"eap", "gim", "relp", "atp_star", "exact"}
    assert {dict(c.params).get("grad_drop") for c in cells if c.algorithm == "atp_star"} == {
        False, True}
