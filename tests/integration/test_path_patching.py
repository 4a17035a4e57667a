"""Path patching: pinned to exact patching and to a slow two-pass reference on the bridge.

- ``cf.path_patch`` for one sender and one receiver equals ``exact``'s score of that edge, for
  every edge of the tiny GPT-2 and Llama/GQA models (all edges in one batched call);
- with several senders and receivers in different layers it equals the procedure of Wang et al.
  written out with hooks on the bridge: pass 1 records each receiver's clean input, pass 2 runs
  the clean prompt with every receiver's input *set* to its clean input minus the direct
  contributions ``a_u - a'_u`` of the senders upstream of it (so a receiver never sees another
  receiver's change), under resample and zero ablation;
- the runner's frozen edges (any masks, binary or fractional, batched, any start layer) equal
  the patching equation applied receiver by receiver in hooks on the bridge;
- K pairs in one call equal the pairs one at a time; names are validated with suggestions;
- the ``path_patching`` discovery algorithm follows its procedure level by level (checked
  against the primitive) and runs from ``cf.discover`` and the CLI.
"""

from __future__ import annotations

import pytest
import torch

import circuitfind as cf
from circuitfind.algorithms import ExactPatching
from circuitfind.errors import ConfigError, UnknownNameError
from circuitfind.patching import PatchingEngine
from circuitfind.testing import ToyTask

from bridge_reference import metric_with_hooks, receiver_hook
from tolerances import assert_close


def path_patch_every_edge(engine, data):
    """``(path patching, exact patching)`` scores ``[E]`` (float64, metric units) of every
    edge: path patching of its one sender into its one receiver, every other path frozen to
    the clean run, beside :class:`ExactPatching`'s score of the edge."""
    g = engine.graph
    exact = g.to_edges(ExactPatching(progress=False).score(engine, data)).double()
    senders = [[g.senders[s].name] for s in g.edge_pairs[:, 0].tolist()]
    receivers = [[g.receivers[r].name] for r in g.edge_pairs[:, 1].tolist()]
    return cf.path_patch(engine, data, senders, receivers), exact


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "gemma2"])
def test_single_edge_path_patch_equals_exact(tiny_models, name):
    """One sender into one receiver, every other path frozen to the clean run (for Gemma-2
    through the receivers' post-norm mixtures), scores each edge as exact patching does."""
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=8)
    got, exact = path_patch_every_edge(PatchingEngine(model), data)
    assert exact.abs().max() > 1e-2
    torch.testing.assert_close(got, exact, atol=1e-6 * max(1.0, float(exact.abs().max())),
                               rtol=0)


def _slow_path_patch(model, engine, data, senders, receivers, ablated):
    """Two passes on the bridge: record receivers' clean inputs, then set them (Wang et al.)."""
    g = engine.graph
    clean_out = engine.sender_outputs(data.clean)
    recs = [g.receivers[g.receiver_index(r)] for r in receivers]
    recorded = {}

    def record(x, hook, name):
        recorded[name] = x.detach().clone()
        return x

    names = sorted({receiver_hook(rec) for rec in recs})
    metric_with_hooks(model, data, [(n, lambda x, hook, n=n: record(x, hook, n)) for n in names])
    by_hook: dict[str, list] = {n: [] for n in names}  # hook -> [(head or None, value)]
    for rec in recs:
        r = g.receiver_index(rec.name)
        delta = sum(clean_out[u] - ablated[u] for u in (g.node_index(s) for s in senders)
                    if u < int(g.n_upstream[r]))
        clean_in = recorded[receiver_hook(rec)]
        head = rec.head if rec.kind in ("q", "k", "v") else None
        by_hook[receiver_hook(rec)].append(
            (head, (clean_in if head is None else clean_in[:, :, head]) - delta))

    def set_inputs(x, hook, items):
        x = x.clone()  # only the receivers' own inputs are set; other heads read the run
        for head, value in items:
            if head is None:
                x = value.clone()
            else:
                x[:, :, head] = value
        return x

    hooks = [(n, lambda x, hook, n=n: set_inputs(x, hook, by_hook[n])) for n in names]
    return metric_with_hooks(model, data, hooks) - metric_with_hooks(model, data, [])


CASES = {
    "gpt2": [(["a0.h1", "input"], ["a1.h0<q>", "a1.h2<v>", "m1"]),
             (["a0.h3"], ["m0", "a1.h1<k>", "m1"]),
             (["input", "a0.h0", "m0", "a1.h3"], ["a1.h3<q>", "m1", "logits"])],
    "llama_gqa": [(["a0.h2", "m0"], ["a1.kv1<k>", "a2.h0<q>", "m2"]),
                  (["input", "a1.h3"], ["a1.kv0<v>", "m1", "a2.kv0<v>"]),
                  (["a0.h0", "a1.h1"], ["m0", "a2.h1<q>", "logits"])],
}


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("kind", ["resample", "zero"])
def test_multi_receiver_path_patch_equals_the_slow_reference(tiny_models, name, kind):
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=9)
    engine = PatchingEngine(model)
    corrupted = engine.sender_outputs(data.corrupted)
    ablated = corrupted if kind == "resample" else torch.zeros_like(corrupted)
    cases = CASES[name]
    got = cf.path_patch(engine, data, [s for s, _ in cases], [r for _, r in cases],
                        ablation=kind)
    for (senders, receivers), value in zip(cases, got.tolist()):
        want = _slow_path_patch(model, engine, data, senders, receivers, ablated)
        assert abs(want) > 1e-5  # a real effect, far above the tolerance
        assert value == pytest.approx(want, abs=1e-8)
    # freezing matters: without it, a receiver also sees the change of an earlier receiver
    keep, _ = cf.patching.paths.path_masks(
        engine.graph, [(cf.patching.paths.sender_indices(engine.graph, s),
                        cf.patching.paths.receiver_indices(engine.graph, r)) for s, r in cases])
    plain = engine.evaluate(data, keep, ablation=kind) - engine.evaluate(
        data, engine.graph.full_mask(), ablation=kind)
    assert (plain - got).abs().max() > 1e-4


def test_node_names_qkv_and_batching(tiny_models):
    model = tiny_models("llama_gqa")  # 4 query heads, 2 key/value heads
    data = ToyTask().build(model.tokenizer, 3, seed=2)
    engine = PatchingEngine(model)
    both = cf.path_patch(engine, data, "a0.h1", ["a1.h3"], qkv="kv")
    named = cf.path_patch(engine, data, ["a0.h1"], ["a1.kv1<k>", "a1.kv1<v>"])
    torch.testing.assert_close(both, named)
    batch = cf.path_patch(engine, data, [["a0.h1"], ["m0"], ["input", "a0.h0"]],
                          ["a1.h3", "logits"])
    one = torch.cat([cf.path_patch(engine, data, s, ["a1.h3", "logits"])
                     for s in (["a0.h1"], ["m0"], ["input", "a0.h0"])])
    assert batch.shape == (3,)
    assert_close(model, batch, one, 1e-10)


@pytest.mark.parametrize("senders, receivers, kwargs, error, message", [
    ("a0.h9", "logits", {}, UnknownNameError, "Closest: a0.h"),
    ("a0.h1", "a1.h0<x>", {}, UnknownNameError, "a1.h0<"),
    ("logits", "m1", {}, UnknownNameError, "no output"),
    ("a0.h1", "input", {}, UnknownNameError, "reads nothing"),
    ("a1.h0", "a0.h1", {}, ConfigError, "upstream"),
    ("a0.h1", "a1.h0", {"qkv": "qx"}, ConfigError, "distinct letters"),
    ([["a0.h1"], ["m0"]], [["m1"], ["m1"], ["logits"]], {}, ConfigError, "equally many"),
    ([], "m1", {}, ConfigError, "non-empty"),
])
def test_bad_names_are_one_clear_error(tiny_models, senders, receivers, kwargs, error, message):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 2, seed=0)
    with pytest.raises(error, match=message):
        cf.path_patch(model, data, senders, receivers, **kwargs)


@pytest.mark.parametrize("name, qkv", [("gpt2", "qkv"), ("llama_gqa", "q")])
def test_path_patching_algorithm_follows_its_procedure(tiny_models, name, qkv):
    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 4, seed=9)
    engine = PatchingEngine(model)
    g = engine.graph
    algo = cf.get_algorithm("path-patching", threshold=0.03, qkv=qkv)
    circuit = algo.discover(engine, data)
    info = circuit.metadata["path_patching"]
    full, empty = engine.evaluate(data, torch.stack([g.full_mask(), torch.zeros_like(g.full_mask())]))
    tau = 0.03 * abs(float(full - empty))
    assert info["threshold_abs"] == pytest.approx(tau)
    exact = ExactPatching(progress=False).score(engine, data)
    expanded, frontier, want_kept = {"logits"}, ["logits"], set()
    assert len(info["levels"]) >= 2
    for level in info["levels"]:
        # the receivers: inputs of the previous level's new nodes, as qkv selects
        want_receivers = [g.receivers[r].name for r in
                          cf.patching.paths.receiver_indices(g, frontier, qkv)]
        assert level["receivers"] == want_receivers
        n_up = max(int(g.n_upstream[g.receiver_index(r)]) for r in want_receivers)
        senders = [g.senders[u].name for u in range(n_up)]
        effects = cf.path_patch(engine, data, [[s] for s in senders], [want_receivers])
        selected = {s: e for s, e in zip(senders, effects.tolist()) if abs(e) > tau}
        assert level["senders"].keys() == selected.keys()
        for s, e in selected.items():
            assert level["senders"][s] == pytest.approx(e, abs=1e-9)
        for s in selected:
            u = g.node_index(s)
            want_kept |= {(u, g.receiver_index(r)) for r in want_receivers
                          if u < int(g.n_upstream[g.receiver_index(r)])}
        frontier = [s for s in selected if s != "input" and s not in expanded]
        expanded.update(frontier)
    assert not frontier or len(info["levels"]) == algo.max_depth
    assert {tuple(p) for p in circuit.kept.nonzero().tolist()} == want_kept
    torch.testing.assert_close(circuit.scores[circuit.kept], exact[circuit.kept], atol=1e-6,
                               rtol=0)
    assert (algo.score(engine, data)[~circuit.kept] == 0).all()
    shallow = cf.get_algorithm("path_patching", threshold=0.03, qkv=qkv, max_depth=1)
    assert len(shallow.discover(engine, data).metadata["path_patching"]["levels"]) == 1


def test_discover_and_cli_run_path_patching(tiny_models, tmp_path, monkeypatch, capsys):
    model = tiny_models("gpt2")
    data = ToyTask(positions=2).build(model.tokenizer, 4, seed=9)
    circuit = cf.discover(model, data=data, algorithm="path_patching", threshold=0.03,
                          ablation="zero", prune=False)
    assert circuit.metadata["algorithm_params"]["threshold"] == 0.03
    assert circuit.metadata["selection"] == {"method": "path_patching"}
    assert circuit.metadata["ablation"] == {"kind": "zero"}
    direct = cf.get_algorithm("path_patching", threshold=0.03).discover(
        PatchingEngine(model, ablation="zero"), data)
    assert torch.equal(circuit.kept, direct.kept) and circuit.n_edges > 0
    with pytest.raises(ConfigError, match="instead of n_edges"):
        cf.discover(model, data=data, algorithm="path_patching", n_edges=10)
    with pytest.raises(ConfigError, match="conflicts"):
        cf.discover(model, data=data, algorithm="path_patching", threshold=0.1,
                    algorithm_params={"threshold": 0.2})
    with pytest.raises(ConfigError, match="'threshold' parameter"):
        cf.get_algorithm("path_patching", threshold=0)
    with pytest.raises(ConfigError, match="distinct letters"):
        cf.get_algorithm("path_patching", qkv="z")


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_frozen_edges_equal_the_patching_equation_in_hooks(tiny_models, name):
    """The runner's ``frozen`` (any masks, binary and fractional, batched, several start layers)
    against the equation applied receiver by receiver in hooks on the bridge."""
    from bridge_reference import patched_run

    model = tiny_models(name)
    data = ToyTask(positions=2).build(model.tokenizer, 3, seed=6)
    engine = PatchingEngine(model)
    g = engine.graph
    clean_out = engine.sender_outputs(data.clean)
    corrupted = engine.sender_outputs(data.corrupted)
    gen = torch.Generator().manual_seed(3)
    real = g.edge_mask.double()
    rand = lambda: torch.rand(g.n_senders, g.n_receivers, generator=gen, dtype=torch.float64)  # noqa: E731
    removed, frozen = [], []
    for fractional in (False, False, True):
        r = (rand() < 0.3).double() * real
        f = (rand() < 0.4).double() * real * (1 - r)
        if fractional:
            r, f = r * rand(), f * rand()
        removed.append(r)
        frozen.append(f)
    masks, frozen_t = 1 - torch.stack(removed), torch.stack(frozen)
    got = engine.run(data, masks, frozen=frozen_t)
    for k in range(3):
        want = patched_run(model, g, data, removed[k], frozen[k], corrupted, clean_out)
        assert_close(model, got[k], want, 1e-8)
    unfrozen = engine.run(data, masks)
    assert (unfrozen - got).abs().max() > 1e-3  # freezing changes the result
    # removed and frozen edges only into the last layer's receivers: every start layer up to
    # it gives the same logits (frozen senders of that layer are recomputed per mask)
    late = torch.tensor([rec.layer >= g.n_layers - 1 for rec in g.receivers]).double()
    late_masks, late_frozen = 1 - (1 - masks) * late, frozen_t * late
    reference = engine.run(data, late_masks, frozen=late_frozen, start=0)
    assert (reference - engine.run(data, late_masks, start=0)).abs().max() > 1e-4
    for start in range(1, g.n_layers):
        assert_close(model, engine.run(data, late_masks, frozen=late_frozen, start=start),
                                   reference, 1e-9)
