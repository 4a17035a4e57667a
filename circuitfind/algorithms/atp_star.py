"""AtP*: attribution patching with the QK fix and GradDrop, at edge level.

Background. Kramar et al. (2024) study where attribution patching (AtP) misses important
components (false negatives) and propose two fixes, together AtP*:

- **QK fix** (§3.1.1): for queries and keys the linearisation through the attention softmax
  fails when it saturates; instead the attention pattern of the patched query or key is
  recomputed exactly and only the pattern's effect on the metric is linearised
  (:mod:`circuitfind.patching.qk_fix`);
- **GradDrop** (§3.1.2): a component's effect can be cancelled along different downstream
  paths; dropping the gradient through one layer at a time exposes it (eq. 11 of arXiv v1):

      AtP*(n) = E_{(x_clean, x_noise)} [ 1 / (L - 1) sum_{l=1..L} | AtP_(l)(n; x_clean, x_noise) | ]

  with ``AtP_(l)`` the estimate whose backward pass passes no gradient through layer ``l``'s
  residual-stream contributions (its attention and MLP outputs). The absolute value is taken
  of each prompt pair's estimate, inside the mean over pairs (the paper's ``I(n; x_clean,
  x_noise)`` is one pair's effect; the public reimplementation koayon/atp_star, ``atp.py``,
  does the same): a component whose effect has opposite signs on different prompts is not
  cancelled across the batch either.

Method here (edge level). An edge ``u -> r`` is scored as EAP does, ``(a'_u - a_u) . d metric
/ d x_r`` in the clean run, except that edges into q and k inputs take the QK-fixed estimate
``sum (A' - A) . d metric / d A`` (exact pattern ``A'`` of the head with the receiver's input
patched). With GradDrop, ``L`` estimates each drop one layer (a receiver in the dropped layer
scores 0 in it, which the ``L - 1`` accounts for) and the scores are the mean over examples of
each example's absolute values above: non-negative importances (the sign is lost, as in the
paper); without it the scores are signed metric changes like EAP's. Each GradDrop pass
contracts each example apart and sums the magnitudes (``attribution.contract_magnitudes``;
the QK fix likewise, ``QKFix(magnitudes=True)``), so the scores do not depend on the batch
split.

GradDrop from one forward pass. The backward pass is linear in the gradient it starts from, and
dropping layer ``l`` leaves only the residual connection around it: the gradient reaching
layer ``l``'s input is the plain gradient at its output. So after one clean forward pass and
the plain backward pass (which gives every receiver above ``l`` its ``AtP_(l)`` gradient), one
backward pass from layer ``l``'s input, seeded with that output gradient and run through the
layers below it only, gives the receivers below ``l`` theirs (autograd's graph of the forward
pass kept for all of them). The QK fix's patterns ``A'`` do not depend on the backward pass:
they are computed once and contracted with each pass's pattern gradients.

Units. The task metric's (logits for a logit difference); with GradDrop an unsigned magnitude
of a metric change.

Cost. QK fix alone: EAP's passes plus, per layer, the q/k projections and ``2 U`` patterns of
the ``U`` senders upstream (:mod:`circuitfind.patching.qk_fix`): no extra backward pass.
GradDrop: one clean forward pass, the plain backward pass and ``L - 1`` partial backward passes
through ``1, 2, ..., L - 1`` layers (``L (L - 1) / 2`` layer-backward passes, about ``(L - 1)
/ 2`` full ones, fewer than the paper's ``L`` extra backward passes), each with its share of
EAP's contraction; the QK fix's patterns once.

Deviations from the reference implementation (the paper publishes no code). The paper scores
nodes (neurons, a head's query or key at one position); circuitfind scores edges: an edge patch
changes the receiver's input at every position, so the QK fix recomputes the head's whole
pattern from the patched receiver input (through its norm and projection), and GradDrop acts at
the receiver's layer; a prompt pair is one example of the task data, an edge's estimate on it
the sum over its positions. Models with a single layer take no GradDrop (the mean over ``L - 1`` is
undefined): plain QK-fixed scores are returned.

Cost in practice (``benchmarks/results/methods_speed.md``, ``bench_atp_floor.py``): on
bench_families' shape (6 layers, 16 tokens) the QK fix alone costs about 1.7-2.1x EAP and with
GradDrop about 2.7-3.2x (11-14x when each dropped layer took its own forward and backward
pass). Under the QK fix the q and k receivers' gradients are never written nor contracted
(only summed into the residual's); GradDrop's backward passes share the folded weights, the
norm statistics and the activations' derivatives (saved in the forward pass). The QK fix
recomputes per layer the projections and two patterns of every upstream sender: ``U N T d (H
+ G) d_head`` multiply-adds for the ``L + 1`` non-head senders and the norm statistics, and for
the heads a ``d_head``-wide product in head space, plus ``2 U N H P T`` pattern entries; it
grows with the depth (``U``) and the prompt length (``T^2``) relative to EAP. The floor:
GradDrop's ``L (L - 1) / 2`` layer-backward passes alone are 0.84x EAP's multiply-adds and the
QK fix's irreducible projections and patterns 0.34x, so AtP* cannot go below about 2.2x EAP on
this shape at EAP's own rate per multiply-add (``docs/decisions.md``).

GradDrop's time floor (``benchmarks/bench_graddrop.py``, ``graddrop_speed.md``): its bare
layer-backward passes cost 0.56-0.68x EAP in time and GradDrop adds 0.9-1.2x EAP to the QK fix
(the rest: each pass's receivers' gradients and per-example contraction). Batching the passes
does not lower the floor on a CPU: one core's matmuls already run at its peak at 128 rows
(EAP's shapes), and stacking the dropped layers' gradients as a batch (``torch.func.vmap`` of
each layer's ``vjp``) measured no faster than the separate passes.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from circuitfind.algorithms.base import ALGORITHMS, Algorithm
from circuitfind.algorithms.eap import require_clean_gradient
from circuitfind.algorithms.backward_rules import check_batch_size
from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.graphs.scores import ScoreMeaning
from circuitfind.patching.backward_rules import BackwardRules
from circuitfind.patching.engine import PatchingEngine
from circuitfind.tasks.base import TaskData


@ALGORITHMS.register("atp_star")
class AtPStar(Algorithm):
    """AtP* (Kramar et al. 2024) at edge level: EAP with the QK fix and GradDrop.

    Args:
        qk_fix: Score q and k edges through the exact attention pattern.
        grad_drop: Average over examples and dropped layers each example's absolute score
            with one layer's gradient dropped (eq. 11; scores become non-negative
            importances).
        batch_size: Examples per forward/backward pass (``None``: from the engine's memory
            budget). Scores do not depend on it.

    Raises:
        ConfigError: a ``batch_size`` < 1.

    References:
        Kramar, Lieberum, Shah & Nanda (2024), "AtP*: An efficient and scalable method for
        localizing LLM behaviour to components", arXiv:2403.00745, §3.1.1 (QK fix) and
        §3.1.2 (GradDrop, eq. 11 of v1).
    """

    name = "atp_star"
    description = "AtP*: attribution patching with the QK fix and GradDrop"

    def __init__(self, qk_fix: bool = True, grad_drop: bool = True,
                 batch_size: int | None = None) -> None:
        check_batch_size("AtP*", batch_size)
        self.qk_fix = qk_fix
        self.grad_drop = grad_drop
        self.batch_size = batch_size

    def score_meaning(self, task: Any) -> ScoreMeaning:
        """Signed metric changes without GradDrop; non-negative importances with it."""
        meaning = super().score_meaning(task)
        if not self.grad_drop:
            return meaning
        return ScoreMeaning("importance", meaning.unit, meaning.higher_is_better,
                            "mean over prompts and dropped layers of each prompt's |AtP|")

    def score(self, engine: PatchingEngine, data: TaskData,
              context: RunContext | None = None) -> Tensor:
        """AtP* scores ``[S, R]`` in the task's metric unit (see module docstring).

        Raises:
            ConfigError: the task's metric has no gradient in the clean run (KL to the full
                model), or the model's family has no block runner.
        """
        require_clean_gradient("AtP*", data)
        layers = engine.graph.n_layers
        if not self.grad_drop or layers < 2:
            return engine.edge_attribution(data, batch_size=self.batch_size,
                                           rules=BackwardRules(qk_fix=bool(self.qk_fix)))
        per_layer = engine.edge_attribution(data, batch_size=self.batch_size,
                                            rules=BackwardRules(qk_fix=bool(self.qk_fix)),
                                            drop_each_layer=True)  # [L, S, R], magnitudes
        return (per_layer.double().sum(0) / (layers - 1)).float()
