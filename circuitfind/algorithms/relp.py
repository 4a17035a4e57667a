"""RelP: relevance patching (attribution patching with LRP propagation coefficients).

Background. Attribution patching multiplies an activation difference by the local gradient,
which in deep non-linear networks is noisy: gradients shatter through activations, norms and
gates. Layer-wise relevance propagation (LRP; Bach et al. 2015) redistributes the output
backward with per-layer rules chosen to conserve relevance; for transformers Ali et al. (2022)
give rules for norms and attention, and Jafari et al. (2024) for activations and multiplicative
gates. RelP (Jafari, Eberle, Khakzar & Nanda 2025) keeps attribution patching's contraction and
replaces the gradient with those propagation coefficients; here at edge level, on EAP's
contraction.

Method (Jafari et al. 2025, §3 and their Table 1; the authors' TransformerLens fork,
``cfg.LRP_rules``). With ``c_r`` the propagation coefficient of the metric at receiver ``r``'s
input in the clean run (the backward pass of the model with these rules),

    score(u -> r) = sum over examples and positions of (a'_u - a_u) . c_r

- **LN-rule** (``ln_rule``): each norm's ``1/sigma`` is a constant (the norm is linear in the
  backward pass);
- **identity rule** (``identity_rule``): an element-wise activation passes relevance as if it
  were the identity: its backward is ``act(x) / x`` (``x`` stabilised by ``1e-6``);
- **half rule** (``half_rule``): a multiplicative gate ``act(gate) * up`` passes half of the
  relevance to each factor;
- **AH-rule** (``ah_rule``): the attention pattern is a constant (relevance flows through the
  values only; q and k edges then score 0);
- linear layers use the 0-rule, which is the gradient times input: nothing to change.

Defaults follow the authors' released configuration (``['LN-rule', 'Identity-rule',
'Half-rule']`` in their README and ``demos/lrp_patching.ipynb``): the AH-rule is available but
off.

Units. The task metric's: an estimate of ``metric(circuit without the edge) - metric(full
model)`` by relevance instead of gradient.

Cost. As EAP: one corrupted forward, one clean forward and backward pass (the identity rule
adds one division per MLP activation).

Deviations from the reference implementation. The authors' demo takes the coefficients in the
corrupted run and multiplies them by ``clean - corrupted``; circuitfind takes them in the clean
run and multiplies by ``a' - a`` (EAP's convention, so that scores of every method read the
same way). Edges, not nodes or SAE features.
"""

from __future__ import annotations

from circuitfind.algorithms.base import ALGORITHMS
from circuitfind.algorithms.backward_rules import RulesAttribution, check_batch_size
from circuitfind.patching.backward_rules import BackwardRules


@ALGORITHMS.register("relp")
class RelP(RulesAttribution):
    """Relevance patching at edge level (Jafari et al. 2025).

    Args:
        ln_rule: LN-rule for every norm (``1/sigma`` constant).
        identity_rule: Identity rule for the MLP activations.
        half_rule: Half rule for gated MLPs' products.
        ah_rule: AH-rule for attention (the pattern constant).
        batch_size: Examples per forward/backward pass (``None``: from the engine's memory
            budget). Scores do not depend on it.

    Raises:
        ConfigError: a ``batch_size`` < 1.

    References:
        Jafari, Eberle, Khakzar & Nanda (2025), "RelP: Faithful and Efficient Circuit
        Discovery via Relevance Patching", arXiv:2508.21258, §3; Ali et al. (2022), "XAI for
        Transformers: Better Explanations through Conservative Propagation", ICML (LN-rule,
        AH-rule); Jafari et al. (2024), "MambaLRP", NeurIPS (identity and half rules).
    """

    name = "relp"
    label = "RelP"
    description = ("relevance patching: EAP with LRP propagation coefficients (LN, identity, "
                   "half rules) in place of gradients")

    def __init__(self, ln_rule: bool = True, identity_rule: bool = True, half_rule: bool = True,
                 ah_rule: bool = False, batch_size: int | None = None) -> None:
        check_batch_size("RelP", batch_size)
        self.ln_rule, self.identity_rule = ln_rule, identity_rule
        self.half_rule, self.ah_rule = half_rule, ah_rule
        self.batch_size = batch_size
        half = 0.5 if half_rule else 1.0
        self.rules = BackwardRules(freeze_norm=bool(ln_rule), detach_pattern=bool(ah_rule),
                                   activation="identity" if identity_rule else "gradient",
                                   gate_scale=half, up_scale=half)
