"""Slow references for modified backward rules (GIM, RelP, AtP*), on the plain Hugging Face model.

Everything here is written from the papers' definitions with plain PyTorch on the Hugging Face
modules (eager attention), independent of the block runner:

- the rules are applied the way the authors' code applies them: norm modules' forwards
  replaced by versions with ``1/sigma`` detached, ``torch.nn.functional.softmax`` replaced by
  one whose backward is that of ``softmax(s / T)`` (written as ``T (softmax(s/T) - detached)``
  added to the detached plain softmax), forward hooks that scale the gradients of the q/k/v
  and gate/up projections' outputs, activation functions swapped for the identity rule, and
  forward hooks that zero the gradient of a layer's attention and MLP outputs (GradDrop);
- a receiver's score column is the derivative of the metric with respect to ``eps [S]`` when
  the receiver alone reads ``x_r + sum_u eps_u (a'_u - a_u)`` (q/k/v receivers: that head's
  columns of its projection recomputed from the perturbed input; MLP and logits receivers:
  the input of their norm), one forward and backward pass per receiver;
- the QK fix's patterns come from forward passes with one edge patched and the softmax's output
  captured; ``d metric / d A`` from a pass whose softmax outputs are retained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F


def plain_hf(model: Any) -> Any:
    """A separately loaded plain Hugging Face model of the bridge ``model`` (eager attention)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model.cfg.model_name, dtype=model.cfg.dtype,
                                                attn_implementation="eager").eval()


def _grad_scaled(x: torch.Tensor, scale: Any) -> torch.Tensor:
    """``x`` in value, ``scale * grad`` in the backward pass (``scale`` broadcasts)."""
    return x * scale + x.detach() * (1 - scale)


class Layout:
    """Where a family's modules live in the plain Hugging Face model."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        cfg = hf.config
        self.kind = ("gpt2" if hasattr(hf, "transformer") else
                     "gpt_neox" if hasattr(hf, "gpt_neox") else "llama")
        self.d = int(cfg.hidden_size)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.dh = int(getattr(cfg, "head_dim", None) or self.d // self.n_heads)
        if self.kind == "gpt2":
            self.layers = list(hf.transformer.h)
            self.final_norm = hf.transformer.ln_f
        elif self.kind == "gpt_neox":
            self.layers = list(hf.gpt_neox.layers)
            self.final_norm = hf.gpt_neox.final_layer_norm
        else:
            self.layers = list(hf.model.layers)
            self.final_norm = hf.model.norm
        self.gemma = hasattr(self.layers[0], "pre_feedforward_layernorm")

    def attn(self, layer: int) -> Any:
        b = self.layers[layer]
        return getattr(b, "attn", None) or getattr(b, "attention", None) or b.self_attn

    def attn_norm(self, layer: int) -> Any:
        b = self.layers[layer]
        return b.ln_1 if self.kind == "gpt2" else b.input_layernorm

    def mlp_norm(self, layer: int) -> Any:
        b = self.layers[layer]
        if self.kind == "gpt2":
            return b.ln_2
        return b.pre_feedforward_layernorm if self.gemma else b.post_attention_layernorm

    def projection(self, layer: int, kind: str, head: int | None = None
                   ) -> tuple[Any, torch.Tensor]:
        """The module computing ``kind`` (q/k/v) of ``layer`` and a ``[out]`` 0/1 column mask of
        ``head`` (every head of that kind if ``None``)."""
        attn, i = self.attn(layer), "qkv".index(kind)
        heads = self.n_heads if kind == "q" else self.n_kv
        chosen = range(heads) if head is None else [head]
        if self.kind == "gpt2":
            mod, width = attn.c_attn, 3 * self.d
            cols = [i * self.d + h * self.dh + j for h in chosen for j in range(self.dh)]
        elif self.kind == "gpt_neox":
            mod, width = attn.query_key_value, 3 * self.d
            cols = [h * 3 * self.dh + i * self.dh + j for h in chosen for j in range(self.dh)]
        else:
            mod = getattr(attn, f"{kind}_proj")
            width = heads * self.dh
            cols = [h * self.dh + j for h in chosen for j in range(self.dh)]
        mask = torch.zeros(width, dtype=self.hf.dtype)
        mask[cols] = 1
        return mod, mask

    def mlp(self, layer: int) -> Any:
        return self.layers[layer].mlp

    def norms(self) -> list[Any]:
        return [m for m in self.hf.modules()
                if isinstance(m, torch.nn.LayerNorm) or "RMSNorm" in type(m).__name__]


def _frozen_norm_forward(module: Any) -> Any:
    """A forward for ``module`` (LayerNorm or a Hugging Face RMSNorm) with ``1/sigma`` detached."""
    if isinstance(module, torch.nn.LayerNorm):
        def forward(x: torch.Tensor) -> torch.Tensor:
            h = x - x.mean(-1, keepdim=True)
            inv = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.eps).detach()
            return h * inv * module.weight + module.bias
        return forward
    gemma = "Gemma" in type(module).__name__
    eps = getattr(module, "variance_epsilon", None) or module.eps

    def rms_forward(x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps).detach()
        if gemma:
            return (h * (1.0 + module.weight.float())).type_as(x)
        return module.weight * h.to(x.dtype)
    return rms_forward


@contextlib.contextmanager
def applied(lay: Layout, freeze_norm: bool = False, temperature: float | None = None,
            detach_pattern: bool = False, qkv: tuple[float, float, float] = (1, 1, 1),
            gate_up: tuple[float, float] = (1, 1), identity: bool = False,
            drop_layer: int | None = None) -> Iterator[None]:
    """The rules on the plain Hugging Face model, for the duration of the block."""
    handles, swapped = [], []
    original_softmax = F.softmax
    try:
        if freeze_norm:
            for m in lay.norms():
                swapped.append((m, "forward", m.__dict__.get("forward")))
                m.forward = _frozen_norm_forward(m)
        if temperature not in (None, 1.0) or detach_pattern:
            def softmax(x, dim=None, _stacklevel=3, dtype=None):
                p = original_softmax(x, dim=dim, dtype=dtype)
                if detach_pattern:
                    return p.detach()
                pt = original_softmax(x / temperature, dim=dim, dtype=dtype)
                return p.detach() + temperature * (pt - pt.detach())
            F.softmax = softmax
        for layer in range(len(lay.layers)):
            if qkv != (1, 1, 1):
                for kind, s in zip("qkv", qkv):
                    mod, mask = lay.projection(layer, kind)
                    scale = 1 + (s - 1) * mask
                    handles.append(mod.register_forward_hook(
                        lambda m, a, out, scale=scale: _grad_scaled(out, scale)))
            mlp = lay.mlp(layer)
            if gate_up != (1, 1) and hasattr(mlp, "gate_proj"):
                for mod, s in ((mlp.gate_proj, gate_up[0]), (mlp.up_proj, gate_up[1])):
                    handles.append(mod.register_forward_hook(
                        lambda m, a, out, s=s: _grad_scaled(out, s)))
            if identity:
                name = "act_fn" if hasattr(mlp, "act_fn") else "act"
                act = getattr(mlp, name)
                plain = (lambda x, act=act: type(act).forward(act, x)) if isinstance(
                    act, torch.nn.Module) else act

                def rule(x, plain=plain):
                    y = plain(x)
                    xs = x + ((x == 0).to(x) + x.sign()) * 1e-6
                    return xs * (y / xs).detach()
                if isinstance(act, torch.nn.Module):  # the module's own forward, swapped
                    swapped.append((act, "forward", act.__dict__.get("forward")))
                    act.forward = rule
                else:
                    swapped.append((mlp, name, act))
                    setattr(mlp, name, rule)
            if layer == drop_layer:
                def zero(m, a, out):
                    if isinstance(out, tuple):
                        return (_grad_scaled(out[0], 0.0), *out[1:])
                    return _grad_scaled(out, 0.0)
                handles += [lay.attn(layer).register_forward_hook(zero),
                            mlp.register_forward_hook(zero)]
        yield
    finally:
        F.softmax = original_softmax
        for h in handles:
            h.remove()
        for m, name, old in reversed(swapped):
            if name == "forward" and old is None:
                del m.forward
            else:
                setattr(m, name, old)


def _metric(hf: Any, data: Any) -> torch.Tensor:
    logits = hf(data.clean).logits
    idx = data.positions[:, :, None].expand(-1, -1, logits.shape[-1])
    return data.metric(logits.gather(1, idx)).mean()


@contextlib.contextmanager
def _reading(lay: Layout, graph: Any, r: int, change: torch.Tensor) -> Iterator[None]:
    """Receiver ``r`` alone reads its input plus ``change [N, T, d]`` (a q/k/v receiver: its
    head's columns of the projection output recomputed from the changed input, through the
    projection's other hooks, so the rules' gradient scales apply to it too)."""
    rec = graph.receivers[r]
    handles = []
    if rec.kind in ("q", "k", "v"):
        norm = lay.attn_norm(rec.layer)
        mod, mask = lay.projection(rec.layer, rec.kind, rec.head)
        seen = {}
        handles.append(norm.register_forward_pre_hook(
            lambda m, a: seen.__setitem__("x", a[0])))

        busy = []

        def inject(m, a, out):
            if busy:  # the call below: its output as the other hooks (rules) leave it
                return None
            busy.append(1)
            try:
                extra = mod(norm.forward(seen["x"] + change))
            finally:
                busy.clear()
            return out * (1 - mask) + extra * mask
        handles.append(mod.register_forward_hook(inject))
    else:
        norm = lay.final_norm if rec.kind == "logits" else lay.mlp_norm(rec.layer)
        handles.append(norm.register_forward_pre_hook(lambda m, a: (a[0] + change, *a[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def pushed_differences(lay: Layout, graph: Any, data: Any, delta: torch.Tensor
                       ) -> torch.Tensor:
    """``delta [S, N, T, d]`` with Gemma-2's head rows replaced by ``J_l(S_l) delta`` (the
    post-attention norm's Jacobian at the clean run's head sum, under the active rules)."""
    if not lay.gemma:
        return delta
    sums = {}
    handles = [lay.layers[layer].post_attention_layernorm.register_forward_pre_hook(
        lambda m, a, layer=layer: sums.__setitem__(layer, a[0].detach()))
        for layer in range(len(lay.layers))]
    with torch.no_grad():
        lay.hf(data.clean)
    for h in handles:
        h.remove()
    out = delta.clone()
    for layer in range(len(lay.layers)):
        norm = lay.layers[layer].post_attention_layernorm
        h0 = graph.head_start[layer]
        for h in range(graph.n_heads):
            _, out[h0 + h] = torch.autograd.functional.jvp(norm.forward, sums[layer],
                                                           delta[h0 + h])
    return out


def reference_scores(lay: Layout, graph: Any, data: Any, delta: torch.Tensor) -> torch.Tensor:
    """``[S, R]`` scores ``d metric / d eps_u`` per receiver under the rules in force (see the
    module docstring); ``delta [S, N, T, d]`` the sender differences ``a' - a``."""
    delta = pushed_differences(lay, graph, data, delta)
    scores = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    for r in range(graph.n_receivers):
        eps = torch.zeros(graph.n_senders, dtype=delta.dtype, requires_grad=True)
        change = torch.einsum("s,sntd->ntd", eps, delta)
        with _reading(lay, graph, r, change):
            (grad,) = torch.autograd.grad(_metric(lay.hf, data), eps, allow_unused=True)
        if grad is not None:  # None: the receiver does not reach the metric (AH-rule's q, k)
            scores[:, r] = grad.double()
    return scores * graph.edge_mask


def _patterns(lay: Layout, run: Any, retain: bool = False) -> list[torch.Tensor]:
    """The attention patterns (softmax outputs, one per layer in order) of ``run()``, with their
    gradients retained if ``retain``."""
    captured, original = [], F.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        p = original(x, dim=dim, dtype=dtype)
        if retain:
            p.retain_grad()
        captured.append(p)
        return p
    F.softmax = softmax
    try:
        run()
    finally:
        F.softmax = original
    return captured


def qk_fixed_scores(lay: Layout, graph: Any, data: Any, delta: torch.Tensor) -> torch.Tensor:
    """Brute-force QK-fixed scores of every q and k edge (other entries 0): for each edge one
    forward pass with the edge patched, its layer's pattern ``A'`` captured, then
    ``sum (A' - A) d metric / d A`` with the clean run's retained pattern gradient."""
    delta = pushed_differences(lay, graph, data, delta)
    patterns = _patterns(lay, lambda: _metric(lay.hf, data).backward(), retain=True)
    scores = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.float64)
    rep = lay.n_heads // lay.n_kv
    for r, rec in enumerate(graph.receivers):
        if rec.kind not in ("q", "k"):
            continue
        heads = ([rec.head] if rec.kind == "q"
                 else list(range(rec.head * rep, (rec.head + 1) * rep)))
        a0, g = patterns[rec.layer].detach(), patterns[rec.layer].grad
        for u in range(int(graph.n_upstream[r])):
            with torch.no_grad(), _reading(lay, graph, r, delta[u]):
                patched = _patterns(lay, lambda: lay.hf(data.clean))[rec.layer]
            scores[u, r] = float(((patched - a0)[:, heads] * g[:, heads]).double().sum())
    return scores
