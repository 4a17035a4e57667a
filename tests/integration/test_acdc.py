"""ACDC: exact mode equals a slow sequential ACDC edge for edge; resume; bad input.

The slow reference below is written from the reference implementation's description
(``TLACDCExperiment.step``): one full forward pass of the bridge with hooks per test (the
engine's hooked path, ``use_runner=False``: no start layer, no batching, no speculation), the
visiting order spelled out with explicit loops over layers, kinds and heads by receiver *name*.
"""

from __future__ import annotations

import math

import pytest
import torch

import circuitfind as cf
from circuitfind.algorithms import ACDC, RunContext
from circuitfind.errors import CheckpointMismatchError, ConfigError, NonFiniteMetricError
from circuitfind.testing import ToyTask
from tolerances import EPS32, assert_close, atol_for


def slow_acdc(model, data, tau, objective="kl", node_tests=True, max_receivers=None,
              ablation="resample", engine=None):
    """Sequential ACDC: one full hooked forward per tested edge (or one pass of ``engine`` per
    tested edge, where the hooked forward is no reference). Returns kept, tested, effects."""
    eng = cf.PatchingEngine(model, use_runner=False) if engine is None else engine
    g = eng.graph
    dtype = eng.dtype
    full_logits = eng.run(data, g.full_mask(dtype), ablation=ablation)[0]
    higher_is_better = objective == "metric" and data.task.higher_is_better

    def value(mask):
        logits = eng.run(data, mask.to(dtype), ablation=ablation)[0]
        if objective == "kl":  # KL(p_full || p_circuit), float64, mean over positions, examples
            ref, lp = full_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
            return float((ref.exp() * (ref - lp)).sum(-1).mean())
        return float(data.metric(logits).double().mean())

    kept = g.edge_mask.clone()
    tested = torch.zeros_like(kept)
    effects = torch.zeros(kept.shape, dtype=torch.float64)
    cur = value(kept)

    def test(trial):
        nonlocal cur
        new = value(trial)
        effect = new - cur
        worse = -effect if higher_is_better else effect
        if worse < tau:
            cur = new
            return effect, True
        return effect, False

    def connected(r):
        readers = [g.node_index(n) for n in g.receivers[r].nodes if n != "logits"]
        return not readers or bool(kept[readers].any())

    steps = [("edges", "logits")]
    for layer in reversed(range(g.n_layers)):
        steps.append(("edges", f"m{layer}"))
        attn = []
        for kind in "vkq":
            n = g.n_heads if kind == "q" or not g.is_grouped_query else g.n_kv_heads
            for h in reversed(range(n)):
                head = f"kv{h}" if kind != "q" and g.is_grouped_query else f"h{h}"
                attn.append(f"a{layer}.{head}<{kind}>")
        if node_tests:
            steps += [("node", name) for name in attn]
        steps += [("edges", name) for name in attn]
    n_edge_steps = 0
    for kind, name in steps:
        if kind == "edges":
            n_edge_steps += 1
            if max_receivers is not None and n_edge_steps > max_receivers:
                break
        r = g.receiver_index(name)
        if not connected(r):
            kept[:, r] = False
            continue
        if kind == "node":
            trial = kept.clone()
            trial[:, r] = False
            _, removed = test(trial)
            if removed:
                kept = trial
            continue
        for s in reversed(range(int(g.n_upstream[r]))):  # latest sender first, input last
            if not kept[s, r]:
                continue
            trial = kept.clone()
            trial[s, r] = False
            effect, removed = test(trial)
            tested[s, r] = True
            effects[s, r] = effect
            if removed:
                kept = trial
    return kept, tested, effects


def _check_equal(circuit, reference, tau, atol):
    kept, tested, effects = reference
    got = circuit.kept
    scores = circuit.scores.double()
    margin = (effects[tested].abs() - tau).abs().min() if tested.any() else math.inf
    assert margin > 10 * atol, "threshold too close to a measured effect for this test"
    assert torch.equal(got, kept), (
        f"kept sets differ: {sorted(set(circuit.edges) ^ set(circuit.replace(kept=kept).edges))}")
    assert int(tested.sum()) == circuit.metadata["acdc"]["tested_edges"]
    torch.testing.assert_close(scores[tested], effects[tested], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("name, objective, tau", [
    ("gpt2", "kl", 3e-5), ("gpt2", "metric", 3e-3),
    ("llama_gqa", "kl", 1e-3), ("llama_gqa", "metric", 3e-3)])
def test_exact_mode_equals_sequential_acdc(tiny_models, name, objective, tau):
    model = tiny_models(name)
    data = ToyTask().build(model.tokenizer, 3, seed=1)
    engine = cf.PatchingEngine(model)
    circuit = ACDC(threshold=tau, objective=objective, progress=False).discover(engine, data)
    reference = slow_acdc(model, data, tau, objective)
    n_kept, n_tested = int(reference[0].sum()), int(reference[1].sum())
    assert 0 < n_kept < engine.graph.n_edges and n_tested > 10  # a non-trivial run
    assert circuit.metadata["acdc"]["node_tests"] > 5
    # effects (nats of KL, or metric units) through float32 softmaxes on Llama-style models
    _check_equal(circuit, reference, tau, atol=atol_for(model, reference[2]))
    if name != "gpt2":
        return
    # without node tests, and with a speculation width of 1 (plain sequential) too
    plain = ACDC(threshold=tau, objective=objective, qkv_node_tests=False, masks_per_pass=1,
                 progress=False).discover(engine, data)
    _check_equal(plain, slow_acdc(model, data, tau, objective, node_tests=False), tau, atol=1e-9)


def test_wide_speculative_batches_change_no_decision(tiny_models, monkeypatch):
    """Batches of up to 8 candidates (wrong predictions cut deep into them; their values
    predict the next batch) keep the same edges with the same scores as the default sizing,
    which on these tiny models rarely batches more than two."""
    from circuitfind.algorithms import acdc

    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=1)
    engine = cf.PatchingEngine(model)
    default = ACDC(threshold=3e-5, progress=False).discover(engine, data)
    widths = []

    def wide(self, items, i, layer):
        widths.append(min(len(items), i + 8) - i)
        return min(len(items), i + 8)

    monkeypatch.setattr(acdc._Run, "_batch_end", wide)
    forced = ACDC(threshold=3e-5, progress=False).discover(engine, data)
    assert max(widths) == 8
    assert torch.equal(forced.kept, default.kept)
    # float64 effects on GPT-2 (no float32 step), stored as float32 scores
    assert_close(model, forced.scores, default.scores, 1e-12)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_every_prediction_wrong_changes_no_decision(tiny_models, monkeypatch, name):
    """Speculation can only cost: with every candidate's prediction forced to the opposite of
    its true decision (and declared certain, so batches run to their widest), each pass
    decides one test and wastes the rest of its masks, yet the same edges are tested and kept
    with the same scores as the default predictions, which agree with the sequential
    reference (``test_exact_mode_equals_sequential_acdc``)."""
    from circuitfind.algorithms import acdc

    model = tiny_models(name)
    data = ToyTask().build(model.tokenizer, 3, seed=1)
    engine = cf.PatchingEngine(model)
    tau = 3e-5 if name == "gpt2" else 1e-3
    budget = 12  # receivers: the logits, the last MLP and the last layer's heads
    default = ACDC(threshold=tau, max_receivers=budget, progress=False).discover(engine, data)
    assert default.metadata["acdc"]["node_tests"] > 0
    g = engine.graph
    node_removed = {g.receiver_index(n): e < tau
                    for n, e in default.metadata["acdc"]["node_effects"].items()}

    def wrong(self, item):
        removed = (node_removed[item.receiver] if item.kind == "node"
                   else not bool(default.kept[item.sender, item.receiver]))
        return not removed, 0.0

    passes, decided = [], []
    values, decide = acdc._Run._values, acdc._Run._decide
    monkeypatch.setattr(acdc._Run, "_guess", wrong)
    monkeypatch.setattr(acdc._Run, "_values",
                        lambda self, masks: passes.append(len(masks)) or values(self, masks))
    monkeypatch.setattr(acdc._Run, "_decide",
                        lambda self, item, value: decided.append(1) or decide(self, item, value))
    forced = ACDC(threshold=tau, max_receivers=budget, masks_per_pass=4,
                  progress=False).discover(engine, data)
    assert len(passes) == len(decided) + 1 and max(passes) == 4  # one decision per pass
    assert torch.equal(forced.kept, default.kept)
    assert torch.equal(forced.scores != 0, default.scores != 0)
    assert forced.metadata["acdc"]["node_effects"].keys() == default.metadata["acdc"][
        "node_effects"].keys()
    # batched differently: equal to the float32 steps' rounding (GPT-2 has none)
    assert_close(model, forced.scores, default.scores, 1e-12)


def test_a_kept_node_tests_value_decides_its_receivers_only_edge(tiny_models, monkeypatch):
    """A layer-0 q/k/v receiver reads only the input: its edge test removes every edge of
    the receiver, the node test's own mask. When the node test keeps it and nothing is
    removed afterwards, the edge test reads that value instead of evaluating the mask again:
    the edge's score is the node test's effect and no pass of the layer-0 edge group holds
    that mask (the decisions equal the sequential reference's:
    ``test_exact_mode_equals_sequential_acdc``)."""
    from circuitfind.algorithms import acdc

    model = tiny_models("llama_gqa")
    data = ToyTask().build(model.tokenizer, 3, seed=1)
    engine = cf.PatchingEngine(model)
    g = engine.graph
    plan = acdc.visiting_plan(g)
    last = plan[-1].group  # the layer-0 edges
    evaluated = []
    values = acdc._Run._values
    monkeypatch.setattr(acdc._Run, "_values", lambda self, masks: (
        self.state["group"] == last and evaluated.append(masks.clone())) or values(self, masks))
    tau = 3e-4  # layer 0: v and k kept, the first q removed, three q kept after it
    circuit = ACDC(threshold=tau, progress=False).discover(engine, data)
    node_effects = circuit.metadata["acdc"]["node_effects"]
    layer0 = [step.receiver for step in plan if step.kind == "node"
              and g.receivers[step.receiver].layer == 0]  # in the order tested
    assert layer0 and all(int(g.n_upstream[r]) == 1 for r in layer0)
    # the kept node tests after the last removed one: nothing changed before their edges
    effects = [node_effects[g.receivers[r].name] for r in layer0]
    removed = [i for i, e in enumerate(effects) if e < tau]
    reused = [r for i, r in enumerate(layer0) if i > max(removed, default=-1)]
    assert len(reused) >= 3
    for r in reused:
        assert bool(circuit.kept[0, r]) and bool(circuit.scores[0, r] != 0)
        assert float(circuit.scores[0, r]) == float(torch.tensor(
            node_effects[g.receivers[r].name]).float())
        assert not any((~masks[:, :, r].any(1)).any() for masks in evaluated)


def test_prior_learns_each_category_per_layer():
    """First tests are predicted by their category's removal rate at their layer, smoothed
    towards its rate at the layer visited before (``layer + 1``), its rate over layers, the
    run's rate and 1/2."""
    from circuitfind.algorithms.acdc import _Prior

    prior = _Prior()
    mlp_edge, q_edge = ("edge", "mlp", "attention"), ("edge", "q", "attention")
    assert prior.p_removed(mlp_edge, 3) == 0.5
    for _ in range(6):
        prior.learn(q_edge, 5, True)
    for _ in range(2):
        prior.learn(mlp_edge, 5, False)
    # the run: 6 of 8 removed -> (6 + 1) / 10; q edges over layers: (6 + 1.4) / 8; at layer 5
    # (layer 6 unseen): (6 + 2 * 7.4 / 8) / 8
    at5 = (6 + 2 * (7.4 / 8)) / 8
    assert prior.p_removed(q_edge, 5) == pytest.approx(at5)
    # layer 4's first tests follow layer 5's rate; layer 3 (layer 4 unseen) the rate over layers
    assert prior.p_removed(q_edge, 4) == pytest.approx(at5)
    assert prior.p_removed(q_edge, 3) == pytest.approx(7.4 / 8)
    prior.learn(q_edge, 4, False)  # run 6 of 9 -> 7 / 11, q edges 6 of 7, layer 5 6 of 6
    over_layers = (6 + 2 * 7 / 11) / 9
    assert prior.p_removed(q_edge, 4) == pytest.approx(2 * ((6 + 2 * over_layers) / 8) / 3)
    assert prior.p_removed(mlp_edge, 5) < 0.5 < prior.p_removed(q_edge, 3)
    # an unseen category follows the run's rate
    assert prior.p_removed(("node", "v", None), 2) == pytest.approx(7 / 11)


def test_pass_cost_fit_never_settles_on_one_mask_per_pass():
    """A layer's fitted fixed cost stays positive, and a layer that has seen one batch size
    takes the previous layer's cost per mask and the rest of what its own passes cost as
    their fixed cost: a zero fixed cost
    (noise in the first layer's few passes) once made every later pass one mask long."""
    from types import SimpleNamespace

    from circuitfind.algorithms import acdc

    run = object.__new__(acdc._Run)
    run.pass_times, run.last_fit = {}, None
    # the logits' layer: passes of 4 and 8 masks on a line through 0 (or below)
    run.pass_times[6] = [(4, 0.4), (8, 0.8), (8, 0.79)]
    c0, c1 = run._pass_cost(6)
    assert c1 == pytest.approx(0.1, rel=0.05) and c0 == pytest.approx(acdc._Run.min_fixed * c1)
    # the next layer ran one-mask passes at 0.5 s each: its own cost, not the old line's 0.11
    run.pass_times[5] = [(1, 0.5), (1, 0.5)]
    c0, c1 = run._pass_cost(5)
    assert (c0, c1) == pytest.approx((0.4, 0.1), rel=0.05)
    # with confident predictions the batch grows past one mask
    run.k_max = 16
    run._guess = lambda item: (True, 0.02)
    items = [SimpleNamespace(receiver=0)] * 20
    assert acdc._Run._batch_end(run, items, 0, 5) > 1


def test_value_predictions_near_the_threshold_count_as_uncertain():
    """A prediction from an effect measured under a nearly equal state is split by whether
    the effect was within ``near`` τ of τ; each kind's miss rate is its own (near ones
    missed about 30% on the benchmark's models, the others 2%)."""
    from types import SimpleNamespace

    from circuitfind.algorithms import acdc
    from circuitfind.algorithms.objective import Objective

    run = object.__new__(acdc._Run)
    run.objective = Objective("kl")
    run.algo = SimpleNamespace(threshold=1e-3, abs_value_threshold=False)
    assert run._predict(0.9e-3) == (True, True) and run._predict(0.5e-3) == (True, False)
    assert run._predict(1.2e-3) == (False, True) and run._predict(2e-3) == (False, False)
    run.pred_stats = {"prior": (0, 0), "far": (10, 10), "near": (0, 10)}
    near, far = acdc._Item("edge", 1, 0), acdc._Item("edge", 1, 1)
    run.predictions = {near: run._predict(1.1e-3), far: run._predict(-1e-3)}
    assert run._guess(near) == (False, pytest.approx(11 / 12))
    assert run._guess(far) == (True, pytest.approx(1 / 12))


def test_batch_sizing_reads_cpu_time_and_no_clock_changes_a_decision(tiny_models, monkeypatch):
    """Speculative batch lengths follow measured pass costs: this process's CPU time on the
    CPU (other processes' load does not count), and whatever a clock says (here one that
    jumps at random, as wall time does on a loaded machine) the same edges are kept with the
    same scores: timing sets batch lengths, never a decision."""
    import random
    from types import SimpleNamespace

    from circuitfind.algorithms import acdc

    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=1)
    engine = cf.PatchingEngine(model)
    calls = []
    real = acdc.time
    monkeypatch.setattr(acdc, "time", SimpleNamespace(
        process_time=lambda: calls.append(1) or real.process_time(), perf_counter=None))
    default = ACDC(threshold=3e-5, progress=False).discover(engine, data)
    assert calls  # the CPU clock, not wall time (perf_counter=None would raise)
    rng, now = random.Random(0), [0.0]

    def erratic() -> float:
        now[0] += rng.expovariate(1.0) * rng.choice([1e-3, 1.0, 1e3])
        return now[0]

    lengths = []
    batch_end = acdc._Run._batch_end
    monkeypatch.setattr(acdc, "time", SimpleNamespace(process_time=erratic,
                                                      perf_counter=erratic))
    monkeypatch.setattr(acdc._Run, "_batch_end", lambda self, items, i, layer: lengths.append(
        batch_end(self, items, i, layer) - i) or i + lengths[-1])
    jumpy = ACDC(threshold=3e-5, progress=False).discover(engine, data)
    assert len(set(lengths)) > 2  # the clock did change the batch lengths
    assert torch.equal(jumpy.kept, default.kept)
    assert_close(model, jumpy.scores, default.scores, 1e-12)


def test_batched_mode_tests_against_one_state(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=1)
    engine = cf.PatchingEngine(model)
    exact = ACDC(threshold=2e-3, progress=False).discover(engine, data)
    batched = ACDC(threshold=2e-3, mode="batched", progress=False).discover(engine, data)
    # the logits receiver is visited first: there both modes test against the full model
    r = engine.graph.n_receivers - 1
    full = engine.graph.full_mask(torch.float64)
    logits_full = engine.run(data, full)[0]
    s = int(engine.graph.n_upstream[r]) - 1  # the first edge tested is the same in both
    mask = full.clone()
    mask[s, r] = 0
    # ACDC's KL objective is float64 (metrics.kl_div's log-softmaxes are float32: 1.7e-7 off
    # with ATEN_CPU_CAPABILITY=default); GPT-2 has no float32 step; scores are stored as float32
    # (rounded alike, or to the neighbouring float32 value: rel=eps32)
    ref, lp = logits_full.log_softmax(-1), engine.run(data, mask)[0].log_softmax(-1)
    expect = float((ref.exp() * (ref - lp)).sum(-1).mean().float())
    assert batched.scores[s, r].item() == pytest.approx(expect, abs=1e-12, rel=EPS32)
    assert exact.scores[s, r].item() == pytest.approx(expect, abs=1e-12, rel=EPS32)
    assert batched.metadata["acdc"]["mode"] == "batched"


def test_killed_and_resumed_run_gives_the_identical_circuit(tiny_models, tmp_path):
    model = tiny_models("llama_gqa")
    data = ToyTask().build(model.tokenizer, 3, seed=2)
    engine = cf.PatchingEngine(model)
    algo = ACDC(threshold=2e-3, progress=False)
    original, counted = engine.run, {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return original(*args, **kwargs)

    engine.run = counting
    whole = algo.discover(engine, data)
    engine.run = original
    # the number of passes follows measured pass times (speculative batch lengths): kill
    # early, then a third of the way into the resumed run, whatever that number is
    assert counted["n"] >= 9
    ckpt = tmp_path / "acdc.pt"
    for kill_at in (3, counted["n"] // 3):
        calls = {"n": 0}

        def flaky(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        engine.run = flaky
        with pytest.raises(KeyboardInterrupt):
            algo.discover(engine, data, RunContext(checkpoint=ckpt, progress=False))
        engine.run = original
        assert ckpt.exists()
    resumed = algo.discover(engine, data, RunContext(checkpoint=ckpt, progress=False))
    assert torch.equal(resumed.kept, whole.kept)
    # a resumed run batches its passes differently: equal to the float32 steps' rounding
    assert_close(model, resumed.scores, whole.scores)
    # another threshold (or other data) must not resume from this file
    with pytest.raises(CheckpointMismatchError, match="different run"):
        ACDC(threshold=3e-3, progress=False).discover(
            engine, data, RunContext(checkpoint=ckpt, progress=False))


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), float("inf"), "0.1", True])
def test_bad_threshold_is_refused(tau):
    with pytest.raises(ConfigError, match="threshold"):
        ACDC(threshold=tau)


def test_non_finite_metric_stops_and_names_the_edge(tiny_models, tmp_path):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=1)
    engine = cf.PatchingEngine(model)
    original = engine.evaluate
    calls = {"n": 0}

    def nan_later(data, masks, **kwargs):
        calls["n"] += 1
        values = original(data, masks, **kwargs)
        return values if calls["n"] < 4 else values * float("nan")

    engine.evaluate = nan_later
    ckpt = tmp_path / "acdc.pt"
    with pytest.raises(NonFiniteMetricError, match=r"receiver .*edge .*->"):
        ACDC(threshold=0.05, objective="metric", progress=False).discover(
            engine, data, RunContext(checkpoint=ckpt, progress=False))
    assert ckpt.exists()


def test_discover_returns_the_algorithms_own_circuit(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=1)
    circuit = cf.discover(model, algorithm="acdc", data=data, threshold=2e-3,
                          algorithm_params={"progress": False})
    own = ACDC(threshold=2e-3, progress=False).discover(cf.PatchingEngine(model), data)
    assert torch.equal(circuit.kept, own.kept)  # not re-selected, not pruned
    assert circuit.metadata["algorithm"] == "acdc"
    assert circuit.metadata["algorithm_params"]["threshold"] == 2e-3
    assert "faithfulness" in circuit.metadata
    with pytest.raises(ConfigError, match="selects its own circuit"):
        cf.discover(model, algorithm="acdc", data=data, n_edges=10)


@pytest.mark.acceptance
def test_exact_mode_equals_sequential_acdc_on_stories260k(stories_dir):
    """A real pretrained Llama/GQA model (float32): the logits, the last MLP, the last layer's
    q/k/v node tests and one attention receiver (a receiver budget keeps it to seconds)."""
    model = cf.load_model(stories_dir, device="cpu")
    data = cf.build_data(model, "gendered_pronoun", n=4, seed=0)
    engine = cf.PatchingEngine(model)
    circuit = ACDC(threshold=1e-2, max_receivers=3, progress=False).discover(engine, data)
    reference = slow_acdc(model, data, 1e-2, max_receivers=3)
    assert int(reference[1].sum()) > 50 and circuit.metadata["acdc"]["node_tests"] > 0
    assert 0 < int(reference[0].sum()) < engine.graph.n_edges
    _check_equal(circuit, reference, 1e-2, atol=1e-5)


def test_acdc_prunes_under_the_engines_ablation(tiny_models):
    """The ablation has one owner, the engine: ACDC's passes use it (zero and resample give
    different effects and circuits, each equal to the sequential reference under that ablation)
    and discover records it; ACDC itself takes no ablation parameter."""
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 3, seed=1)
    tau = 3e-5
    resample = ACDC(threshold=tau, progress=False).discover(cf.PatchingEngine(model), data)
    zero = ACDC(threshold=tau, progress=False).discover(
        cf.PatchingEngine(model, ablation="zero"), data)
    assert not torch.equal(zero.scores, resample.scores)
    kept, tested, effects = slow_acdc(model, data, tau, ablation="zero")
    assert torch.equal(zero.kept, kept)
    torch.testing.assert_close(zero.scores.double()[tested], effects[tested], atol=1e-9, rtol=1e-4)
    found = cf.discover(model, data=data, algorithm="acdc", threshold=tau, ablation="zero")
    assert found.metadata["ablation"]["kind"] == "zero"
    assert torch.equal(found.kept, zero.kept)
    with pytest.raises(ConfigError, match="engine's ablation"):
        cf.get_algorithm("acdc", ablation="zero")


def test_pass_cost_fit_is_not_set_by_the_long_passes():
    """Each pass weighs ``1 / K^2`` in the fit (relative errors): passes of 1-3 masks on the
    line ``10 + 10 K`` ms and one long pass dearer per mask (a post-norm pass past about 8
    masks) give a fixed cost near the short passes' (unweighted: below zero, clamped to the
    minimum, and one-mask batches for uncertain candidates)."""
    from circuitfind.algorithms import acdc

    run = object.__new__(acdc._Run)
    run.pass_times, run.last_fit = {}, None
    run.pass_times[3] = [(1, 0.02)] * 5 + [(2, 0.03)] * 5 + [(3, 0.04)] * 5 + [(18, 0.3)]
    c0, c1 = run._pass_cost(3)
    assert 0.006 < c0 < 0.011 and 0.009 < c1 < 0.013
    assert c0 > 3 * acdc._Run.min_fixed * c1
