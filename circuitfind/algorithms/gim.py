"""GIM: edge attribution patching with gradient interaction modifications.

Background. EAP (Syed et al. 2023) scores an edge with the clean run's gradient. Edin et al.
(2025) find that gradients through a transformer misattribute wherever components interact
multiplicatively or through a shared normaliser: the attention softmax "self-repairs" (raising
one score lowers the others, so the gradient of a dominant key vanishes), a norm's statistics
route every input's gradient through every other, and q, k and v (and a gated MLP's two
branches) each receive the full gradient of their product. GIM keeps the forward pass and
changes three things in the backward pass; the edge score is EAP's contraction with that
modified gradient.

Method (Edin et al. 2025, §3; the authors' package ``gim-explain``, ``gim.GIM``). With
``g~_r`` the modified gradient of the metric at receiver ``r``'s input in the clean run,

    score(u -> r) = sum over examples and positions of (a'_u - a_u) . g~_r

where the backward pass

1. treats every norm's ``1/sigma`` as a constant (``freeze_norm``; LayerNorm still subtracts
   the mean in its backward);
2. takes the attention softmax's backward at temperature ``T`` (``softmax_temperature``): for
   ``p = softmax(s)`` the incoming ``dp`` becomes ``ds = p_T (dp - sum(dp p_T))`` with
   ``p_T = softmax(s / T)`` (temperature-adjusted softmax gradients, TSG);
3. multiplies the gradients of the queries, keys and values by ``q_scale``, ``k_scale``,
   ``v_scale`` and of a gated MLP's gate and up branches by ``gate_scale``, ``up_scale``
   (gradient normalisation: each factor of a product receives a share of its gradient).

Defaults are the authors' (``gim.GIM``): frozen norms, ``T = 2``, q/k/v 1/4, 1/4, 1/2, gate
and up 1/2 (families without a gated MLP, GPT-2 and GPT-NeoX, have no gate to scale).

Units. The task metric's (logits for a logit difference): a modified first-order estimate of
``metric(circuit without the edge) - metric(full model)``.

Cost. As EAP: one corrupted forward pass and one clean forward and backward pass; the softmax
is materialised (the fused attention kernel has no modified backward), which costs little at
the sequence lengths of circuit tasks (``benchmarks/results/methods.md``).

Deviations from the reference implementation. The authors apply GIM to feature attribution of
input tokens; here the modified backward pass feeds EAP's edge contraction (the
sign convention and the ablation are EAP's). Gemma-2's post-attention norm and Qwen3's q/k norms
are frozen like every other norm.
"""

from __future__ import annotations

from circuitfind.algorithms.base import ALGORITHMS
from circuitfind.algorithms.backward_rules import RulesAttribution, check_batch_size
from circuitfind.patching.backward_rules import BackwardRules


@ALGORITHMS.register("gim")
class GIM(RulesAttribution):
    """EAP with gradient interaction modifications (Edin et al. 2025).

    Args:
        freeze_norm: Treat the norms' ``1/sigma`` as constant in the backward pass.
        softmax_temperature: Temperature ``T > 0`` of the attention softmax's backward pass
            (1 or ``None``: plain).
        q_scale, k_scale, v_scale: Gradient factors of the queries, keys and values.
        gate_scale, up_scale: Gradient factors of a gated MLP's gate and up branches.
        batch_size: Examples per forward/backward pass (``None``: from the engine's memory
            budget). Scores do not depend on it.

    Raises:
        ConfigError: a temperature <= 0 or a ``batch_size`` < 1.

    References:
        Edin, Csordas, Ruotsalo, Wu, Maistro, Huang, Christensen & Maaloe (2025), "GIM:
        Improved Interpretability for Large Language Models", arXiv:2505.17630, §3;
        Syed, Rager & Conmy (2023), arXiv:2310.10348, eq. 2 (the edge contraction).
    """

    name = "gim"
    label = "GIM"
    description = ("EAP with gradient interaction modifications: frozen norms, softmax "
                   "temperature and q/k/v, gate scales in the backward pass")

    def __init__(self, freeze_norm: bool = True, softmax_temperature: float | None = 2.0,
                 q_scale: float = 0.25, k_scale: float = 0.25, v_scale: float = 0.5,
                 gate_scale: float = 0.5, up_scale: float = 0.5,
                 batch_size: int | None = None) -> None:
        check_batch_size("GIM", batch_size)
        self.freeze_norm = freeze_norm
        self.softmax_temperature = softmax_temperature
        self.q_scale, self.k_scale, self.v_scale = q_scale, k_scale, v_scale
        self.gate_scale, self.up_scale = gate_scale, up_scale
        self.batch_size = batch_size
        self.rules = BackwardRules(
            freeze_norm=bool(freeze_norm), softmax_temperature=softmax_temperature,
            q_scale=float(q_scale), k_scale=float(k_scale), v_scale=float(v_scale),
            gate_scale=float(gate_scale), up_scale=float(up_scale))
