"""Edge pruning: learned hard-concrete edge masks with a sparsity target.

Background. ACDC removes edges greedily, one decision at a time; attribution methods score
edges from gradients at a few points. Bhaskar, Wettig, Friedman & Chen (2024) instead *learn*
a mask over every edge at once by gradient descent: the masks are relaxed to continuous
values, the model runs with each edge carrying a mixture of its own and its ablated value, and
the loss is the task loss (KL divergence to the full model) plus a penalty that drives the
expected fraction of removed edges to a target.

Method (Bhaskar et al. 2024, §3; Louizos et al. 2018 for the hard-concrete distribution).
Each real edge has a parameter ``log_alpha`` (initialised at 10 plus noise of s.d. 0.01,
all edges on). Each training
step samples, per edge, ``u ~ U(0, 1)``,

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),   z = clamp(s (r - l) + l, 0, 1)

with ``beta = 2/3``, ``l = -0.1``, ``r = 1.1``, and runs the differentiable masked forward
(:func:`circuitfind.patching.soft_mask.soft_masked_logits`: receiver ``r`` reads
``a'_u + z[u, r] (a_u - a'_u)`` from each sender ``u``) on a minibatch. The loss is

    L = KL(p_full || p_z) + lambda_1 (s_hat - s_t) + lambda_2 (s_hat - s_t)^2

with ``s_hat = 1 - mean_e P(z_e > 0)`` the expected edge sparsity (``P(z > 0) =
sigmoid(log_alpha - beta log(-l / r))``) and ``s_t`` the target sparsity, raised linearly
from 0 over ``warmup_steps``. ``log_alpha`` descends the loss; the Lagrange multipliers
``lambda`` ascend it (AdamW, no weight decay, learning rates linearly warmed up over the first
200 steps). The discrete circuit of a requested size keeps the edges with the largest
``log_alpha`` (the reference code's deterministic mask ranks by ``sigmoid(log_alpha / beta
* 0.8)``, the same order): the scores are each edge's final keep probability ``P(z > 0)``, a
monotone function of ``log_alpha`` in [0, 1] (an importance: larger is more important; being
non-negative, ``|score|`` ranks alike), and :func:`circuitfind.discover` with ``n_edges``
selects the top ones.
After a run, ``algo.report`` holds the expected number of kept edges, the target's, whether
it was reached (within one edge or 1% of the graph), the multipliers and the last losses; a
run that ends short of its target warns (RuntimeWarning). A target below the edges the task
needs is not reached: on the 82-edge induction organisms (reference circuits of 11-13 edges)
sparsity 0.95 asks for 4 edges, and 600-1,000 steps end at 11-15 with the multipliers still growing
(or, with the reference's 3,000 steps at learning rate 0.8, with every ``log_alpha`` saturated
at -38..27, where no gradient reaches it, and the KL at 3 nats).

Cost per training step: one differentiable masked forward and its backward over a minibatch
(every receiver's input rebuilt from its senders); ``benchmarks/results/methods.md`` gives the
measured cost in plain Hugging Face forwards of the same minibatch. Plus one full-model
forward at the start (the KL reference) and one corrupted forward (the ablated values).

Resuming. The run checkpoints (``RunContext``) the step, ``log_alpha``, the multipliers, the
optimiser's state and the random generator's state: a run stopped and started again gives the
identical scores, like ACDC.

Deviations from the reference implementation. Node (writer) masks are not learned (the
reference code's IOI runs disable their loss too: ``--disable_node_loss``); masks cover every
edge of circuitfind's graph, including ``input`` (``--with_embedding_nodes``). The ablation is
the engine's (the corrupted run by default, as in the paper). ``objective="metric"`` replaces
the KL by the task metric's worsening (the negated metric for higher-is-better metrics), an
option the paper does not have. Examples are drawn in minibatches of ``batch_size`` from the
task data (a shuffled pass per epoch), not from a separate training split.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from circuitfind.algorithms.base import ALGORITHMS, Algorithm
from circuitfind.algorithms.lifecycle import RunContext, fingerprint
from circuitfind.algorithms.objective import OBJECTIVES
from circuitfind.errors import ConfigError
from circuitfind.graphs.scores import ScoreMeaning
from circuitfind.patching.engine import PatchingEngine, frozen_parameters
from circuitfind.patching.soft_mask import soft_masked_logits
from circuitfind.tasks.base import TaskData

BETA, LEFT, RIGHT = 2 / 3, -0.1, 1.1  # hard-concrete temperature and stretch (Louizos et al.)
LR_WARMUP = 200  # optimiser learning-rate warm-up steps of the reference runs


def sample_masks(log_alpha: Tensor, u: Tensor) -> Tensor:
    """Hard-concrete samples ``z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta)
    (r - l) + l, 0, 1)`` for uniforms ``u`` (same shape as ``log_alpha``)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def keep_probability(log_alpha: Tensor) -> Tensor:
    """``P(z > 0) = sigmoid(log_alpha - beta log(-l / r))`` of each hard-concrete mask."""
    return torch.sigmoid(log_alpha - BETA * math.log(-LEFT / RIGHT))


@ALGORITHMS.register("edge_pruning")
class EdgePruning(Algorithm):
    """Edge pruning with learned hard-concrete masks (Bhaskar et al. 2024).

    Args:
        sparsity: Target fraction of edges removed, in (0, 1) (default 0.95; the paper sweeps
            0.94-0.99 on GPT-2's 32,491 edges). Ignored when ``target_edges`` is given.
        target_edges: Target number of kept edges (``None``: from ``sparsity``); set it to the
            circuit size you will select.
        steps: Training steps (default 3000, the reference IOI runs).
        warmup_steps: Steps over which the target sparsity rises linearly from 0 (default
            2500, the reference runs; clipped to ``steps``).
        lr: Learning rate of the masks' ``log_alpha`` (default 0.8, the reference runs).
        reg_lr: Learning rate of the Lagrange multipliers (default 0.8).
        batch_size: Examples per step (default 32, the reference runs; at most all).
        objective: ``"kl"`` (KL divergence to the full model, the paper's loss; default) or
            ``"metric"`` (the task metric's worsening).
        init: Initial ``log_alpha`` of every edge (default 10, the reference code's: every
            mask starts at 1, so early steps move only the sparsity penalty).
        seed: Seed of the mask samples and minibatch order.
        progress: Show a progress bar when no :class:`RunContext` is given.

    Raises:
        ConfigError: a parameter out of range (the message says which and why).

    References:
        Bhaskar, Wettig, Friedman & Chen (2024), "Finding Transformer Circuits with Edge
        Pruning", NeurIPS, arXiv:2406.16778, §3 and App. B; Louizos, Welling & Kingma (2018),
        "Learning Sparse Neural Networks through L0 Regularization", eqs. 9-12.
    """

    name = "edge_pruning"
    description = "learned hard-concrete edge masks with a sparsity target (Bhaskar et al. 2024)"
    supports_checkpoint = True

    def __init__(self, sparsity: float = 0.95, target_edges: int | None = None,
                 steps: int = 3000, warmup_steps: int = 2500, lr: float = 0.8,
                 reg_lr: float = 0.8, batch_size: int = 32, objective: str = "kl",
                 init: float = 10.0, seed: int = 0, progress: bool = True) -> None:
        def number(name: str, value: Any, low: float, high: float | None = None) -> float:
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not value > low or (high is not None and not value < high)):
                span = f"> {low}" if high is None else f"in ({low}, {high})"
                raise ConfigError(f"The {name!r} parameter of EdgePruning must be a number "
                                  f"{span}. Got {value!r}.")
            return float(value)

        def count(name: str, value: Any, low: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"The {name!r} parameter of EdgePruning must be an int >= "
                                  f"{low}. Got {value!r}.")
            return value

        self.sparsity = number("sparsity", sparsity, 0.0, 1.0)
        self.target_edges = None if target_edges is None else count("target_edges",
                                                                     target_edges, 1)
        self.steps = count("steps", steps, 1)
        self.warmup_steps = count("warmup_steps", warmup_steps, 0)
        self.lr = number("lr", lr, 0.0)
        self.reg_lr = number("reg_lr", reg_lr, 0.0)
        self.batch_size = count("batch_size", batch_size, 1)
        if objective not in OBJECTIVES:
            raise ConfigError(f"The 'objective' parameter of EdgePruning must be one of "
                              f"{', '.join(OBJECTIVES)}. Got {objective!r}.")
        self.objective = objective
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ConfigError(f"The 'init' parameter of EdgePruning must be a finite number. "
                              f"Got {init!r}.")
        self.init = float(init)
        self.seed = int(seed)
        self.progress = bool(progress)

    def score_meaning(self, task: Any) -> ScoreMeaning:
        """Scores are keep probabilities ``P(z > 0)``: importances (larger is more important)."""
        return ScoreMeaning("importance", "probability", what="learned keep probability")

    def target(self, n_edges: int) -> float:
        """The target sparsity ``s_t`` for a graph of ``n_edges`` edges."""
        if self.target_edges is None:
            return self.sparsity
        if self.target_edges > n_edges:
            raise ConfigError(f"target_edges={self.target_edges} exceeds the graph's "
                              f"{n_edges} edges.")
        return 1.0 - self.target_edges / n_edges

    def score(self, engine: PatchingEngine, data: TaskData,
              context: RunContext | None = None) -> Tensor:
        """Train the masks (module docstring) and return each edge's keep probability
        ``P(z > 0)`` ``[S, R]`` (0 off real edges).

        Raises:
            ConfigError: a model without a block runner, or ``target_edges`` above the
                graph's edge count.
            CheckpointMismatchError: the context's checkpoint belongs to another run.
        """
        runner = engine.runner
        if runner is None:
            raise ConfigError("Edge pruning runs on the block runner, which this model's "
                              "architecture does not have.")
        ctx = context if context is not None else RunContext(progress=self.progress)
        g = engine.graph
        real = g.edge_mask.to(engine.device)
        s_target = self.target(g.n_edges)
        settings = {k: v for k, v in self.get_params().items() if k != "progress"}
        key = fingerprint(engine, data, settings, version="edge_pruning v1")
        data = engine.on_device(data)
        t = int(data.positions.max()) + 1
        tokens = data.clean[:, :t]
        values = engine.ablation_values(data)
        ablated = values[:, :, :t] if values.shape[2] > 1 else values
        with torch.no_grad():  # the full model's log-probabilities (the KL reference)
            full = engine.run(data, g.full_mask(engine.dtype))[0]
            ref = torch.log_softmax(full.double(), -1)

        log_alpha = torch.full((g.n_senders, g.n_receivers), self.init, dtype=torch.float64,
                               device=engine.device)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        log_alpha += 0.01 * torch.randn(log_alpha.shape, generator=gen, dtype=torch.float64
                                        ).to(engine.device)
        log_alpha.requires_grad_(True)
        lambdas = torch.zeros(2, dtype=torch.float64, device=engine.device, requires_grad=True)
        opt = torch.optim.AdamW([{"params": [log_alpha], "lr": self.lr},
                                 {"params": [lambdas], "lr": self.reg_lr, "maximize": True}],
                                weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / LR_WARMUP))
        step, order = 0, torch.empty(0, dtype=torch.long)
        saved = ctx.resume(key)
        if saved is not None:
            step = int(saved["step"])
            with torch.no_grad():
                log_alpha.copy_(saved["log_alpha"])
                lambdas.copy_(saved["lambdas"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            gen.set_state(saved["generator"])
            order = saved["order"]
            ctx.resumed("edge pruning", step, self.steps, "step")

        def state() -> dict[str, Any]:
            return {"step": step, "log_alpha": log_alpha.detach().cpu(),
                    "lambdas": lambdas.detach().cpu(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "generator": gen.get_state(),
                    "order": order}

        description = f"edge pruning to sparsity {s_target:.3g}"
        batch = min(self.batch_size, data.n)
        warm = min(self.warmup_steps, self.steps)
        losses: dict[str, float] = {}
        bar = ctx.bar(total=self.steps, initial=step, desc=description, unit="step")
        try:
            with frozen_parameters(engine.model), torch.enable_grad():
                while step < self.steps:
                    if len(order) < batch:  # a shuffled pass over the examples per epoch
                        order = torch.cat([order, torch.randperm(data.n, generator=gen)])
                    rows, order = order[:batch], order[batch:]
                    u = torch.rand(log_alpha.shape, generator=gen, dtype=torch.float64
                                   ).clamp(1e-6, 1 - 1e-6).to(engine.device)
                    z = sample_masks(log_alpha, u) * real
                    sub = data.subset(rows)
                    abl = ablated[:, rows] if ablated.shape[1] > 1 else ablated
                    logits = soft_masked_logits(runner, tokens[rows], abl, sub.positions,
                                                z.to(engine.dtype))
                    task_loss = self._loss(logits, ref[rows], sub)
                    expected = 1 - keep_probability(log_alpha)[real].mean()
                    s_t = s_target * min(1.0, step / warm) if warm else s_target
                    gap = expected - s_t
                    loss = task_loss + lambdas[0] * gap + lambdas[1] * gap ** 2
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    step += 1
                    losses = {"task_loss": task_loss.item(), "expected_sparsity": expected.item()}
                    bar.set_postfix(loss=f"{losses['task_loss']:.3g}",
                                    sparsity=f"{losses['expected_sparsity']:.3f}")
                    bar.update(1)
                    ctx.save(key, state(), settings=description)
        except BaseException:
            ctx.save(key, state(), force=True, settings=description)
            raise
        finally:
            bar.close()
        ctx.save(key, state(), force=True, settings=description)
        final = log_alpha.detach()
        kept = float(keep_probability(final)[real].sum())
        wanted = (1.0 - s_target) * g.n_edges
        self.report = {"target_sparsity": s_target, "steps": step,
                       "expected_kept_edges": kept, "target_kept_edges": wanted,
                       "target_reached": kept <= wanted + max(1.0, 0.01 * g.n_edges),
                       "lambdas": [float(v) for v in lambdas.detach()], **losses}
        if not self.report["target_reached"]:
            warnings.warn(
                f"Edge pruning ended with {kept:.1f} expected edges, short of its target of "
                f"{wanted:.1f} (sparsity {s_target:.3g}) after {step} steps (last task loss "
                f"{losses.get('task_loss', math.nan):.3g}): too few steps, or a target below "
                "the edges the task needs, which the task loss defends while the Lagrange "
                "multipliers grow. The scores still rank edges; for a circuit of the target's "
                "size raise 'steps', or aim at a size the task allows ('target_edges' near "
                "its circuit's, or a lower 'sparsity').",
                RuntimeWarning, stacklevel=2)
        return (keep_probability(final) * real).float().cpu()

    def _loss(self, logits: Tensor, ref: Tensor, data: TaskData) -> Tensor:
        """The task loss of a minibatch: KL(p_full || p_z) (nats, mean over examples and
        positions) or the metric's worsening (its unit)."""
        if self.objective == "kl":
            lp = torch.log_softmax(logits.double(), -1)
            return (ref.exp() * (ref - lp)).sum(-1).mean()
        value = data.metric(logits).double().mean()
        return -value if getattr(data.task, "higher_is_better", True) else value
