"""The memory and time model that every budgeted run and ``circuitfind plan`` use.

One model of memory sizes every chunk the engine makes (examples per pass, gradient runs per
pass, masks per pass) and predicts, before anything runs, what a run will need. It works from
the model's shape alone (:class:`ModelShape`: layers, heads, widths, vocabulary, parameter
count and dtype), which comes either from a loaded model or from a Hugging Face config with
no weights (:meth:`ModelShape.from_config`, built on the ``meta`` device), so a Llama-3.1-8B
run plans in seconds on a laptop.

Budget. ``memory_budget`` is the memory the run may hold on its device, **the model's
weights included**: weights + caches + activations + gradients + workspace
(``None``: the weights plus :data:`~circuitfind.patching.spec.DEFAULT_MEMORY_BUDGET`, 2 GiB).
It does not cover the Python interpreter and its libraries (on a CPU, a few hundred MiB of
resident memory before any model is loaded).

What is counted (bytes; ``w`` bytes per value of the model's dtype, ``S`` senders, ``L``
layers, ``d`` = d_model, ``N`` examples of ``T`` tokens):

- *weights*: every parameter once (tied embeddings once), ``n_params w``.
- *caches* (all N examples, held across passes): gradient attribution keeps the corrupted
  sender outputs ``S N T d w`` when they fit in half of what the weights leave (else they are
  recomputed per chunk); masked passes (ACDC, exact patching, faithfulness) keep the corrupted
  sender outputs, the clean run's residual streams and sender outputs, their differences and
  the fully ablated run's residual streams: ``(3 S + 4 L + 2) N T d w``.
- *activations*: per example of a chunk its sender buffers (``a' - a``, the corrupted outputs
  unless cached, ``S T d w`` each) and per model-batch row of a pass what the pass keeps:
  for a gradient pass the activations autograd saves (:func:`gradient_row_bytes`), for a
  no-grad masked pass the buffered senders and one layer's working set (:func:`masked_row_bytes`);
  passes that test edges (ACDC, exact patching) also hold the kept-form memo, capped at
  :func:`memo_rows` rows per example, the KL objective's float64 vocabulary rows and the
  adapter's derived weights.
- *gradients*: the receivers' gradients of one layer in the backward pass (contracted with the
  sender differences as they arrive, never held for the whole model).
- *workspace*: the transient of building a cache (one run's residual streams beside its sender
  outputs) and the vocabulary-sized temporaries at the metric positions.

Long prompts. Where one example's plain gradient pass does not fit, gradient attribution is
planned (and run) checkpointed (:func:`checkpointed_plan`,
:mod:`circuitfind.patching.checkpointed`): *caches* are one sender buffer per example of a
chunk (in host memory on a GPU that cannot hold it: ``offload``), *activations* every
block's input and one block's work (:func:`checkpointed_row_bytes`), with attention in
chunks of ``position_chunk`` query positions.

The coefficients of the per-row terms were fitted to peak resident memory measured on CPU
(``benchmarks/bench_scale.py``, ``benchmarks/results/scale.md``: within 15% from GPT-2 small
to Llama-3.2-1B).

Time is predicted in plain Hugging Face forwards of the same batch (the unit of every speed
benchmark here), from matmul FLOPs: a forward is ``2 n_params`` per token (less the
embedding lookup) plus attention; the engine's passes read logits at the metric positions
only; a backward pass without weight gradients costs about one forward; EAP's contraction
costs ``2 d`` per edge and token. Two measured costs that FLOPs miss (``docs/decisions.md``):
the unit, Hugging Face's eager attention, computes every score and pays
:data:`EAGER_SCORE_FLOPS` per score for its elementwise passes (what makes it slower per FLOP
on long prompts; the engine's fused kernel computes the causal half); and in half-precision
runs the parts the engine keeps in float32 (the contraction, the q/k/v receivers' gradients)
cost :data:`HALF_FLOAT32_COST` times their FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

import torch

from circuitfind.errors import ConfigError
from circuitfind.graphs.graph import ComputeGraph
from circuitfind.patching.architectures.base import DERIVED_BYTES
from circuitfind.patching.spec import DEFAULT_MEMORY_BUDGET, parse_memory

#: Smallest budget any engine accepts (bytes).
MIN_BUDGET = 2**20
GiB = 2**30

# Fitted per-token coefficients (values of the model's dtype), see the module docstring.
_GRAD_PER_LAYER_D = 4  # the norms' inputs, attention output, branch points (LayerNorm)
_GRAD_PER_LAYER_D_RMS = 10  # the same with RMSNorm, which autograd keeps in pieces
_GRAD_PER_LAYER_QKV = 1  # q, k, v (k and v as the query heads read them)
_GRAD_PER_LAYER_MLP = 1  # per MLP matrix: hidden units kept (2 matrices: 2 d_mlp; gated: 3)
_GRAD_PATTERN = 2  # attention scores and pattern (the math kernel of a gradient pass)
_GRAD_RECEIVERS = 1  # a layer's receiver gradients [1 + H + 2G, N T, d]
_VOCAB_AT_POSITION = 4  # logits, log-softmax and their gradients at a metric position
_MASKED_PER_TOKEN_D = 10  # residual-sized tensors of a masked pass's layer
_MASKED_SPLIT = 2  # per-head q/k/v inputs and their patches, when every receiver is touched
_MASKED_PER_TOKEN_MLP = 4
#: Float64 vocabulary rows per example and metric position that ACDC's KL objective holds:
#: the full model's log-probabilities and one chunk of the masks' (at least one mask).
_TESTS_VOCAB_F64 = 2
# checkpointed attribution (long prompts; circuitfind.patching.checkpointed), per token
_CKPT_RECEIVERS = 1  # a layer's q/k/v receiver gradients [H + 2G, N T, d] (float32 at least)
_CKPT_PATTERN = 2  # scores and pattern of one chunk of queries (float32; eager attention)
_CKPT_WORK_D = 6  # residual-sized temporaries of a block's no-grad forward or its backward
#: Smallest query-position chunk the plan proposes for long prompts.
MIN_POSITION_CHUNK = 16


def dtype_bytes(dtype: torch.dtype | str | None) -> int:
    """Bytes per value of a dtype a model loads in (``None``: float32; the names of
    :func:`circuitfind.models.parse_dtype`).

    Raises:
        ConfigError: not one of the dtypes a model loads in; the message lists them.
    """
    from circuitfind.models import parse_dtype

    return torch.finfo(parse_dtype(dtype)).bits // 8


@dataclass(frozen=True)
class ModelShape:
    """What the memory and time model needs to know about a model.

    Attributes:
        name: The model's name (for reports).
        n_layers, n_heads, n_kv_heads, d_model, d_head, d_mlp, d_vocab: Sizes (``d_mlp`` 0
            for attention-only models; ``d_head * n_heads`` may differ from ``d_model``).
        n_params: Parameters the loaded model holds (tied embeddings counted once; with the
            split q/k/v copies transformer-lens' bridge keeps of a fused projection).
        width: Bytes per value of the model's dtype.
        attn_only, parallel: The graph's wiring (see :class:`ComputeGraph`).
        runner: Whether the block runner implements the family (else the bridge's hooked
            forward runs, which keeps split q/k/v copies and full-vocabulary logits).
        eager_attention: Attention whose pattern is materialised (soft-capping, e.g. Gemma-2):
            ``n_heads T`` values per token and layer.
        post_norm: A norm after the heads' sum (Gemma-2).
        rms_norm: RMSNorm (Llama-style families) rather than LayerNorm.
        mlp_mats: Weight matrices of an MLP (2; gated MLPs 3).
    """

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_params: int
    width: int = 4
    attn_only: bool = False
    parallel: bool = False
    runner: bool = True
    eager_attention: bool = False
    post_norm: bool = False
    rms_norm: bool = False
    mlp_mats: int = 2

    @cached_property
    def graph(self) -> ComputeGraph:
        """The model's :class:`ComputeGraph` (closed form from the sizes; built once: masked
        passes size themselves from it on every call)."""
        return ComputeGraph(self.n_layers, self.n_heads, self.n_kv_heads,
                            attn_only=self.attn_only, parallel_attn_mlp=self.parallel,
                            model_name=self.name)

    @property
    def weights(self) -> int:
        """Bytes of the weights."""
        return self.n_params * self.width

    def with_dtype(self, dtype: torch.dtype | str | None) -> ModelShape:
        """The same shape in another dtype."""
        return replace(self, width=dtype_bytes(dtype))

    @classmethod
    def from_model(cls, model: Any, graph: ComputeGraph | None = None,
                   runner: bool | None = None) -> ModelShape:
        """The shape of a loaded ``TransformerBridge``.

        Args:
            model: The bridge (its ``cfg`` and parameters are read).
            graph: Its graph (default: from the model).
            runner: Whether the engine runs it on the block runner (default: whether an
                adapter implements its family).
        """
        from circuitfind.patching.architectures import architecture_for, unwrap

        cfg = model.cfg
        graph = graph if graph is not None else ComputeGraph.from_model(model)
        params = list(model.parameters())
        hf = getattr(model, "original_model", None)
        if runner is None:
            runner = hf is not None and not graph.attn_only and architecture_for(
                type(unwrap(hf)).__name__) is not None
        hf_cfg = getattr(hf, "config", None)
        return cls(name=str(getattr(cfg, "model_name", None) or "?"),
                   n_layers=graph.n_layers, n_heads=graph.n_heads, n_kv_heads=graph.n_kv_heads,
                   d_model=int(cfg.d_model), d_head=int(getattr(cfg, "d_head", 0)
                                                        or cfg.d_model // graph.n_heads),
                   d_mlp=0 if graph.attn_only else int(getattr(cfg, "d_mlp", 0) or 0),
                   d_vocab=int(cfg.d_vocab),
                   n_params=sum(p.numel() for p in params),
                   width=params[0].element_size() if params else 4,
                   attn_only=graph.attn_only, parallel=graph.parallel_attn_mlp, runner=runner,
                   eager_attention=_softcapped(hf_cfg),
                   post_norm=_post_norm(type(hf).__name__ if hf is not None else ""),
                   rms_norm=_rms(hf_cfg), mlp_mats=_mlp_mats(hf, params))

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype | str | None = None,
                    name: str | None = None) -> ModelShape:
        """The shape of a Hugging Face model from its config alone (no weights).

        The parameter count comes from the model built on the ``meta`` device (nothing is
        allocated); sizes from the config's fields.

        Args:
            config: A ``transformers.PretrainedConfig`` or its dict (with ``model_type``).
            dtype: The dtype to plan for (default: float32, as :func:`load_model` loads).
            name: The model's name for reports.

        Raises:
            ConfigError: a config transformers cannot build, or without layer/head sizes.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        if isinstance(config, dict):
            values = dict(config)
            kind = values.pop("model_type", None)
            if kind is None:
                raise ConfigError("A model config needs its 'model_type' (gpt2, llama, ...).")
            values.pop("architectures", None)
            config = AutoConfig.for_model(kind, **values)
        try:
            with torch.device("meta"):
                meta = AutoModelForCausalLM.from_config(config)
        except Exception as err:
            raise ConfigError(f"transformers cannot build a causal LM from this config "
                              f"({type(err).__name__}: {err}).") from err
        # transformer-lens' bridge keeps split q/k/v copies of a fused projection (GPT-2's
        # c_attn, GPT-NeoX's query_key_value) beside it: a loaded model holds them too
        n_params = sum(p.numel() for p in meta.parameters()) + sum(
            p.numel() for name, p in meta.named_parameters()
            if any(key in name for key in _FUSED_QKV))

        def get(*keys: str, default: Any = None) -> Any:
            for key in keys:
                value = getattr(config, key, None)
                if value is not None:
                    return value
            return default

        layers = get("num_hidden_layers", "n_layer", "num_layers")
        heads = get("num_attention_heads", "n_head", "num_heads")
        d = get("hidden_size", "n_embd", "d_model")
        if not (layers and heads and d):
            raise ConfigError("The config gives no number of layers, heads or hidden size.")
        kv = get("num_key_value_heads", default=heads)
        d_head = get("head_dim", default=d // heads)
        d_mlp = get("intermediate_size", "n_inner", "ffn_dim", default=4 * d)
        from circuitfind.patching.architectures import architecture_for

        cls_name = type(meta).__name__
        parallel = bool(get("use_parallel_residual", "parallel_attn", default=False))
        return cls(name=name or str(getattr(config, "_name_or_path", "") or cls_name),
                   n_layers=int(layers), n_heads=int(heads), n_kv_heads=int(kv),
                   d_model=int(d), d_head=int(d_head), d_mlp=int(d_mlp),
                   d_vocab=int(get("vocab_size")), n_params=int(n_params),
                   width=dtype_bytes(dtype), parallel=parallel,
                   runner=architecture_for(cls_name) is not None,
                   eager_attention=_softcapped(config), post_norm=_post_norm(cls_name),
                   rms_norm=_rms(config), mlp_mats=_mlp_mats(meta, list(meta.parameters())))


def _softcapped(config: Any) -> bool:
    return config is not None and getattr(config, "attn_logit_softcapping", None) is not None


_FUSED_QKV = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")


def _rms(config: Any) -> bool:
    return config is not None and getattr(config, "rms_norm_eps", None) is not None


def _mlp_mats(hf: Any, params: list[Any]) -> int:
    """Weight matrices of an MLP: the 2-D parameters of the first layer's MLP module whose
    shape involves the hidden width (3 for gated MLPs, 2 otherwise)."""
    if hf is None:
        return 2
    for name, module in hf.named_modules():
        if name.endswith("mlp") and any(True for _ in module.parameters()):
            return sum(1 for p in module.parameters() if p.ndim == 2) or 2
    return 2


def _post_norm(class_name: str) -> bool:
    from circuitfind.patching.architectures import architecture_for

    arch = architecture_for(class_name) if class_name else None
    return bool(getattr(arch, "attn_post_norm", False))


@dataclass(frozen=True)
class Workload:
    """What an algorithm asks of the engine, for planning.

    Attributes:
        gradient_points: Gradient runs per example (EAP 1, EAP-IG ``steps``, clean-corrupted
            2); ``None`` for algorithms that run masked passes.
        plain_forwards: Plain forwards per example besides the gradient runs (the corrupted
            run; EAP-IG also the clean run).
        masked_tests: ``(start layer, masks)`` of the masked passes (ACDC's tests, exact
            patching's edges): each mask runs the blocks from its start layer on.
        batch_size: Cap on examples per pass (``None``: none).
        masks_cap: Cap on masks per pass (ACDC: 64).
        n_buffer: Senders per row the algorithm sizes its passes with (``None``: all; exact
            patching: 2).
    """

    gradient_points: int | None = None
    plain_forwards: int = 1
    masked_tests: tuple[tuple[int, int], ...] = ()
    batch_size: int | None = None
    masks_cap: int | None = None
    n_buffer: int | None = None


def resolve_budget(memory: int | float | str | None, shape: ModelShape) -> int:
    """The run's budget in bytes: ``memory`` parsed, or the weights plus
    :data:`DEFAULT_MEMORY_BUDGET` when ``None``.

    Raises:
        ConfigError: a malformed size, or one under 1 MiB.
    """
    if memory is None:
        return shape.weights + DEFAULT_MEMORY_BUDGET
    budget = parse_memory(memory)
    if budget < MIN_BUDGET:
        got = f"got {memory!r} ({budget} bytes)."
        raise ConfigError(f"memory_budget must be at least 1 MiB; {got}",
                          cli=f"--memory must be at least 1 MiB; {got}")
    return budget


# ---------------------------------------------------------------------- per-row terms
def gradient_row_bytes(shape: ModelShape, seq_len: int, positions: int = 1) -> int:
    """Bytes autograd keeps per model-batch row of a gradient pass on the block runner.

    The weights take no gradient, so a matmul keeps none of its inputs. Per token and layer:
    the norms' inputs and a few residual-sized tensors (``4 d``; ``10 d`` with RMSNorm, which
    autograd keeps in pieces), q/k/v as the query heads read them (``3 H d_head``), the MLP's
    hidden units (``d_mlp`` per MLP matrix) and the attention scores and pattern
    (``2 H T``); per token once: a layer's receiver gradients in the backward pass
    (``(1 + H + 2G) d``); per metric position the vocabulary (``4 d_vocab``). Without the
    block runner the bridge's hooked path also keeps the split q/k/v inputs (``6 H d`` per
    layer) and full-vocabulary logits at every token. Coefficients fitted to measured peaks
    (module docstring).
    """
    s = shape
    per_layer = ((_GRAD_PER_LAYER_D_RMS if s.rms_norm else _GRAD_PER_LAYER_D) * s.d_model
                 + _GRAD_PER_LAYER_QKV * 3 * s.n_heads * s.d_head
                 + _GRAD_PER_LAYER_MLP * s.mlp_mats * s.d_mlp
                 + _GRAD_PATTERN * s.n_heads * seq_len)
    if not s.runner:
        per_layer += 6 * s.n_heads * s.d_model
    receivers = _GRAD_RECEIVERS * (1 + s.n_heads + 2 * s.n_kv_heads) * s.d_model
    vocab = _VOCAB_AT_POSITION * s.d_vocab * (positions if s.runner else seq_len)
    return (seq_len * (s.n_layers * per_layer + receivers) + vocab) * s.width


def masked_row_bytes(shape: ModelShape, seq_len: int, n_buffer: int | None = None,
                     dense: bool = True) -> int:
    """Bytes one model-batch row of a no-grad masked pass uses.

    The buffered senders (``n_buffer`` of them, default all S: ``n_buffer d`` per token) and
    one layer's working set: residual-sized tensors (``10 d``), the per-head q/k/v inputs and
    their patches when every receiver is touched (``2 (H + 2G) d``), the MLP's hidden units
    (``4 d_mlp``) and the attention pattern (``2 H T``). Without the block runner the bridge
    also keeps full-vocabulary logits and its split q/k/v copies. ``dense=False``: passes
    that touch one receiver group at a time (ACDC's tests, exact patching) build no per-head
    inputs for the others.
    """
    s = shape
    n_buffer = s.graph.n_senders if n_buffer is None else n_buffer
    split = _MASKED_SPLIT * (s.n_heads + 2 * s.n_kv_heads) if dense else 0
    if s.runner:
        per_token = ((n_buffer + _MASKED_PER_TOKEN_D + split) * s.d_model
                     + _MASKED_PER_TOKEN_MLP * s.d_mlp + 2 * s.n_heads * seq_len)
    else:
        per_token = (n_buffer * s.d_model + s.d_vocab + 12 * s.n_heads * s.d_model
                     + _MASKED_PER_TOKEN_MLP * s.d_mlp)
    return max(1, seq_len * per_token * s.width)


def sender_bytes(shape: ModelShape, seq_len: int) -> int:
    """Bytes of one example's sender outputs ``[S, T, d]``."""
    return shape.graph.n_senders * seq_len * shape.d_model * shape.width


def memo_rows(graph: ComputeGraph, start: int) -> int:
    """The kept-form memo's cap after a masked pass from layer ``start``, in residual-stream
    rows ``[T, d]`` per example (:class:`~circuitfind.patching.masked_pass.KeptFormMemo`): one
    per sender the pass computes (a mask-invariant node's output) and one per receiver at or
    after ``start`` (its static part; a head receiver's projected input is smaller). What the
    memory plan counts for the memo, and what the runner lets it keep.

    Raises:
        ConfigError: ``start`` is not a layer from 0 to ``L``.
    """
    senders = senders_from(graph, start)  # checks start
    # receivers are laid out by layer, the logits last
    receivers = graph.n_receivers - (graph.q_start[start] if start < graph.n_layers
                                     else graph.n_receivers - 1)
    return senders + receivers


def senders_from(graph: ComputeGraph, start: int) -> int:
    """How many senders are at or after layer ``start`` (``L``: none; the input is layer 0's).

    Raises:
        ConfigError: ``start`` is not a layer from 0 to ``L``.
    """
    if not 0 <= start <= graph.n_layers:
        raise ConfigError(f"No layer {start} in a model of {graph.n_layers} layers; a masked "
                          f"pass starts at a layer from 0 to {graph.n_layers}.")
    if start == graph.n_layers:
        return 0
    return graph.n_senders - (graph.head_start[start] if start else 0)  # layer 0: the input too


def cache_workspace(shape: ModelShape, n: int, seq_len: int) -> int:
    """Transient bytes of building the caches of ``n`` examples: one run's residual streams
    (``2 L + 1`` of them) beside its sender outputs, and one layer's per-head results."""
    s = shape
    return n * seq_len * s.d_model * s.width * (2 * s.n_layers + 1 + s.n_heads)


def masked_cache_bytes(shape: ModelShape, n: int, seq_len: int) -> int:
    """Bytes masked passes keep for ``n`` examples across passes:
    ``(3 S + 4 L + 2) N T d w`` (see the module docstring)."""
    s = shape
    per_token = 3 * s.graph.n_senders + 4 * s.n_layers + 2 if s.runner else s.graph.n_senders
    return n * seq_len * s.d_model * s.width * per_token


# ---------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak memory and time of one run, and the chunks that fit its budget.

    Attributes:
        algorithm: The algorithm's name.
        model: The model's name.
        device: Where it runs (``cpu``, ``cuda`` ...; the plan is the same).
        dtype_bytes: Bytes per value.
        examples, seq_len, positions: The data: N examples of T tokens, P metric positions.
        budget: Bytes the run may hold, weights included.
        weights, caches, activations, gradients, workspace: Predicted peak by part (bytes).
        examples_per_pass: Examples in one pass (chunk over examples).
        points_per_pass: Gradient runs stacked in one pass (gradient attribution), or masks
            per pass (masked passes).
        cache_corrupted: Whether the corrupted sender outputs of all examples are kept.
        minimum: The smallest budget that runs one example (bytes).
        max_examples: The most examples whose caches fit in this budget (masked passes; for
            gradient attribution any number fits, in chunks).
        forward_units: Predicted time in plain Hugging Face forwards of the whole batch
            (``None`` where the algorithm's work cannot be known beforehand).
        passes: What the time is made of (forwards, backwards, masked rows).
        per_example: Bytes the least budget grows by per example (masked passes keep every
            example's caches; gradient attribution chunks them: 0).
        position_chunk: Gradient attribution on long prompts: query positions per attention
            chunk of the checkpointed pass (:mod:`circuitfind.patching.checkpointed`; one
            block's activations alive at a time), or ``None`` (the plain gradient pass).
        offload: Whether the sender differences live in host memory (pinned; GPUs only),
            outside the device budget.
        host: Bytes held in host memory outside the budget (the offloaded sender buffers).
    """

    algorithm: str
    model: str
    device: str
    dtype_bytes: int
    examples: int
    seq_len: int
    positions: int
    budget: int
    weights: int
    caches: int
    activations: int
    gradients: int
    workspace: int
    examples_per_pass: int
    points_per_pass: int
    cache_corrupted: bool
    minimum: int
    max_examples: int | None
    forward_units: float | None
    passes: dict[str, float] = field(default_factory=dict)
    per_example: int = 0
    position_chunk: int | None = None
    offload: bool = False
    host: int = 0

    @property
    def peak(self) -> int:
        """Predicted peak bytes (the parts' sum)."""
        return self.weights + self.caches + self.activations + self.gradients + self.workspace

    @property
    def fits(self) -> bool:
        """Whether the run fits its budget at all."""
        return self.minimum <= self.budget and (self.max_examples is None
                                                or self.max_examples >= self.examples)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (with ``peak`` and ``fits``)."""
        return {**asdict(self), "peak": self.peak, "fits": self.fits}

    def summary(self) -> str:
        """A few lines for people: the parts, the chunks, the time, whether it fits."""
        def gib(x: int) -> str:
            for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
                if x >= size:
                    return f"{x / size:.2f} {unit}"
            return f"{x} B"

        per = "gradient runs" if self.passes.get("backwards") else "masks"
        lines = [
            f"plan: {self.algorithm} on {self.model}, {self.examples} examples x "
            f"{self.seq_len} tokens, {self.dtype_bytes * 8}-bit values, {self.device}",
            f"  weights      {gib(self.weights)}",
            f"  caches       {gib(self.caches)}"
            + (("  (corrupted sender outputs of all examples)" if self.cache_corrupted
                else "  (sender differences of one chunk of examples)"
                if self.position_chunk is not None and self.caches else "")
               if self.passes.get("backwards") else
               "  (clean, corrupted and fully ablated runs of every example)"),
            f"  activations  {gib(self.activations)}",
            f"  gradients    {gib(self.gradients)}",
            f"  workspace    {gib(self.workspace)}",
            f"  peak         {gib(self.peak)} of a {gib(self.budget)} budget",
            f"  chunks       {self.examples_per_pass} examples x {self.points_per_pass} {per} "
            "per pass",
        ]
        if self.position_chunk is not None:
            lines.append(f"  long prompts one block's activations at a time (recomputed), "
                         f"attention in chunks of {self.position_chunk} query positions"
                         + (f"; sender differences in host memory ({gib(self.host)})"
                            if self.offload else ""))
        if self.forward_units is not None:
            parts = ", ".join(f"{v:g} {k}" for k, v in self.passes.items() if v)
            lines.append(f"  time         about {self.forward_units:.1f} plain forwards of the "
                         f"batch ({parts})")
        if self.fits:
            lines.append(f"  fits: yes (the least budget for one example: {gib(self.minimum)})")
        elif self.minimum > self.budget:
            lines.append(f"  fits: NO: one example needs at least {gib(self.minimum)}")
        else:
            lines.append(f"  fits: NO: the caches of {self.examples} examples do not fit; at "
                         f"most {self.max_examples} examples, or a budget of "
                         f"{gib(self.minimum_for(self.examples))}")
        return "\n".join(lines)

    def minimum_for(self, n: int) -> int:
        """The least budget for ``n`` examples (masked passes: their caches grow with n)."""
        return self.minimum + max(0, n - 1) * self.per_example


def refuse(budget: int, minimum: int, what: str) -> ConfigError:
    """The error for a budget under ``minimum``, in the API's and the CLI's words."""
    need = (f"bytes ({budget / GiB:.3g} GiB) is too small: {what} needs at least {minimum} "
            f"bytes ({minimum / GiB:.3g} GiB, the model's weights included)")
    return ConfigError(f"memory_budget={budget} {need}. Raise memory_budget or shorten the "
                       "prompts.", cli=f"--memory {budget} {need}. Raise --memory or shorten "
                                       "the prompts.")


#: Hugging Face's eager attention per score (scale, add the causal mask, softmax in float32,
#: cast back: memory-bound elementwise passes), in float32 matmul FLOPs:
#: ``benchmarks/eager_score_cost.py`` measured 5.4 ns per score against a 176 GFLOP/s float32
#: matmul (one thread, Intel Xeon, 2026-12-04): 946 FLOPs. ``circuitfind.load_model``'s
#: models run eager attention (their config says so), so the plain-forward unit pays it.
EAGER_SCORE_FLOPS = 950
#: How many times a float32 matmul FLOP costs a half-precision one: bfloat16 matmuls run
#: 913 GFLOP/s against float32's 176 on the reference CPU (AMX; the same script, one thread).
#: Applied in half-precision runs to the parts the engine keeps in float32 for accuracy (the
#: score contraction, the q/k/v receivers' gradient matmuls) and to :data:`EAGER_SCORE_FLOPS`.
HALF_FLOAT32_COST = 5.2


def _float32_cost(shape: ModelShape) -> float:
    """What one float32 FLOP costs in FLOPs of the model's dtype (1 for float32 models)."""
    return HALF_FLOAT32_COST if shape.width < 4 else 1.0


def _forward_flops(shape: ModelShape, seq_len: int, vocab_tokens: float,
                   eager: bool = False) -> float:
    """FLOPs of a plain forward per token: the blocks' projections' matmuls, attention and
    the unembedding at ``vocab_tokens`` tokens per token.

    Attention: the fused kernel (``eager=False``: what the engine runs on families without
    soft-capped scores) computes the causal half, ``2 H d_head T`` per layer for QK^T and AV
    over ``T / 2`` keys on average; the eager path (``eager=True``: Hugging Face's forward,
    the unit, and the engine on soft-capped families) computes every score, ``4 H d_head T``,
    and pays :data:`EAGER_SCORE_FLOPS` per score for its elementwise passes (``H T`` scores
    per token and layer) -- the term that makes a plain forward slower per FLOP on long
    prompts (``benchmarks/results/long_prompts.md``)."""
    s = shape
    attn = s.d_model * (s.n_heads + 2 * s.n_kv_heads) * s.d_head + s.n_heads * s.d_head * s.d_model
    body = 2 * s.n_layers * (attn + s.mlp_mats * s.d_model * s.d_mlp)
    return body + _attention_flops(s, seq_len, eager) + 2 * s.d_vocab * s.d_model * vocab_tokens


def _attention_flops(shape: ModelShape, seq_len: int, eager: bool) -> float:
    """Attention's FLOPs per token, all layers (see :func:`_forward_flops`)."""
    s = shape
    if eager:
        return s.n_layers * s.n_heads * seq_len * (4 * s.d_head
                                                   + EAGER_SCORE_FLOPS * _float32_cost(s))
    return 2 * s.n_layers * s.n_heads * s.d_head * seq_len  # QK^T and AV, causal half


def _unit_flops(shape: ModelShape, seq_len: int) -> float:
    """FLOPs of the time unit per token: Hugging Face's plain forward (eager attention,
    logits at every position)."""
    return _forward_flops(shape, seq_len, 1.0, eager=True)


def _engine_flops(shape: ModelShape, seq_len: int, positions: int) -> float:
    """FLOPs of one of the engine's forwards per token (logits at the metric positions; the
    fused attention kernel unless the family soft-caps its scores)."""
    return _forward_flops(shape, seq_len, positions / seq_len, eager=shape.eager_attention)


def _contraction_flops(shape: ModelShape) -> float:
    """FLOPs of EAP's score contraction per token, ``2 d`` per edge, in the model dtype's
    FLOPs: it accumulates in float32 (:func:`~circuitfind.patching.attribution.matmul_nt`)."""
    return 2 * shape.d_model * shape.graph.n_edges * _float32_cost(shape)


def _receiver_gradient_extra(shape: ModelShape) -> float:
    """Extra FLOPs per token of one backward pass in a half-precision run: the q/k/v
    receivers' gradients (``2 (H + 2G) d_head d`` per layer, counted in the backward at the
    model dtype's cost) run in float32, which costs :data:`HALF_FLOAT32_COST` times as much."""
    s = shape
    return (_float32_cost(s) - 1) * 2 * s.n_layers * (s.n_heads + 2 * s.n_kv_heads) * \
        s.d_head * s.d_model


def attribution_plan(shape: ModelShape, n_examples: int, seq_len: int, n_points: int,
                     budget: int, batch_size: int | None = None, positions: int = 1,
                     algorithm: str = "eap", device: str = "cpu",
                     plain_forwards: int | None = None) -> MemoryPlan:
    """How gradient attribution (EAP, EAP-IG, clean-corrupted) splits its work, and its peak.

    The fixed part is the weights and, when they fit in half of what the weights leave, the
    corrupted sender outputs of all N examples. Examples are taken in chunks of ``n``; a
    chunk holds its sender buffers (``a - a'``, and for gradient points also the plain
    clean run's differences; the corrupted outputs unless cached) and one pass stacks ``p``
    gradient runs of its ``n`` rows (:func:`gradient_row_bytes` each). ``n`` is the largest
    that fits (at most ``batch_size``), then ``p``. Where not even one example's plain
    gradient pass fits (long prompts: its attention patterns grow as ``T^2``), the run is
    checkpointed instead (:func:`checkpointed_plan`).

    Args:
        shape: The model.
        n_examples, seq_len, positions: The data.
        n_points: Gradient runs per example (1 for EAP).
        budget: Bytes, weights included.
        batch_size: Cap on examples per pass.
        algorithm, device: For the report.
        plain_forwards: Plain forwards per example besides the gradient runs, for the time
            (default: 1 for EAP, 2 with several runs).

    Returns:
        The :class:`MemoryPlan`.

    Raises:
        ConfigError: the budget cannot hold the weights and one example with one gradient
            run; the message gives the minimum.
    """
    if n_examples < 1 or seq_len < 1 or n_points < 1:
        raise ConfigError(f"Planning needs at least one example, token and gradient run; got "
                          f"{n_examples} examples of {seq_len} tokens, {n_points} runs.")
    outputs = sender_bytes(shape, seq_len)
    buffers = 1 if n_points == 1 else 2  # a' - a (EAP); diff and -diff (gradient points)
    per_row = gradient_row_bytes(shape, seq_len, positions)
    grad_row = seq_len * _GRAD_RECEIVERS * (1 + shape.n_heads + 2 * shape.n_kv_heads) * \
        shape.d_model * shape.width  # part of per_row: a layer's receiver gradients
    plain_minimum = gradient_pass_minimum(shape, seq_len, n_points, positions)
    # long prompts: the checkpointed pass needs less (one block's activations at a time)
    minimum = min(plain_minimum, checkpointed_minimum(shape, seq_len, n_points, positions,
                                                      device)) if shape.runner else plain_minimum
    if budget < minimum:
        raise refuse(budget, minimum, f"one example of {seq_len} tokens for {algorithm} on "
                                      "this model")
    if budget < plain_minimum:
        return checkpointed_plan(shape, n_examples, seq_len, n_points, budget, batch_size,
                                 positions, algorithm, device, plain_forwards)
    free = budget - shape.weights
    # the corrupted outputs of all N are kept when they fit in half of what the weights leave
    # and the rest still holds one example
    cache = (2 * n_examples * outputs <= free
             and free - n_examples * outputs >= minimum - shape.weights)
    caches = n_examples * outputs if cache else 0
    per_example = (buffers + (0 if cache else 1)) * outputs
    room = free - caches
    n = max(1, min(n_examples, batch_size or n_examples,
                   room // (per_example + per_row + cache_workspace(shape, 1, seq_len))))
    p = max(1, min(n_points, (room - n * per_example) // (n * per_row)))
    activations = n * per_example + n * p * (per_row - grad_row)
    gradients = n * p * grad_row
    # building the corrupted cache (all N at once) comes before any chunk; building a chunk's
    # own sender outputs beside its buffers: the peak is the larger of the phases
    build = cache_workspace(shape, n_examples, seq_len) if cache else \
        n * per_example + cache_workspace(shape, n, seq_len)
    workspace = max(0, build - activations - gradients)
    # time: the corrupted run (and the plain clean run for gradient points), then each
    # gradient run's forward and backward (no weight gradients: about one forward) and the
    # contraction (2 d per edge and token)
    hf = _unit_flops(shape, seq_len)
    body = _engine_flops(shape, seq_len, positions)
    contraction = _contraction_flops(shape)
    plain = plain_forwards or (1 if n_points == 1 else 2)
    # the runs stacked in one pass sum their receiver gradients before the one contraction
    passes_per_chunk = math.ceil(n_points / p)
    units = (plain * body + n_points * (2 * body + _receiver_gradient_extra(shape))
             + passes_per_chunk * contraction) / hf
    passes = {"forwards": plain, "backwards": n_points,
              "contraction": round(passes_per_chunk * contraction / hf, 2)}
    return MemoryPlan(algorithm=algorithm, model=shape.name, device=device,
                      dtype_bytes=shape.width, examples=n_examples, seq_len=seq_len,
                      positions=positions, budget=budget, weights=shape.weights, caches=caches,
                      activations=activations, gradients=gradients, workspace=workspace,
                      examples_per_pass=n, points_per_pass=p, cache_corrupted=cache,
                      minimum=minimum, max_examples=None, forward_units=round(units, 2),
                      passes=passes)


def gradient_pass_minimum(shape: ModelShape, seq_len: int, n_points: int = 1,
                          positions: int = 1) -> int:
    """The least budget of the plain gradient pass (:func:`attribution_plan` without
    checkpointing): the weights, one example's sender buffers (``a' - a``; for gradient
    points also ``a - a'``) and corrupted outputs, and one gradient run
    (:func:`gradient_row_bytes`) or the transient of building a cache, whichever is larger."""
    buffers = 1 if n_points == 1 else 2
    return shape.weights + (buffers + 1) * sender_bytes(shape, seq_len) + max(
        gradient_row_bytes(shape, seq_len, positions), cache_workspace(shape, 1, seq_len))


def checkpointed_row_bytes(shape: ModelShape, seq_len: int, chunk: int,
                           positions: int = 1, points: bool = False) -> int:
    """Bytes one gradient run of one example holds in the checkpointed pass
    (:mod:`circuitfind.patching.checkpointed`), its sender buffer aside.

    Per token: every block's input (``(L + 1) d``, kept for the recomputation) and the larger
    of one block's no-grad forward (the heads' outputs and their differences, ``2 H d``, the
    MLP's hidden units, a few residual-sized temporaries) and one block's backward (what
    autograd keeps of the block, as in :func:`gradient_row_bytes` but without the attention
    pattern, the hidden units' gradients, and the q/k/v receivers' gradients ``(H + 2G) d``,
    float32 at least); with eager attention (soft-capped scores: Gemma-2), per token of a
    chunk of ``chunk`` queries the attention scores and pattern over the keys (``2 H T``,
    float32, measured on Gemma-2's shape; the fused kernel other families run keeps none, so
    the chunk changes nothing there); per metric position the vocabulary. Post-norm families
    (Gemma-2) with gradient points (``points``) also keep every layer's heads' differences
    through the norm's Jacobian (``H L d`` per token, float32 at least). Fitted to peaks
    measured on CPU (``benchmarks/results/long_prompts.md``).
    """
    s = shape
    w, gw = s.width, max(s.width, 4)
    d = s.d_model
    inputs = (s.n_layers + 1) * d * w
    forward = (2 * s.n_heads + _CKPT_WORK_D) * d * w + s.mlp_mats * s.d_mlp * w
    saved = ((_GRAD_PER_LAYER_D_RMS if s.rms_norm else _GRAD_PER_LAYER_D) * d
             + _GRAD_PER_LAYER_QKV * 3 * s.n_heads * s.d_head
             + _GRAD_PER_LAYER_MLP * s.mlp_mats * s.d_mlp) * w
    backward = (saved + _CKPT_RECEIVERS * (s.n_heads + 2 * s.n_kv_heads) * d * gw
                + _CKPT_WORK_D * d * w + s.mlp_mats * s.d_mlp * w)
    pushed = s.n_heads * s.n_layers * d * gw if (points and s.post_norm) else 0
    # the fused kernel (scaled_dot_product_attention: flash / memory-efficient, on CPUs and
    # GPUs) keeps no pattern; eager attention (soft-capped scores) materialises a chunk's
    attention = (_CKPT_PATTERN * s.n_heads * min(chunk, seq_len) * gw
                 if s.eager_attention else 0)
    return (seq_len * (inputs + max(forward, backward) + pushed) + seq_len * attention
            + _VOCAB_AT_POSITION * s.d_vocab * positions * w)


def _position_chunks(seq_len: int) -> list[int]:
    """The query-position chunks the plan tries, largest first: ``T``, then powers of two
    down to :data:`MIN_POSITION_CHUNK`."""
    chunks = [seq_len]
    c = 1 << (max(1, seq_len - 1).bit_length() - 1)
    while c >= MIN_POSITION_CHUNK:
        if c < seq_len:
            chunks.append(c)
        c //= 2
    return chunks


def checkpointed_minimum(shape: ModelShape, seq_len: int, n_points: int = 1,
                         positions: int = 1, device: str = "cpu") -> int:
    """The least budget of the checkpointed pass: the weights, one example's sender buffer
    (in host memory on a GPU, :func:`checkpointed_plan`) and one gradient run with
    attention in chunks of :data:`MIN_POSITION_CHUNK` queries."""
    store = 0 if device.startswith("cuda") else sender_bytes(shape, seq_len)
    return shape.weights + store + checkpointed_row_bytes(
        shape, seq_len, min(seq_len, MIN_POSITION_CHUNK), positions, n_points > 1)


def checkpointed_plan(shape: ModelShape, n_examples: int, seq_len: int, n_points: int,
                      budget: int, batch_size: int | None = None, positions: int = 1,
                      algorithm: str = "eap", device: str = "cpu",
                      plain_forwards: int | None = None) -> MemoryPlan:
    """How gradient attribution splits its work on long prompts, and its peak.

    The checkpointed pass (:mod:`circuitfind.patching.checkpointed`) holds the weights, one
    sender buffer per example of a chunk (the corrupted run's outputs, turned into the
    differences in place: ``S T d`` values) and per gradient run what
    :func:`checkpointed_row_bytes` counts, with attention in chunks of ``c`` query
    positions: ``c`` is the largest of ``T, 2^k, ..., 16`` with which one example fits,
    then examples per pass ``n`` (at most ``batch_size``) and gradient runs per pass ``p``.
    On a GPU (``device`` ``cuda...``) whose budget cannot hold the sender buffer beside one
    gradient run, the buffer moves to pinned host memory (``offload``: not counted against
    the device budget; the contraction streams it in chunks of positions).

    Time: the corrupted run and the clean run (which, for EAP, is also the gradient run's
    forward), then per gradient run a forward (gradient points), the recomputed forward, the
    backward (about one forward) and one more attention; the contraction as in
    :func:`attribution_plan`.

    Args:
        As :func:`attribution_plan`.

    Returns:
        The :class:`MemoryPlan`, with ``position_chunk`` (and ``offload``) set.

    Raises:
        ConfigError: not even one example fits with the smallest chunk.
    """
    outputs = sender_bytes(shape, seq_len)
    points = n_points > 1
    found = None
    for offload in (False, True) if device.startswith("cuda") else (False,):
        store = 0 if offload else outputs
        for c in _position_chunks(seq_len):
            if shape.weights + store + checkpointed_row_bytes(
                    shape, seq_len, c, positions, points) <= budget:
                found = offload, c
                break
        if found:
            break
    if found is None:
        least = checkpointed_minimum(shape, seq_len, n_points, positions, device)
        raise refuse(budget, least, f"one example of {seq_len} tokens for {algorithm} on this "
                                    "model")
    offload, c = found
    store = 0 if offload else outputs
    row = checkpointed_row_bytes(shape, seq_len, c, positions, points)
    free = budget - shape.weights
    n = max(1, min(n_examples, batch_size or n_examples, free // (store + row)))
    p = max(1, min(n_points, (free - n * store) // (n * row)))
    grads = n * p * seq_len * _CKPT_RECEIVERS * (shape.n_heads + 2 * shape.n_kv_heads) * \
        shape.d_model * max(shape.width, 4)
    hf = _unit_flops(shape, seq_len)
    body = _engine_flops(shape, seq_len, positions)
    # the backward's recomputed attention (the engine's kernel, as in its forwards)
    attention = _attention_flops(shape, seq_len, shape.eager_attention)
    contraction = _contraction_flops(shape)
    plain = plain_forwards or (1 if n_points == 1 else 2)
    passes_per_chunk = math.ceil(n_points / p)
    forwards = 1 + plain if n_points == 1 else plain  # EAP: + the clean run (the record)
    units = (forwards * body + n_points * (2 * body + attention
                                            + _receiver_gradient_extra(shape))
             + (0 if n_points == 1 else n_points * body)
             + passes_per_chunk * contraction) / hf
    return MemoryPlan(algorithm=algorithm, model=shape.name, device=device,
                      dtype_bytes=shape.width, examples=n_examples, seq_len=seq_len,
                      positions=positions, budget=budget, weights=shape.weights,
                      caches=n * store, activations=n * p * row - grads, gradients=grads,
                      workspace=0, examples_per_pass=n, points_per_pass=p,
                      cache_corrupted=False,
                      minimum=checkpointed_minimum(shape, seq_len, n_points, positions, device),
                      max_examples=None, forward_units=round(units, 2),
                      passes={"forwards": forwards if n_points == 1 else plain,
                              "backwards": n_points,
                              "contraction": round(passes_per_chunk * contraction / hf, 2)},
                      position_chunk=c, offload=offload, host=n * outputs if offload else 0)


# On the CPU a masked pass holds at most this many bytes of its widest activation (the MLP's
# hidden layer, tokens x d_mlp) so that its working set stays in the caches: a pass beyond
# them runs at memory speed (docs/decisions.md, "Masked passes sized for the CPU's caches").
CPU_PASS_BYTES = 8 * 2**20


def cache_rows(shape: ModelShape, seq_len: int, device: str = "cpu") -> int:
    """Model-batch rows of ``seq_len`` tokens one masked pass holds on ``device`` for speed:
    on the CPU, those whose widest activation fits :data:`CPU_PASS_BYTES` (at least 1);
    elsewhere unbounded (only the memory budget sizes a pass)."""
    if not device.startswith("cpu"):
        return 2**62
    row = seq_len * max(shape.d_model, shape.d_mlp) * shape.width
    return max(1, CPU_PASS_BYTES // row)


def masked_rows(shape: ModelShape, n_examples: int, seq_len: int, budget: int,
                n_buffer: int | None = None) -> int:
    """Model-batch rows one masked pass may hold: what ``budget`` leaves after the weights,
    the caches of ``n_examples`` examples and the caches' workspace, over
    :func:`masked_row_bytes`.

    Raises:
        ConfigError: not even one row fits beside the weights and the caches; the message gives
            the minimum (and, when one example would fit, the most examples that do).
    """
    row = masked_row_bytes(shape, seq_len, n_buffer)
    fixed = shape.weights + masked_fixed_bytes(shape, n_examples, seq_len)
    if budget < fixed + row:
        one = shape.weights + masked_fixed_bytes(shape, 1, seq_len) + row
        if budget < one:
            raise refuse(budget, one, f"one example of {seq_len} tokens for masked passes on "
                                      "this model")
        most = max_masked_examples(shape, seq_len, budget, n_buffer)
        raise refuse(budget, fixed + row, f"the caches of {n_examples} examples of {seq_len} "
                                          f"tokens (at most {most} fit)")
    return int((budget - fixed) // row)


def masked_fixed_bytes(shape: ModelShape, n: int, seq_len: int) -> int:
    """Bytes of masked passes over ``n`` examples that do not depend on the pass's rows: the
    caches (:func:`masked_cache_bytes`), their workspace (:func:`masked_workspace`) and the
    kept-form memo's share per example, one sender-sized buffer (for sizing passes: the memo's
    cap, :func:`memo_rows`, depends on the start layers, which a pass's sizing does not know;
    the rows beside it, sized with every sender buffered, leave room for the rest, and the
    plan's predicted peak counts the cap)."""
    return (masked_cache_bytes(shape, n, seq_len) + masked_workspace(shape, n, seq_len)
            + n * sender_bytes(shape, seq_len))


def masked_workspace(shape: ModelShape, n: int, seq_len: int) -> int:
    """Transient bytes beside the masked caches while they are built: one layer's per-head
    results of the ``n`` examples."""
    return n * seq_len * shape.d_model * shape.width * shape.n_heads


def max_masked_examples(shape: ModelShape, seq_len: int, budget: int,
                        n_buffer: int | None = None) -> int:
    """The most examples whose masked-pass caches fit in ``budget`` beside one row."""
    per = masked_fixed_bytes(shape, 1, seq_len)
    return max(0, int((budget - shape.weights - masked_row_bytes(shape, seq_len, n_buffer))
                      // per))


def masked_plan(shape: ModelShape, n_examples: int, seq_len: int, budget: int,
                n_buffer: int | None = None, batch_size: int | None = None,
                masks_cap: int | None = None, tests: tuple[tuple[int, int], ...] = (),
                pass_buffer: int | None = None, positions: int = 1,
                algorithm: str = "masked", device: str = "cpu") -> MemoryPlan:
    """How masked passes (ACDC, exact patching, faithfulness) split their work, and the peak.

    The fixed part is the weights and the caches of all N examples
    (:func:`masked_cache_bytes`); a pass holds ``K n`` model-batch rows of
    :func:`masked_row_bytes` (sized with ``n_buffer`` senders buffered, as the engine sizes
    them) and, on the CPU, within its caches (:func:`cache_rows`); ``n`` examples per pass is
    the most that fit (at most ``batch_size``), then ``K`` masks (at most ``masks_cap``). The
    predicted activations use ``pass_buffer`` senders per row (what the passes really buffer:
    ACDC's passes start late; default ``n_buffer``).

    Args:
        shape: The model.
        n_examples, seq_len, positions: The data.
        budget: Bytes, weights included.
        n_buffer: Senders buffered per row when sizing (default: all).
        batch_size, masks_cap: Caps on examples and masks per pass.
        tests: ``(start layer, masks)`` of the passes, for the time.
        pass_buffer: Senders buffered per row in the predicted peak.
        algorithm: For the report.
        device: For the report, and the CPU's cap on rows per pass (:func:`cache_rows`).

    Returns:
        The :class:`MemoryPlan`; where the caches of N examples do not fit it says so
        (``fits`` false, ``max_examples``) instead of raising.

    Raises:
        ConfigError: the budget cannot hold the weights, the caches of one example and one
            row; the message gives the minimum.
    """
    row = masked_row_bytes(shape, seq_len, n_buffer)
    minimum = shape.weights + masked_fixed_bytes(shape, 1, seq_len) + row
    if budget < minimum:
        raise refuse(budget, minimum, f"one example of {seq_len} tokens for masked passes "
                                      f"({algorithm}) on this model")
    most = max_masked_examples(shape, seq_len, budget, n_buffer)
    try:
        rows = masked_rows(shape, n_examples, seq_len, budget, n_buffer)
    except ConfigError:
        rows = 1
    rows = min(rows, cache_rows(shape, seq_len, device))
    n = max(1, min(n_examples, batch_size or n_examples, rows))
    k = max(1, rows // n)
    if masks_cap is not None:
        k = min(k, masks_cap)
    hf = _unit_flops(shape, seq_len)
    units, masked = None, 0
    if tests:
        layer_flops = _engine_flops(shape, seq_len, 0) / shape.n_layers
        vocab = 2 * shape.d_vocab * shape.d_model * positions / seq_len
        total = 0.0
        for start, count in tests:
            total += count * ((shape.n_layers - start) * layer_flops + vocab)
            masked += count
        units = round((2 * hf + total) / hf, 2)  # + the clean and corrupted caches
    if tests:
        # passes that test one receiver group at a time (ACDC, exact patching) hold the
        # kept-form memo (at most its cap, memo_rows per example), per row the senders
        # computed from the earliest start (their differences; the post-norm pass's basis)
        # and one layer's working set, the KL objective's float64 vocabulary rows and the
        # adapter's derived weights
        first = min(start for start, _ in tests)
        later = senders_from(shape.graph, first)
        activations = (memo_rows(shape.graph, first) * n * seq_len * shape.d_model
                       * shape.width
                       + k * n * masked_row_bytes(shape, seq_len, later, dense=False)
                       + _TESTS_VOCAB_F64 * n * positions * shape.d_vocab * 8
                       + DERIVED_BYTES)
    else:
        activations = k * n * masked_row_bytes(
            shape, seq_len, pass_buffer if pass_buffer is not None else n_buffer)
    return MemoryPlan(algorithm=algorithm, model=shape.name, device=device,
                      dtype_bytes=shape.width, examples=n_examples, seq_len=seq_len,
                      positions=positions, budget=budget, weights=shape.weights,
                      caches=masked_cache_bytes(shape, n_examples, seq_len),
                      activations=activations, gradients=0,
                      workspace=masked_workspace(shape, n_examples, seq_len),
                      examples_per_pass=n, points_per_pass=k, cache_corrupted=True,
                      minimum=minimum, max_examples=most, forward_units=units,
                      passes={"forwards": 2, "masks": masked},
                      per_example=masked_fixed_bytes(shape, 1, seq_len))
