"""Every family x dtype x ablation through every masked-pass strategy, against slow references.

An audit of the runner's fast paths (``patching/masked_pass.py``, ``post_norm_pass.py``): the
other tests pin each strategy on some families; here one data set with the awkward features
turned on runs through all of them on every family of :data:`FAMILY_CONFIGS` (and GPT-2), in
float32 and float64, under resample and zero ablation (and mean ablation on three families):

- prompts right-padded to different lengths, clean and corrupted lengths differing within an
  example (both ways), two metric positions per example in different orders, the longest
  prompt (11 tokens) longer than the sliding windows (4 tokens; Mistral, Qwen2, Gemma-2's local
  layers);
- strategies: one mask alone, many masks in one pass (dense layers, the shared path, the
  sparse start layer of ACDC-like masks, the kept form of sparse circuits), examples one at a
  time (chunked passes), an ACDC-like sequence of kept-form passes that changes one receiver
  at a time (memo hits; every batch run twice), frozen edges (path patching);
- references: for the linear families the patching equation applied receiver by receiver in
  hooks on the bridge (``bridge_reference.patched_run``); for Gemma-2 (post-norm) every
  receiver rebuilt by hooks on plain Hugging Face (``test_post_norm.reference_logits``). The
  ablation values are taken here from their definitions (the corrupted prompts' own real
  tokens for the means), not from the engine.

Masks keep, for every receiver, its input edge and one head of every earlier layer (except
the empty circuit and the one-edge-removed masks): the references apply eq. (1) as written, so
a receiver whose every incoming edge is zero-ablated reads a difference of equal sums there,
whose rounding its norm amplifies by up to ``1/sqrt(eps)``; the engine reads the fully ablated
run instead, checked against float64 twins in ``test_fully_zero_ablated_receivers_are_exact``.
"""

from __future__ import annotations

import pytest
import torch

from circuitfind.patching import PatchingEngine
from circuitfind.tasks.base import TaskData
from circuitfind.testing import ToyTask, tiny_model
from bridge_reference import bridge_senders, patched_run
from test_families import FAMILIES, POST_NORM
from tolerances import EPS32, FLOAT32_MODEL_ULPS, assert_close, float32_atol

ALL = {"gpt2": dict(arch="gpt2", n_layers=3, seed=11), **FAMILIES}
DTYPES = {"f32": torch.float32, "f64": torch.float64}
CLEAN_LENGTHS, CORRUPTED_LENGTHS = [11, 5, 8], [7, 11, 8]  # with BOS; window 4


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """(family, dtype) -> (bridge, plain HF model of the same weights), built lazily."""
    cache: dict[tuple[str, torch.dtype], tuple] = {}

    def get(name: str, dtype: torch.dtype):
        if (name, dtype) not in cache:
            path = tmp_path_factory.mktemp(f"{name}-{str(dtype)[6:]}")
            model = tiny_model(path, dtype=dtype, **ALL[name])
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, attn_implementation="eager").eval()
            cache[name, dtype] = model, hf
        return cache[name, dtype]

    return get


def padded_data(clean_lengths: list[int], corrupted_lengths: list[int], seed: int,
                vocab: int = 64) -> TaskData:
    """Random word prompts right-padded to the longest (BOS 0; padded with id 2, not the
    tiny models' pad id 1, whose embedding row Hugging Face initialises to zero: the norm of a
    zero vector has a derivative of ``1/sqrt(eps)``, so EAP-IG's corrupted end point would
    score edges in millions where a corrupted prompt is padded at a metric position); metric
    positions at each clean prompt's last token and two before it (second column first where
    the prompt is short)."""
    gen = torch.Generator().manual_seed(seed)
    n, t = len(clean_lengths), max(clean_lengths + corrupted_lengths)

    def prompts(lengths):
        out = torch.full((n, t), 2, dtype=torch.long)
        for i, length in enumerate(lengths):
            out[i, 0] = 0
            out[i, 1:length] = torch.randint(3, vocab, (length - 1,), generator=gen)
        mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
        return out, mask

    (clean, mask_c), (corrupted, mask_x) = prompts(clean_lengths), prompts(corrupted_lengths)
    last = torch.tensor(clean_lengths) - 1
    positions = torch.stack([last, (last - 2).clamp_min(0)], 1)
    positions[last < 6] = positions[last < 6].flip(1)  # metric positions in either order
    answers = torch.randint(3, vocab, (n, 2), generator=gen)
    return TaskData(task=ToyTask(), clean=clean, corrupted=corrupted, positions=positions,
                    answers=answers[:, :1], wrong_answers=answers[:, 1:],
                    attention_mask=mask_c, corrupted_attention_mask=mask_x,
                    clean_prompts=[""] * n, corrupted_prompts=[""] * n, seed=seed)


def senders(model, hf, g, tokens, post_norm: bool) -> torch.Tensor:
    """Sender outputs from the reference's own model (plain HF for post-norm families)."""
    if post_norm:
        from test_post_norm import _captures

        return _captures(hf, tokens, g)
    return bridge_senders(model, g, tokens)


def ablation_values(kind: str, corrupted: torch.Tensor, data: TaskData) -> torch.Tensor:
    """``[S, N|1, T|1, d]`` from the definitions in ``patching/spec.py``, over the corrupted
    prompts' own real tokens."""
    if kind == "resample":
        return corrupted
    if kind == "zero":
        return torch.zeros_like(corrupted[:, :1, :1])
    real = data.corrupted_attention_mask.to(corrupted.dtype)[None, :, :, None]
    return (corrupted * real).sum((1, 2), keepdim=True) / real.sum()


class Reference:
    """Slow logits ``[N, P, V]`` of one mask (and optional frozen edges) on one family."""

    def __init__(self, name, model, hf, g, data, kind):
        self.model, self.hf, self.g, self.data = model, hf, g, data
        self.post_norm = name in POST_NORM
        self.clean = senders(model, hf, g, data.clean, self.post_norm)
        self.ablated = ablation_values(kind, senders(model, hf, g, data.corrupted,
                                                     self.post_norm), data)
        self.edge = g.edge_mask.to(model.cfg.dtype)

    def __call__(self, mask, frozen=None):
        removed = (self.edge - mask) * self.edge
        frozen = torch.zeros_like(removed) if frozen is None else frozen * self.edge
        ablated = self.ablated.expand(-1, self.data.n, self.data.seq_len, -1)
        if not self.post_norm:
            return patched_run(self.model, self.g, self.data, removed, frozen, ablated,
                               self.clean)
        from test_post_norm import _at, reference_logits

        with torch.no_grad():
            return _at(reference_logits(self.hf, self.g, self.data.clean, removed, ablated,
                                        frozen=frozen, clean=self.clean), self.data)


def _upstream_groups(g, r):
    """Receiver ``r``'s input sender and the head indices of each layer before it."""
    rec = g.receivers[r]
    upto = rec.layer + 1 if rec.kind in ("mlp", "logits") else rec.layer
    return [[0]] + [list(range(g.head_start[layer], g.head_start[layer] + g.n_heads))
                    for layer in range(min(upto, g.n_layers))]


def conditioned(g, mask, gen):
    """``mask`` with, for every receiver, its input edge and one random head of every earlier
    layer kept (no receiver, and no post-norm mixture, reads only zero-ablated values)."""
    mask = mask.clone()
    for r in range(g.n_receivers):
        for group in _upstream_groups(g, r):
            if not bool(mask[group, r].any()):
                mask[group[int(torch.randint(len(group), (1,), generator=gen))], r] = 1
    return mask * g.edge_mask.to(mask)


def still_conditioned(g, mask, r):
    """Whether receiver ``r`` keeps an edge from its input and from every earlier layer."""
    return all(bool(mask[group, r].any()) for group in _upstream_groups(g, r))


def random_mask(g, p, gen, dtype):
    return (torch.rand(g.edge_mask.shape, generator=gen) < p).to(dtype) * g.edge_mask.to(dtype)


def acdc_like(g, layer, dtype, which=0):
    """The full circuit minus one edge into the first receiver of ``layer`` (the ``which``-th
    of its upstream senders, from the last)."""
    mask = g.edge_mask.to(dtype).clone()
    r = [i for i, rec in enumerate(g.receivers) if rec.layer == layer][0]
    mask[max(0, int(g.n_upstream[r]) - 1 - which), r] = 0
    return mask


def check(model, got, want):
    assert_close(model, got, want, float64=1e-9)


# the mean ablation differs from zero only in its values (one vector per sender, broadcast
# alike): on three families (LayerNorm, RMSNorm with grouped queries, post-norms) in float64
CASES = [(name, dtype, kind) for name in sorted(ALL) for dtype in sorted(DTYPES)
         for kind in ("resample", "zero", "mean")
         if kind != "mean" or (dtype == "f64" and name in ("gpt2", "llama", "gemma2"))]


@pytest.mark.parametrize("name, dtype, kind", CASES)
def test_every_strategy_equals_the_slow_reference(setups, name, dtype, kind):
    dtype = DTYPES[dtype]
    model, hf = setups(name, dtype)
    data = padded_data(CLEAN_LENGTHS, CORRUPTED_LENGTHS, seed=1)
    engine = PatchingEngine(model, ablation=kind)
    g = engine.graph
    ref = Reference(name, model, hf, g, data, kind)
    gen = torch.Generator().manual_seed(5)
    full, empty = g.edge_mask.to(dtype), torch.zeros_like(g.edge_mask, dtype=dtype)

    # one dense mask alone ([S, R]: the single-mask pass)
    one = conditioned(g, random_mask(g, 0.5, gen, dtype), gen)
    check(model, engine.run(data, one)[0], ref(one))

    # many masks in one pass: dense, sparse (kept form), empty, full, one edge removed at
    # every layer (sparse start layer), then examples one at a time
    many = [conditioned(g, random_mask(g, p, gen, dtype), gen) for p in (0.3, 0.9, 0.05)]
    many += [empty, full] + [acdc_like(g, layer, dtype, which)
                             for layer in range(g.n_layers + 1)
                             for which in ((0, 2) if layer == 1 else (1,))]
    many = torch.stack(many)
    want = torch.stack([ref(m) for m in many])
    check(model, engine.run(data, many), want)
    check(model, engine.run(data, many, batch_size=1), want)
    for i in (2, 6):  # a sparse circuit (kept form) and a one-edge mask alone
        check(model, engine.run(data, many[i])[0], want[i])
    moved = (want - want[4]).abs().amax((1, 2, 3))
    assert int((moved > 1e-6).sum()) >= len(many) - 2  # the masks change the logits

    # ACDC-like sequence: receivers visited from the logits down, each tested by removing one
    # of its edges at a time against a circuit already sparse in later layers (kept form;
    # memo hits: each batch run twice, consecutive batches differ in one receiver)
    base = full.clone()
    layer_of = torch.tensor([rec.layer for rec in g.receivers])
    sparse = conditioned(g, random_mask(g, 0.15, gen, dtype), gen)
    for layer in range(g.n_layers, -1, -1):
        # the logits, the MLP of layer 0 (its q/k/v read only the input), else a query
        r = int((layer_of == layer).nonzero()[-1 if layer in (0, g.n_layers) else 0])
        ups = [u for u in range(int(g.n_upstream[r]))][-2:]
        cands = base.expand(len(ups), -1, -1).clone()
        for i, u in enumerate(ups):
            cands[i, u, r] = 0
        want = torch.stack([ref(c) for c in cands])
        check(model, engine.run(data, cands), want)
        check(model, engine.run(data, cands), want)
        base[:, layer_of == layer] = sparse[:, layer_of == layer]  # the layer's decisions

    # frozen edges (path patching): kept edges carrying their clean value
    frozen = random_mask(g, 0.4, gen, dtype) * many[:2]
    check(model, engine.run(data, many[:2], frozen=frozen), torch.stack(
        [ref(m, f) for m, f in zip(many[:2], frozen)]))


@pytest.mark.parametrize("kind", ["mean", "mean_positional"])
def test_mean_ablations_average_the_corrupted_prompts_own_real_tokens(setups, kind):
    """Where clean and corrupted prompts have different lengths (prompt files), the means run
    over the corrupted prompts' real tokens (``corrupted_attention_mask``), not the clean
    prompts' (which counted corrupted padding and dropped real corrupted tokens)."""
    model, _ = setups("llama", torch.float64)
    data = padded_data(CLEAN_LENGTHS, CORRUPTED_LENGTHS, seed=2)
    engine = PatchingEngine(model)
    corrupted = bridge_senders(model, engine.graph, data.corrupted)
    real = data.corrupted_attention_mask.double()[None, :, :, None]
    want = ((corrupted * real).sum((1, 2), keepdim=True) / real.sum() if kind == "mean"
            else (corrupted * real).sum(1, keepdim=True) / real.sum(1, keepdim=True))
    assert_close(model, engine.ablation_values(data, kind), want)


def alone(data: TaskData, i: int) -> TaskData:
    """Example ``i`` by itself, cut to its own clean and corrupted lengths (no padding beyond
    the longer of the two)."""
    one = data.subset([i])
    t = int(max(one.attention_mask.sum(), one.corrupted_attention_mask.sum()))
    cut = {f: getattr(one, f)[:, :t] for f in ("clean", "corrupted", "attention_mask",
                                               "corrupted_attention_mask")}
    return TaskData(task=one.task, positions=one.positions, answers=one.answers,
                    wrong_answers=one.wrong_answers, clean_prompts=one.clean_prompts,
                    corrupted_prompts=one.corrupted_prompts, seed=one.seed, **cut)


def hf_logits_at(hf, tokens, positions) -> torch.Tensor:
    """Plain Hugging Face logits ``[P, V]`` of one token row ``[T]`` at ``positions [P]``."""
    with torch.no_grad():
        return hf(tokens[None]).logits[0, positions]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(ALL))
def test_full_and_empty_circuits_are_plain_hugging_face_runs(setups, name, dtype):
    """On padded prompts: the full circuit's logits are each clean prompt run alone by plain
    Hugging Face (no padding, no attention mask); the empty circuit's are the padded corrupted
    row's at the clean metric positions (position t receives corrupted position t);
    ``evaluate`` gives faithfulness exactly 1 for the full graph and 0 for the empty circuit,
    with the clean and corrupted metrics."""
    import circuitfind as cf
    from circuitfind.graphs.circuit import Circuit

    model, hf = setups(name, DTYPES[dtype])
    data = padded_data(CLEAN_LENGTHS, CORRUPTED_LENGTHS, seed=3)
    engine = PatchingEngine(model)
    g = engine.graph
    got = engine.run(data, torch.stack([g.full_mask(), torch.zeros_like(g.full_mask())]))
    lengths = data.attention_mask.sum(1).tolist()
    clean = torch.stack([hf_logits_at(hf, data.clean[i, :length], data.positions[i])
                         for i, length in enumerate(lengths)])
    corrupted = torch.stack([hf_logits_at(hf, data.corrupted[i], data.positions[i])
                             for i in range(data.n)])
    check(model, got[0], clean)
    check(model, got[1], corrupted)
    full = cf.evaluate(engine, Circuit.full(g), data)
    empty = cf.evaluate(engine, Circuit.empty(g), data)
    assert full.faithfulness == 1.0 and full.metric_circuit == full.metric_full
    assert empty.faithfulness == 0.0 and empty.metric_circuit == empty.metric_empty
    for report in (full, empty):
        assert_close(model, torch.tensor([report.metric_full, report.metric_empty],
                                         dtype=torch.float64),
                     torch.stack([data.metric(clean[None]), data.metric(corrupted[None])]
                                 ).double().mean(-1)[:, 0], scale=clean)
    assert float((clean - corrupted).abs().max()) > 1e-2  # the two runs differ


@pytest.mark.parametrize("name", sorted(ALL))
def test_one_example_of_one_token(setups, name):
    """Batch size 1 and sequence length 1 (the BOS token alone): masked passes equal the
    slow reference, and the full and empty circuits are the clean and corrupted runs."""
    model, hf = setups(name, torch.float64)
    data = padded_data([1], [1], seed=4)
    data = TaskData(**{**{f: getattr(data, f) for f in ("task", "answers", "wrong_answers",
                                                        "clean_prompts", "corrupted_prompts",
                                                        "seed", "attention_mask",
                                                        "corrupted_attention_mask")},
                       "clean": torch.tensor([[0]]), "corrupted": torch.tensor([[5]]),
                       "positions": torch.tensor([[0]])})
    gen = torch.Generator().manual_seed(1)
    g = PatchingEngine(model).graph
    masks = torch.stack([conditioned(g, random_mask(g, 0.5, gen, torch.float64), gen),
                         g.full_mask(), torch.zeros_like(g.full_mask())])
    for kind in ("resample", "zero"):
        engine = PatchingEngine(model, ablation=kind)
        ref = Reference(name, model, hf, g, data, kind)
        check(model, engine.run(data, masks), torch.stack([ref(m) for m in masks]))
        check(model, engine.run(data, masks[0]), ref(masks[0])[None])
    engine = PatchingEngine(model)
    ends = engine.run(data, masks[1:])
    check(model, ends[0, 0], hf_logits_at(hf, data.clean[0], data.positions[0]))
    check(model, ends[1, 0], hf_logits_at(hf, data.corrupted[0], data.positions[0]))


# AtP* without GradDrop: GradDrop takes |score| of the batch's mean per dropped layer, which
# is not the mean of each example's |score|
ALGORITHMS = {"eap": {}, "eap_ig": {}, "clean_corrupted": {}, "exact": {"progress": False},
              "atp_star": {"grad_drop": False}, "gim": {}, "relp": {}, "ifr": {}, "eap_gp": {}}


@pytest.mark.parametrize("name", sorted(ALL))
def test_attributions_on_padded_prompts_equal_each_example_alone(setups, name):
    """Scores on prompts padded to different lengths (clean and corrupted lengths differing
    both ways, metric positions in different orders) = the mean of each example scored alone
    (the metric is the batch mean): padding, per-example metric positions and the trimmed last
    block change nothing, for every gradient and patching method (EAP-GP: its default step
    length reads only the positions an example's metric depends on)."""
    from circuitfind.algorithms import get_algorithm

    model, _ = setups(name, torch.float64)
    data = padded_data(CLEAN_LENGTHS, CORRUPTED_LENGTHS, seed=6)
    engine = PatchingEngine(model)
    singles = [alone(data, i) for i in range(data.n)]
    for algorithm, params in ALGORITHMS.items():
        algo = get_algorithm(algorithm, **params)
        batched = algo.score(engine, data).double()
        each = torch.stack([algo.score(engine, one).double() for one in singles])
        assert batched.abs().max() > 1e-3, algorithm
        # float64 sums stored in float32: one rounding of the largest score each
        assert_close(model, batched, each.mean(0), float64=2 * EPS32 * float(each.abs().max()),
                     scale=each)


def fully_removed_masks(g, gen, dtype):
    """Masks that remove every edge into some receivers, through every pass strategy: all
    q (then all k) inputs of the layers after the first (the shared path); every receiver of
    those layers and the logits; every edge into them but their input's (each post-norm
    mixture of ablated heads only); a random half circuit with every third receiver removed
    (dense layers); one receiver of layer 1 of each kind per mask (the sparse start layer);
    sparse circuits (kept form) with a quarter of their receivers removed, the start layer's
    (removed form there) among them, one of those in one mask only."""
    layer_of = torch.tensor([rec.layer for rec in g.receivers])
    kinds = [rec.kind for rec in g.receivers]
    full = g.edge_mask.to(dtype)
    masks = []
    for pick in (("q",), ("k",), ("q", "k", "v", "mlp", "logits")):
        m = full.clone()
        m[:, torch.tensor([k in pick for k in kinds]) & (layer_of >= 1)] = 0
        masks.append(m)
    only_input = full.clone()  # every head of every layer removed (post-norm mixtures)
    only_input[1:, layer_of >= 1] = 0
    masks.append(only_input)
    dense = conditioned(g, random_mask(g, 0.5, gen, dtype), gen)
    dense[:, ::3] = 0
    masks.append(dense)
    for kind in ("q", "k", "v", "mlp"):
        m = full.clone()
        m[:, [r for r in range(g.n_receivers) if kinds[r] == kind and layer_of[r] == 1][0]] = 0
        masks.append(m)
    first, second = (layer_of == 1).nonzero()[:2, 0].tolist()
    for i in range(2):
        sparse = conditioned(g, random_mask(g, 0.1, gen, dtype), gen)
        sparse[:, torch.rand(g.n_receivers, generator=gen) < 0.25] = 0
        sparse[:, layer_of == 0] = full[:, layer_of == 0]  # start at layer 1
        sparse[:, first] = 0
        sparse[:, second] = full[:, second] if i else 0  # removed in one mask, kept in one
        masks.append(sparse)
    return torch.stack(masks)


def float64_twin(tmp_path, name, low):
    """A float64 tiny model holding ``low``'s (rounded) weights."""
    twin = tiny_model(tmp_path, dtype=torch.float64, **ALL[name])
    with torch.no_grad():
        for p64, p in zip(twin.original_model.parameters(), low.original_model.parameters(),
                          strict=True):
            p64.copy_(p.double())
    return twin


@pytest.mark.parametrize("name, dtype", [(n, d) for n in ("qwen3", "llama", "gemma2")
                                         for d in ("f32", "bf16")])
def test_fully_zero_ablated_receivers_are_exact(setups, tmp_path, name, dtype):
    """Receivers whose every incoming edge is removed under zero ablation read the fully
    ablated run's residual (0 in these bias-free families), not ``x - sum_u a_u``, a
    difference of equal sums whose rounding their RMSNorm (and Qwen3's q/k norms, Gemma-2's
    post-norm mixtures) amplify by up to ``1/sqrt(eps)``: a float32 or bfloat16 model agrees
    with its float64 twin (the same weights) at its dtype's usual precision, on every pass
    strategy (:func:`fully_removed_masks`, also one example at a time) and on the hooked
    engine. Measured before the fix (logits of size ~1.4): Qwen3 1.2e-3-2.0e-3 in float32
    (the tolerance is 2.1e-5) and 0.42-0.85 in bfloat16 (tolerance 0.18); Llama 2.1e-5 and
    0.03-0.51; Gemma-2 6e-3-4.8e-2 and 0.5-1.9."""
    from tolerances import half_atol

    low, _ = setups(name, torch.float32 if dtype == "f32" else torch.bfloat16)
    high = (setups(name, torch.float64)[0] if dtype == "f32"
            else float64_twin(tmp_path, name, low))
    dt = low.cfg.dtype
    data = padded_data([9, 7, 9], [9, 9, 6], seed=1)
    g = PatchingEngine(low).graph
    masks = fully_removed_masks(g, torch.Generator().manual_seed(3), torch.float64)
    want = PatchingEngine(high, ablation="zero").run(data, masks)
    atol = (float32_atol(want, FLOAT32_MODEL_ULPS) if dt == torch.float32
            else half_atol(want, dt))
    fast = PatchingEngine(low, ablation="zero")
    runs = [(fast.run(data, masks.to(dt)), want),
            (fast.run(data, masks.to(dt), batch_size=1), want)]
    runs += [(fast.run(data, masks[i].to(dt)), want[i: i + 1]) for i in (0, 3, 5, 10)]  # alone
    runs.append((fast.run(data, masks[-2:].to(dt)), want[-2:]))  # the sparse ones together
    if name not in POST_NORM:  # (the bridge's hooks are no reference for post-norm heads)
        slow = PatchingEngine(low, ablation="zero", use_runner=False)
        runs.append((slow.run(data, masks.to(dt)), want))
    for got, ref in runs:
        torch.testing.assert_close(got.double(), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("name, method", [
    ("llama3", "gim"), ("llama3", "relp"), ("llama3", "qk_fix"), ("gpt_neox_seq", "gim"),
    ("gpt_neox_seq", "relp"), ("gpt_neox_seq", "qk_fix"), ("mistral", "qk_fix"),
    ("gemma2", "qk_fix")])
def test_backward_rules_on_padded_prompts_equal_the_hugging_face_reference(setups, name,
                                                                           method):
    """GIM, RelP and AtP*'s QK fix on the families test_backward_rules.py leaves out (Llama-3's
    rope scaling, sequential GPT-NeoX) and the QK fix on sliding windows and post-norms, on
    padded prompts with metric positions that differ by example, against the plain Hugging
    Face references of rules_reference.py."""
    from test_backward_rules import METHODS
    from rules_reference import Layout, applied, qk_fixed_scores, reference_scores

    from circuitfind.algorithms import AtPStar

    model, hf = setups(name, torch.float64)
    data = padded_data(CLEAN_LENGTHS, CORRUPTED_LENGTHS, seed=8)
    engine = PatchingEngine(model)
    g = engine.graph
    lay = Layout(hf)
    delta = engine.sender_outputs(data.corrupted) - engine.sender_outputs(data.clean)
    if method == "qk_fix":
        got = AtPStar(grad_drop=False).score(engine, data).double()
        eap = engine.edge_attribution(data).double()
        qk = torch.tensor([rec.kind in ("q", "k") for rec in g.receivers])
        want = qk_fixed_scores(lay, g, data, delta) * g.edge_mask
        want[:, ~qk] = eap[:, ~qk]
    else:
        score, rules = METHODS[method]
        got = score(engine, data).double()
        with applied(lay, **rules):
            want = reference_scores(lay, g, data, delta)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=float32_atol(want), rtol=0)


@pytest.mark.parametrize("name", ["gpt_neox", "gpt_neox_seq", "llama3", "mistral", "qwen2",
                                  "qwen3"])
def test_single_edge_path_patching_equals_exact_on_every_family(setups, name):
    """``cf.path_patch`` of one sender into one receiver (every other path frozen to the
    clean run) scores every edge as exact patching does, on the families
    test_path_patching.py leaves out (parallel attention and MLP included), padded prompts."""
    from test_path_patching import path_patch_every_edge

    model, _ = setups(name, torch.float64)
    data = padded_data(CLEAN_LENGTHS, CORRUPTED_LENGTHS, seed=9)
    got, exact = path_patch_every_edge(PatchingEngine(model), data)
    assert exact.abs().max() > 1e-2
    assert_close(model, got, exact, scale=exact)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt_neox"])
def test_a_session_of_passes_equals_fresh_engines(setups, name):
    """One engine serving a random session (two data sets, every ablation, start layers,
    chunked examples, masks changing one receiver at a time against a circuit sparse in its
    last layers, committed now and then) gives what a fresh engine gives for each call: the
    memos (clean caches, ablation values, kept-form and post-norm entries) never serve a
    stale value."""
    import random

    model, _ = setups(name, torch.float32)
    datas = [padded_data(CLEAN_LENGTHS, CORRUPTED_LENGTHS, seed=s) for s in (1, 2)]
    engine = PatchingEngine(model)
    g = engine.graph
    gen, rnd = torch.Generator().manual_seed(0), random.Random(0)
    layer_of = torch.tensor([rec.layer for rec in g.receivers])
    sparse = conditioned(g, random_mask(g, 0.15, gen, torch.float32), gen)
    base = g.edge_mask.float().clone()
    base[:, layer_of == g.n_layers] = sparse[:, layer_of == g.n_layers]
    for _ in range(16):
        data = datas[rnd.random() < 0.25]
        kind = rnd.choice(["resample", "resample", "zero", "mean"])
        layer = rnd.randrange(g.n_layers)
        masks = base.expand(rnd.choice([1, 2, 3]), -1, -1).clone()
        receivers = (layer_of == layer).nonzero()[:, 0].tolist()
        for mask in masks:
            r = rnd.choice(receivers)
            mask[rnd.randrange(int(g.n_upstream[r])), r] = 0
        touched = (masks != g.edge_mask.float()).any(0).any(0)
        start = rnd.choice([None, 0, min(int(layer_of[touched].min()), g.n_layers - 1)])
        got = engine.run(data, masks, ablation=kind, start=start,
                         batch_size=rnd.choice([None, None, 1, 2]))
        check(model, got, PatchingEngine(model).run(data, masks, ablation=kind))
        if rnd.random() < 0.3:  # the layer's decision: later passes build on it
            base = masks[0].clone()


@pytest.mark.parametrize("name", ["qwen3", "mistral", "llama3", "gpt_neox_seq", "gemma2"])
def test_checkpointed_attribution_on_padded_prompts_equals_the_plain_pass(setups, name):
    """The long-prompt checkpointed pass (one block at a time, attention in chunks of 3
    queries) on the families test_checkpointed.py leaves out (and Gemma-2), with padded
    prompts and per-example metric positions: EAP and mixed gradient points."""
    from circuitfind.patching import checkpointed as ck
    from circuitfind.patching.engine import frozen_parameters
    from test_checkpointed import POINTS, reference_and_store

    model, _ = setups(name, torch.float64)
    engine = PatchingEngine(model)
    data = padded_data(CLEAN_LENGTHS, CORRUPTED_LENGTHS, seed=4)
    with frozen_parameters(model):
        for points in (None, POINTS):
            want, store, metric = reference_and_store(engine, data, points)
            ck.fill_senders(engine.runner, data.corrupted, store, 3)
            if points is not None:
                ck.subtract_senders(engine.runner, data.clean, store, 3)
            got = ck.checkpointed_pass(engine.runner, data.clean, data.positions, metric,
                                       store, 3, points)
            assert float(want.abs().max()) > 1e-2
            assert_close(model, got, want, 1e-12)


@pytest.mark.parametrize("name", ["mistral", "qwen2", "llama", "qwen3", "gpt_neox"])
def test_position_cone_equals_the_slow_reference(setups, name, monkeypatch):
    """Both forms compute each node at the positions the metric depends on only (the
    dependency cone: :meth:`MaskedPass._position_demand` per node in the kept form,
    :meth:`MaskedPass.removed_spans` per layer in the removed form): with sliding windows
    (Mistral, Qwen2) a layer's keys start ``window - 1`` positions before its queries, and no
    position after the batch's last metric position is computed (every family). Metric
    positions here are ragged (two per example, none at the end of the padded prompts, which
    the corrupted prompts outrun), so that the cone cuts on both sides; dense masks (dense
    layers, the shared path, the sparse start layer; batched and one example at a time),
    sparse circuits and an ACDC-like sequence of one-edge changes (kept form, memo hits)
    against the slow reference."""
    from circuitfind.patching import masked_pass

    spans: list[tuple[int, tuple[int, int]]] = []  # (hi, (q0, k0)) per kept-form layer
    removed: list[tuple[int, tuple[int, int]]] = []  # the same per removed-form layer
    demand = masked_pass.MaskedPass._position_demand
    removed_spans = masked_pass.MaskedPass.removed_spans

    def recorded(self):
        out = demand(self)
        spans.extend((self.hi, span) for span in self.spans.values())
        return out

    def recorded_removed(self):
        out = removed_spans(self)
        removed.extend((self.hi, span) for span in out.values())
        return out

    monkeypatch.setattr(masked_pass.MaskedPass, "_position_demand", recorded)
    monkeypatch.setattr(masked_pass.MaskedPass, "removed_spans", recorded_removed)
    model, hf = setups(name, torch.float64)
    data = padded_data([14, 12, 13], [17, 12, 15], seed=3)  # metric positions 9..13 of 17
    engine = PatchingEngine(model)
    g = engine.graph
    ref = Reference(name, model, hf, g, data, "resample")
    gen = torch.Generator().manual_seed(7)
    full = g.edge_mask.double()
    layer_of = torch.tensor([rec.layer for rec in g.receivers])
    sparse = torch.stack([conditioned(g, random_mask(g, p, gen, torch.float64), gen)
                          for p in (0.1, 0.2, 0.3)])
    check(model, engine.run(data, sparse), torch.stack([ref(m) for m in sparse]))
    dense = torch.stack([conditioned(g, random_mask(g, p, gen, torch.float64), gen)
                         for p in (0.5, 0.9)] + [acdc_like(g, layer, torch.float64)
                                                 for layer in range(g.n_layers + 1)])
    want = torch.stack([ref(m) for m in dense])
    check(model, engine.run(data, dense), want)
    check(model, engine.run(data, dense, batch_size=1), want)
    check(model, engine.run(data, dense[0])[0], want[0])
    base = full.clone()
    for layer in range(g.n_layers, -1, -1):
        r = int((layer_of == layer).nonzero()[-1 if layer in (0, g.n_layers) else 0])
        ups = list(range(int(g.n_upstream[r])))[-3:]
        cands = base.expand(len(ups), -1, -1).clone()
        for i, u in enumerate(ups):
            cands[i, u, r] = 0
        want = torch.stack([ref(c) for c in cands])
        check(model, engine.run(data, cands), want)
        check(model, engine.run(data, cands), want)  # memo hits
        base[:, layer_of == layer] = sparse[0][:, layer_of == layer]
    # the cone cut: nothing after position 13 (of 17), and with windows keys from after 0
    # (one example at a time: up to that example's last metric position)
    for cut in (spans, removed):
        assert cut and max(hi for hi, _ in cut) == 14
        assert any(k0 > 0 for _, (_, k0) in cut) == (name in ("mistral", "qwen2"))
