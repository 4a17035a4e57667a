"""Modified backward rules for gradient attribution: the engine's one extension point for
methods that replace the plain gradient (GIM, RelP, AtP*).

Why. EAP scores an edge with ``(a'_u - a_u) . d metric / d x_r`` (Syed et al. 2023). Several
methods keep that contraction and change only *which* backward pass produces the "gradient":
GIM (Edin et al. 2025) freezes the norms' statistics, takes the attention softmax's backward at
a temperature and rescales the q/k/v and gated-MLP gradients; RelP (Jafari et al. 2025) replaces
gradients with LRP relevance coefficients (LN-rule, identity rule for activations, half rule for
gates, AH-rule for attention); AtP* (Kramar et al. 2024) drops one layer's gradient at a time
(GradDrop) and recomputes the attention softmax for patched queries and keys (the QK fix). None
of them needs a copy of the attribution pass: a :class:`BackwardRules` value is handed to
:func:`circuitfind.patching.attribution.attribute` (through
:meth:`PatchingEngine.edge_attribution` and :meth:`BlockRunner.attribute`), which installs it on
the family adapter for the duration of the pass (:meth:`Architecture.backward_rules`). The
adapter's forward consults it at six places, each a function here:

==================  =====================================  ===================================
where (adapter)     function                               rules that act there
==================  =====================================  ===================================
every norm          :meth:`BackwardRules.statistic`        ``freeze_norm`` (1/sigma detached)
attention softmax   :meth:`BackwardRules.softmax`          ``softmax_temperature``,
                                                           ``detach_pattern``
q, k, v             :meth:`BackwardRules.scale`            ``q_scale``, ``k_scale``, ``v_scale``
MLP activation      :meth:`BackwardRules.activation_fn`    ``activation="identity"``
gated MLP product   :meth:`BackwardRules.gate`             ``gate_scale``, ``up_scale``
a layer's output    :meth:`BackwardRules.through`          ``drop_layer`` (GradDrop; in
                                                           the attribution pass)
==================  =====================================  ===================================

plus ``qk_fix``, which the attribution pass itself acts on after the backward pass
(:mod:`circuitfind.patching.qk_fix`). Every rule changes the backward pass only: the forward
values (logits, sender outputs, the metric) are the plain model's, which the tests check. The
closed-form norm Jacobians the attribution pass uses for q/k/v receivers and Gemma-2's post-norm
(:meth:`Architecture.qkv_input_grads`, :meth:`Gemma2.post_norm_jvp`) follow
``freeze_norm`` too.

Units. Scores keep the metric's unit (logits, nats, probability); the rules rescale how much of
the metric change the backward pass assigns to each receiver, not its unit.

References:
    Edin et al. (2025), "GIM: Improved Interpretability for Large Language Models",
    arXiv:2505.17630, §3 (TSG, LayerNorm freeze, gradient normalisation);
    Jafari, Eberle, Khakzar & Nanda (2025), "RelP: Faithful and Efficient Circuit Discovery
    via Relevance Patching", arXiv:2508.21258, §3 (propagation rules, their Table 1); Ali et
    al. (2022), "XAI for Transformers: Better Explanations through Conservative Propagation"
    (LN-rule, AH-rule); Kramar et al. (2024), "AtP*: An efficient and scalable method for
    localizing LLM behaviour to components", arXiv:2403.00745, §3.1 (QK fix, GradDrop).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError

ACTIVATION_RULES = ("gradient", "identity")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by a constant."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


class _TemperatureSoftmax(torch.autograd.Function):
    """``softmax(s)`` forward; backward is that of ``softmax(s / T)`` without its ``1/T``
    factor: ``ds = p_T * (dp - sum(dp * p_T))`` with ``p_T = softmax(s / T)`` (GIM's
    temperature-adjusted softmax gradient, TSG)."""

    @staticmethod
    def forward(ctx, scores: Tensor, temperature: float,
                dtype: torch.dtype | None) -> Tensor:
        ctx.temperature = temperature
        ctx.save_for_backward(scores)
        return torch.softmax(scores, -1, dtype=dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (scores,) = ctx.saved_tensors
        p = torch.softmax(scores.to(grad.dtype) / ctx.temperature, -1)
        p = torch.nan_to_num(p)  # rows with every key hidden (none in causal attention)
        out = p * (grad - (grad * p).sum(-1, keepdim=True))
        return out.to(scores.dtype), None, None


@dataclass(frozen=True)
class BackwardRules:
    """Which parts of the backward pass of an attribution differ from the plain gradient.

    The default value changes nothing (:attr:`plain` is True): EAP's gradient.

    Attributes:
        freeze_norm: Treat each norm's ``1/sigma`` (LayerNorm: the standard deviation, the
            mean still subtracted; RMSNorm: the root mean square) as a constant in the
            backward pass (GIM's LayerNorm freeze; RelP's LN-rule).
        softmax_temperature: ``T``: the attention softmax's backward is that of
            ``softmax(s / T)`` (GIM's TSG; ``None`` or 1: plain).
        detach_pattern: No gradient through the attention pattern (RelP's AH-rule: q and k
            receive none; the value path keeps its gradient).
        q_scale, k_scale, v_scale: Factors on the gradients of the queries, keys and values
            (GIM's gradient normalisation of the attention's multiplicative interactions).
        gate_scale, up_scale: Factors on the gradients of a gated MLP's gate branch (before its
            activation) and up branch (GIM; RelP's half rule is 0.5 on both).
        activation: ``"gradient"`` (plain) or ``"identity"``: the MLP activation's backward
            is ``act(x) / x`` (RelP's identity rule; ``x`` stabilised by ``1e-6`` away from 0).
        drop_layer: GradDrop: no gradient flows back through layer ``drop_layer``'s attention
            and MLP outputs (so its receivers get none), ``None`` for none.
        qk_fix: AtP*'s QK fix: the scores of edges into q and k inputs are recomputed from the
            exact attention pattern of the patched query or key (see
            :mod:`circuitfind.patching.qk_fix`) instead of the gradient through the softmax.

    Raises:
        ConfigError: a non-positive temperature, an unknown activation rule or a negative
            ``drop_layer``.
    """

    freeze_norm: bool = False
    softmax_temperature: float | None = None
    detach_pattern: bool = False
    q_scale: float = 1.0
    k_scale: float = 1.0
    v_scale: float = 1.0
    gate_scale: float = 1.0
    up_scale: float = 1.0
    activation: str = "gradient"
    drop_layer: int | None = None
    qk_fix: bool = False

    def __post_init__(self) -> None:
        t = self.softmax_temperature
        if t is not None and not t > 0:
            raise ConfigError(f"softmax_temperature must be None or > 0 (1 = the plain softmax "
                              f"gradient). Got {t!r}.")
        if self.activation not in ACTIVATION_RULES:
            raise ConfigError(f"Unknown activation rule {self.activation!r}; choose one of "
                              f"{list(ACTIVATION_RULES)}.")
        if self.drop_layer is not None and self.drop_layer < 0:
            raise ConfigError(f"drop_layer must be None or a layer index >= 0. Got "
                              f"{self.drop_layer!r}.")

    @property
    def plain(self) -> bool:
        """Whether these rules change nothing (the plain gradient)."""
        return self == PLAIN

    @property
    def plain_gradient(self) -> bool:
        """Whether the backward pass itself is plain: no rule set but, possibly, the QK fix
        (which rescores q and k edges after the pass, from the forward pass's patterns)."""
        return replace(self, qk_fix=False) == PLAIN

    @property
    def plain_attention(self) -> bool:
        """Whether the attention's backward is plain (the fused kernels may then run)."""
        return (self.softmax_temperature in (None, 1.0) and not self.detach_pattern
                and (self.q_scale, self.k_scale, self.v_scale) == (1.0, 1.0, 1.0))

    def describe(self) -> dict[str, object]:
        """The rules that differ from the plain gradient, ``{name: value}`` (for reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(PLAIN, f.name)}

    # the functions the adapters call -------------------------------------------------------
    def statistic(self, inv: Tensor) -> Tensor:
        """A norm's ``1/sigma`` ``[..., 1]``: detached under ``freeze_norm``."""
        return inv.detach() if self.freeze_norm else inv

    def softmax(self, scores: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The attention pattern ``softmax(scores)`` over the last axis, in ``dtype``, with
        this object's backward rule (temperature, or none at all under ``detach_pattern``)."""
        if self.detach_pattern:  # a zero gradient (not none) reaches q and k
            return torch.softmax(self.scale(scores, 0.0), -1, dtype=dtype)
        t = self.softmax_temperature
        if t is None or t == 1.0:
            return torch.softmax(scores, -1, dtype=dtype)
        return _TemperatureSoftmax.apply(scores, float(t), dtype)

    @staticmethod
    def scale(x: Tensor, factor: float) -> Tensor:
        """``x`` whose gradient is multiplied by ``factor`` in the backward pass."""
        return x if factor == 1.0 else _ScaleGrad.apply(x, float(factor))

    def activation_fn(self, act: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``act(x)`` with this object's activation rule (identity rule: backward
        ``act(x) / x``, ``x`` moved ``1e-6`` away from 0 in its sign's direction)."""
        y = act(x)
        if self.activation == "gradient":
            return y
        xs = x + ((x == 0).to(x) + x.sign()) * 1e-6
        return xs * (y / xs).detach()

    def gate(self, gate: Tensor, up: Tensor) -> Tensor:
        """The gated MLP's product ``gate * up`` (``gate`` after its activation) with the
        gate and up gradients scaled."""
        return self.scale(gate, self.gate_scale) * self.scale(up, self.up_scale)

    def through(self, layer: int, out: Tensor) -> Tensor:
        """A layer's attention or MLP output as it joins the residual stream: its gradient is
        zeroed when ``layer`` is the dropped layer (GradDrop)."""
        return self.scale(out, 0.0) if layer == self.drop_layer else out


PLAIN = BackwardRules()
"""The plain gradient (EAP)."""


class _SavedDerivative(torch.autograd.Function):
    """``act(x)`` of an elementwise activation whose derivative ``act'(x)`` is computed once,
    in the forward pass (forward mode), and multiplied into every backward pass (one product
    instead of the activation's own backward kernel each time)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
        # forward mode: the value and the (elementwise) derivative in one pass, no nested
        # backward pass inside the forward (torch's forward-mode set-up scripts its
        # decompositions once, warning that scripting is deprecated: not the user's concern)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated",
                                    category=DeprecationWarning)
            value = torch.func.jvp(act, (x.detach(),), (torch.ones_like(x),))
        y, slope = value[0], value[1]
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (slope,) = ctx.saved_tensors
        return grad * slope, None


@dataclass(frozen=True)
class _RepeatedBackward(BackwardRules):
    """The same rules, for a forward pass whose graph several backward passes read (AtP*'s
    GradDrop): the plain activation gradient comes from its derivative saved in the forward
    pass (:class:`_SavedDerivative`). Equal to the rules it copies up to rounding."""

    def activation_fn(self, act: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if self.activation != "gradient" or not x.requires_grad:
            return super().activation_fn(act, x)
        return _SavedDerivative.apply(x, act)


def for_repeated_backward(rules: BackwardRules) -> BackwardRules:
    """``rules`` for a forward pass whose autograd graph several backward passes read (the
    activations' derivatives computed once: :class:`_RepeatedBackward`)."""
    return _RepeatedBackward(**{f.name: getattr(rules, f.name) for f in fields(rules)})
