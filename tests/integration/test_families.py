"""Every model family on the block runner, against plain Hugging Face.

Tiny random models of each family are built in the test from ``transformers`` configs (no
download), with the family's own features switched on (:data:`FAMILY_CONFIGS`). For each:

- the runner's logits equal the Hugging Face model's (float32 and float64);
- removing every out-edge of a node equals replacing that node's output with its corrupted
  value by plain PyTorch hooks on the Hugging Face modules (the identity that defines an edge);
- the engine takes the runner (no fallback warning).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from circuitfind.patching import PatchingEngine
from circuitfind.testing import ToyTask, tiny_model
from tolerances import EPS32, ULPS, assert_close, atol_for, float32_atol

# family -> tiny-model settings; adding a family = one entry here and its adapter module
FAMILIES = {
    "gpt_neox": dict(arch="gpt_neox", n_layers=3, seed=7),  # parallel attention and MLP
    "gpt_neox_seq": dict(arch="gpt_neox_seq", n_layers=3, seed=8),
    "llama": dict(arch="llama", n_layers=3, n_kv_heads=2, seed=3),
    "llama3": dict(arch="llama3", n_layers=2, n_kv_heads=2, seed=10),  # rope scaling
    "mistral": dict(arch="mistral", n_layers=3, n_kv_heads=2, seed=4),
    "qwen2": dict(arch="qwen2", n_layers=3, n_kv_heads=2, seed=5),
    "qwen3": dict(arch="qwen3", n_layers=3, n_kv_heads=2, seed=6),
    "gemma2": dict(arch="gemma2", n_layers=3, n_kv_heads=2, seed=9),
}
# families whose heads' sum passes a norm: the bridge's hooked path adds head differences
# linearly after that norm, so it is no reference for their head edges (tests/integration/
# test_post_norm.py holds theirs, written with plain hooks on the Hugging Face modules)
POST_NORM = {"gemma2"}
SEQ = 9  # longer than the sliding windows (4), so that windows are exercised


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """(family, dtype) -> TransformerBridge of the tiny model, built lazily."""
    cache: dict[tuple[str, torch.dtype], object] = {}

    def get(name: str, dtype: torch.dtype = torch.float64):
        if (name, dtype) not in cache:
            path = tmp_path_factory.mktemp(f"{name}-{str(dtype)[6:]}")
            cache[name, dtype] = tiny_model(path, dtype=dtype, **FAMILIES[name])
        return cache[name, dtype]

    return get


def _plain_hf(model):
    """A separately loaded plain Hugging Face model of ``model`` (eager attention)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model.cfg.model_name, dtype=model.cfg.dtype,
                                                attn_implementation="eager").eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_runner_logits_equal_hugging_face(family_models, name, dtype):
    model = family_models(name, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
        engine = PatchingEngine(model)
    assert engine.runner is not None
    tokens = torch.randint(3, 64, (3, SEQ), generator=torch.Generator().manual_seed(0))
    ours = engine.runner.logits(tokens)
    with torch.no_grad():
        plain = _plain_hf(model)(tokens).logits
    assert float(plain.abs().max()) > 0.1
    # every family here rounds through float32 steps (tests/tolerances.py)
    torch.testing.assert_close(ours, plain, atol=atol_for(model, plain), rtol=0)


def _modules(hf):
    """``(embedding, [attention output projection], [MLP output module])`` of a plain HF model:
    the modules whose input (heads) or output (embedding, MLP) a node patch replaces."""
    body = getattr(hf, "model", None) or getattr(hf, "gpt_neox")
    layers = body.layers
    embed = getattr(body, "embed_tokens", None) or getattr(body, "embed_in")
    o_proj = [getattr(b, "self_attn", None) or getattr(b, "attention") for b in layers]
    o_proj = [getattr(a, "o_proj", None) or getattr(a, "dense") for a in o_proj]
    # the MLP node's output is what enters the residual stream (after a post-MLP norm if any)
    mlp = [getattr(b, "post_feedforward_layernorm", None) or b.mlp for b in layers]
    return embed, o_proj, mlp


def _node_patched_metric(hf, data, node: str, d_head: int):
    """Mean metric of plain HF on the clean prompts with ``node``'s output replaced by its value
    on the corrupted prompts (plain forward hooks; the slow, obviously correct reference)."""
    embed, o_proj, mlp = _modules(hf)
    if node == "input":
        module, kind = embed, "out"
    elif node.startswith("m"):
        module, kind = mlp[int(node[1:])], "out"
    else:
        layer, head = (int(p[1:]) for p in node.split("."))
        module, kind = o_proj[layer], "in"
    saved = {}

    def save(mod, args, out=None):
        saved["v"] = (args[0] if kind == "in" else out).detach().clone()

    h = (module.register_forward_pre_hook(save) if kind == "in"
         else module.register_forward_hook(save))
    with torch.no_grad():
        hf(data.corrupted)
    h.remove()
    corrupted = saved["v"]

    if kind == "in":
        sl = slice(head * d_head, (head + 1) * d_head)

        def patch(mod, args):
            x = args[0].clone()
            x[..., sl] = corrupted[..., sl]
            return (x, *args[1:])
        h = module.register_forward_pre_hook(patch)
    else:
        h = module.register_forward_hook(lambda mod, args, out: corrupted)
    try:
        with torch.no_grad():
            logits = hf(data.clean).logits
    finally:
        h.remove()
    idx = data.positions[:, :, None].expand(-1, -1, logits.shape[-1])
    return data.metric(logits.gather(1, idx)).double().mean()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_removing_every_out_edge_of_a_node_equals_patching_the_node(family_models, name):
    model = family_models(name)
    hf = _plain_hf(model)
    data = ToyTask(seq_len=SEQ - 1).build(model.tokenizer, 3, seed=7)
    engine = PatchingEngine(model)
    g = engine.graph
    full = g.full_mask(torch.float64)
    nodes = [node.name for node in g.senders]
    masks = full.expand(len(nodes), -1, -1).clone()
    for i in range(len(nodes)):
        masks[i, i] = 0  # every out-edge of sender i removed
    got = engine.evaluate(data, masks)  # [nodes] mean metric
    d_head = getattr(hf.config, "head_dim", None) or hf.config.hidden_size // g.n_heads
    want = torch.stack([_node_patched_metric(hf, data, node, d_head) for node in nodes])
    torch.testing.assert_close(got.double(), want, atol=atol_for(model, want), rtol=0)
    assert float((want - want.mean()).abs().max()) > 1e-3  # nodes differ: the check has teeth


def _linear_only(name: str) -> None:
    if name in POST_NORM:
        pytest.skip(f"{name}: the hooked reference is linear in head outputs; see "
                    "test_post_norm.py")


def _engines(model, seed: int, ablation: str = "resample"):
    """Data (3 examples, 2 metric positions), the runner and the bridge's hooked engine (the
    slow reference: receiver inputs patched by transformer-lens hooks), a generator and each
    receiver's layer."""
    data = ToyTask(seq_len=SEQ - 1, positions=2).build(model.tokenizer, 3, seed=seed)
    runner = PatchingEngine(model, ablation=ablation)
    hooked = PatchingEngine(model, use_runner=False, ablation=ablation)
    layer_of = torch.tensor([rec.layer for rec in runner.graph.receivers])
    return data, runner, hooked, torch.Generator().manual_seed(seed), layer_of


def _close(got, want):
    """``got == want`` up to the float32 rounding of Hugging Face's softmax and norms (every
    family here has them; GPT-2, float64 end to end, keeps float64 tolerances elsewhere)."""
    torch.testing.assert_close(got, want, atol=float32_atol(want), rtol=0)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_single_edge_equals_the_hooked_reference(family_models, name):
    """Each edge removed alone, batched through the runner (each pass starting at its receiver's
    layer), equals the bridge's full forward with that edge patched by a hook."""
    _linear_only(name)
    data, runner, hooked, _, _ = _engines(family_models(name), 1)
    g = runner.graph
    masks = g.full_mask(torch.float64).expand(g.n_edges, -1, -1).clone()
    pairs = g.edge_pairs
    masks[torch.arange(g.n_edges), pairs[:, 0], pairs[:, 1]] = 0
    got, want = runner.run(data, masks), hooked.run(data, masks)
    _close(got, want)
    moved = (want - hooked.run(data, g.full_mask(torch.float64))).abs().amax((1, 2, 3))
    assert int((moved > 1e-6).sum()) > g.n_edges // 2  # most edges matter: the check has teeth


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
def test_random_circuits_equal_the_hooked_reference(family_models, name, ablation):
    """Dense, sparse (kept form) and ACDC-like masks, from every start layer, batched and one at
    a time, under every ablation kind."""
    _linear_only(name)
    data, runner, hooked, gen, layer_of = _engines(family_models(name), 2, ablation)
    g = runner.graph
    edge = g.edge_mask.double()
    for layer in range(g.n_layers + 1):
        masks = torch.stack([(torch.rand(edge.shape, generator=gen, dtype=torch.float64) < p)
                             .double() for p in (0.1, 0.5, 0.9)])
        at_layer = (layer_of == layer).nonzero()[:, 0].tolist()
        acdc = g.full_mask(torch.float64)  # one edge into one receiver of this layer
        if at_layer:
            acdc[0, at_layer[0]] = 0
        masks = torch.cat([masks, acdc[None]]) * edge
        masks[:, :, layer_of < layer] = edge[:, layer_of < layer]
        got = runner.run(data, masks)
        _close(got, hooked.run(data, masks))
        _close(torch.cat([runner.run(data, m) for m in masks]), got)
        if layer < g.n_layers:
            _close(runner.run(data, masks, start=0), got)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_eap_and_exact_scores_equal_the_hooked_reference(family_models, name):
    """EAP through the runner's backward = EAP with the bridge's split inputs; exact patching
    (layer-grouped runner passes) = exact patching on the hooked forward."""
    _linear_only(name)
    from circuitfind.algorithms import ExactPatching

    data, runner, hooked, _, _ = _engines(family_models(name), 3)
    fast, slow = runner.edge_attribution(data), hooked.edge_attribution(data)
    assert slow.abs().max() > 1e-2
    _close(fast, slow)
    fast = ExactPatching(progress=False).score(runner, data)
    slow = ExactPatching(progress=False).score(hooked, data)
    assert slow.abs().max() > 1e-2
    _close(fast, slow)


@pytest.mark.parametrize("name", ["gpt2", *sorted(FAMILIES)])
def test_gradient_points_on_the_runner_equal_the_hooked_reference(family_models, tiny_models,
                                                                  name):
    """EAP-IG (inputs and activations, several points per pass and one at a time) and
    clean-corrupted through the runner's stacked copies = through the bridge's hooks."""
    from circuitfind.algorithms.eap_ig import activation_points, input_points
    from circuitfind.patching.engine import GradientPoint

    _linear_only(name)
    model = tiny_models("gpt2") if name == "gpt2" else family_models(name)
    data, runner, hooked, _, _ = _engines(model, 4)
    g = runner.graph
    for points in (input_points(g, 3), activation_points(g, 2),
                   [GradientPoint(1.0), GradientPoint(0.0)]):
        slow = hooked.edge_attribution(data, points=points)
        assert slow.abs().max() > 1e-2
        _close(runner.edge_attribution(data, points=points), slow)
        _close(runner.edge_attribution(data, points=points, batch_size=1), slow)
    # one point per pass (as a small memory budget would plan it): chunks of points, each
    # its own runner pass, summed
    runner.attribution_plan = (lambda n, seq_len, n_points=1, batch_size=None,
                                 positions=1: (n, 1, False))
    _close(runner.edge_attribution(data, points=input_points(g, 4)),
           hooked.edge_attribution(data, points=input_points(g, 4)))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_discover_from_the_cli_runs_on_the_runner(family_models, run, tmp_path, name):
    """``circuitfind discover`` on each family's tiny model (a prompt file of its words) takes
    the block runner: no fallback warning, a circuit and its faithfulness."""
    import json

    model = family_models(name, torch.float32)
    gen = torch.Generator().manual_seed(0)
    words = lambda k: " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (k,), generator=gen))  # noqa: E731
    rows = [{"clean": words(7), "corrupted": words(7), "answer": " w1", "wrong": " w2"}
            for _ in range(4)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run("discover", "--model", str(model.cfg.model_name), "--task", str(prompts),
                     "--algorithm", "eap", "--edges", "10", "--out", str(tmp_path / "run"),
                     "--renderer", "matplotlib")
    assert result.returncode == 0, result.stderr
    messages = [str(w.message) for w in caught] + [result.stdout + result.stderr]
    assert not any("fall back" in m for m in messages), messages
    saved = json.loads((tmp_path / "run" / "circuit.json").read_text())
    assert saved["metadata"]["algorithm"] == "eap"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_acdc_exact_mode_equals_sequential_acdc_and_resumes(family_models, tmp_path, name):
    """ACDC's exact mode (passes from the receiver's layer, speculative batches, kept form)
    makes the decisions of a sequential one-hooked-forward-per-test ACDC; a run killed in the
    middle resumes to the identical circuit. For post-norm families the sequential reference
    runs one runner pass per test (the hooked forward is linear in head outputs; the runner's
    single passes are pinned to plain Hugging Face in test_post_norm.py)."""
    from test_acdc import _check_equal, slow_acdc

    from circuitfind.algorithms import ACDC, RunContext

    model = family_models(name)
    data = ToyTask(seq_len=SEQ - 1).build(model.tokenizer, 3, seed=1)
    engine = PatchingEngine(model)
    # τ clear of every measured effect (the test checks it)
    tau = {"qwen3": 1.3e-3, "gpt_neox": 1.3e-3, "llama3": 1.3e-3}.get(name, 1e-3)
    algo = ACDC(threshold=tau, progress=False)
    original, calls = engine.run, {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    engine.run = counted
    circuit = algo.discover(engine, data)
    engine.run = original
    # killed halfway through (the number of passes follows measured pass times: count them)
    total = calls["n"]
    assert total >= 3  # the first pass caches, so a kill at pass 2..total-1 is mid-run
    kill_at, calls["n"] = max(2, total // 2), 0
    reference = slow_acdc(model, data, tau, engine=PatchingEngine(model) if name in POST_NORM
                          else None)
    assert 0 < int(reference[0].sum()) < engine.graph.n_edges and int(reference[1].sum()) > 10
    # effects are KL divergences (nats) computed through float32 softmaxes
    _check_equal(circuit, reference, tau, atol=atol_for(model, reference[2]))
    ckpt = tmp_path / "acdc.pt"

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    engine.run = killed
    with pytest.raises(KeyboardInterrupt):
        algo.discover(engine, data, RunContext(checkpoint=ckpt, progress=False))
    engine.run = original
    resumed = algo.discover(engine, data, RunContext(checkpoint=ckpt, progress=False))
    assert torch.equal(resumed.kept, circuit.kept)
    # a resumed run batches its passes differently: equal to the float32 steps' rounding
    assert_close(model, resumed.scores, circuit.scores)


@pytest.mark.parametrize("name, feature", [
    ("qwen3", "qk_norm"), ("mistral", "window"), ("qwen2", "window"), ("gpt_neox", "parallel"),
    ("gpt_neox", "rotate"), ("gemma2", "attn_softcap"), ("gemma2", "final_softcap"),
    ("gemma2", "embed_scale"), ("gemma2", "post_norm"), ("gemma2", "window")])
def test_dropping_a_family_feature_from_its_adapter_is_caught(family_models, name, feature):
    """Mutation check: an adapter without its q/k norm, sliding window, parallel wiring,
    (partial) rotary, soft-caps, embedding scale or post-attention norm no longer matches
    Hugging Face, so the tests above would fail."""
    model = family_models(name)
    engine = PatchingEngine(model)
    arch = engine.runner.arch
    dropped = {"qk_norm": lambda layer, q, k, scratch=False: (q, k), "window": lambda layer: None,
               "parallel": False, "rotate": lambda q, k, spans=None: (q, k), "attn_softcap": None,
               "final_softcap": None, "embed_scale": 1.0,
               "post_norm": lambda layer, x: x}[feature]
    setattr(arch, feature, dropped)
    tokens = torch.randint(3, 64, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = _plain_hf(model)(tokens).logits
    ours = engine.runner.logits(tokens)
    assert (ours - plain).abs().max() > 100 * ULPS * EPS32 * plain.abs().max()
