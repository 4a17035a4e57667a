"""EAP-GP's gradient path: integrated gradients along an adaptive path of input embeddings.

Method (Zhang et al. 2025, "EAP-GP: Mitigating Saturation Effect in Gradient-based Automated
Circuit Identification", arXiv:2502.06852, §4, Algorithm 1). EAP-IG averages the receivers'
gradients over points on the straight line between the corrupted and the clean input
embeddings; where the metric saturates along that line the gradients vanish and the scores
miss edges that matter. EAP-GP ("GradPath") instead starts at the clean input embeddings
``gamma_0 = x`` and walks towards the corrupted *output*: each step descends the squared
distance between the model's logits at the current point and the corrupted run's logits,

    g_j         = d/d gamma_j  || G(gamma_j) - G(x') ||_2^2          (logits at the positions
    gamma_{j+1} = gamma_j - eta * g_j / ||g_j||_2                     real in both prompts, up
                                                                      to the last metric one)

so the path follows the direction in which the model's output changes fastest, away from
flat regions. Edge scores average the receivers' gradients over the path points
``gamma_1 .. gamma_m`` (a right Riemann sum, as the paper's eq. 9) and contract them with the
sender differences of the plain clean and corrupted runs, exactly as EAP-IG does:

    score(u -> r) = sum_{n, t} (a'_u - a_u) . (1 / m) sum_{j=1..m} d metric / d x_r (gamma_j)

Step length. The paper normalises each step's gradient; we normalise it per example (the
Frobenius norm over positions and ``d_model``, so examples in a batch do not share a step)
and, by default, take steps of length ``eta = ||x - x'||_F / m`` per example (over its
positions up to its last metric position, which is all running it alone reads: an example's
path does not depend on the other examples of its batch or on padding): the path is then as
long as the straight line, whatever the scale of the model's embeddings (a unit step
means very different things for GPT-2, whose embeddings have norms of a few units, and for
stories260k). ``step_size=1.0`` gives the paper's unit step.

Cost. ``m`` forward + backward passes to build the path (sequential: each step needs the
previous point), one clean and one corrupted forward for the sender differences and the
target logits, then ``m`` gradient runs stacked on the batch dimension (one forward + backward
through :func:`circuitfind.patching.attribution.attribute` per chunk of points): about
``2 m + 2`` forward and ``2 m`` backward passes, twice EAP-IG with the same ``m``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from circuitfind.errors import ConfigError
from circuitfind.patching.engine import PatchingEngine, frozen_parameters
from circuitfind.tasks.base import TaskData

if TYPE_CHECKING:
    from circuitfind.patching.runner import BlockRunner


def logits_from_embeddings(runner: BlockRunner, x: Tensor) -> Tensor:
    """The model's logits when its input embeddings are ``x`` (differentiable).

    Args:
        runner: The model's block runner.
        x: ``[N, T, d_model]`` input embeddings (the ``input`` sender's output).

    Returns:
        ``[N, T, V]`` logits.
    """
    lay, g = runner.arch, runner.graph
    for layer in range(g.n_layers):
        q, k, v = lay.qkv(layer, lay.ln_attn(layer, x))
        x_in, x = x, x + lay.attn_out(layer, lay.attend(layer, q, k, v))
        x = x + lay.mlp(layer, lay.ln_mlp(layer, x_in if lay.parallel else x))
    return lay.final(x)


def gradient_path(runner: BlockRunner, clean: Tensor, corrupted: Tensor, target: Tensor,
                  real: Tensor, steps: int, step_size: float | None = None,
                  used: Tensor | None = None) -> list[Tensor]:
    """The points ``gamma_1 .. gamma_m`` of EAP-GP's gradient path (module docstring).

    Args:
        runner: The model's block runner.
        clean: ``[N, T, d]`` clean input embeddings ``x`` (the path's start).
        corrupted: ``[N, T, d]`` corrupted input embeddings ``x'`` (sets the default step).
        target: ``[N, T, V]`` the corrupted run's logits ``G(x')``.
        real: ``[N, T]`` bool, positions whose logits enter the distance (real tokens up to
            the example's last metric position).
        steps: ``m >= 1``.
        step_size: Length of each step per example (``None``: ``||x - x'||_F / m`` over the
            positions up to the example's last metric position, ``used``).
        used: ``[N, T]`` bool, the positions each example's metric can depend on (``None``:
            all): the default step's norm reads only these, so that an example's path does
            not depend on how far other examples of its batch reach, nor on padding.

    Returns:
        ``m`` tensors ``[N, T, d]`` (detached).
    """
    n = clean.shape[0]
    if step_size is None:
        change = clean - corrupted if used is None else (clean - corrupted) * used[..., None]
        eta = change.reshape(n, -1).norm(dim=1) / steps
    else:
        eta = torch.full((n,), float(step_size), dtype=clean.dtype, device=clean.device)
    weight = real[..., None].to(target.dtype)
    point, points = clean.detach(), []
    for _ in range(steps):
        with torch.enable_grad():
            leaf = point.clone().requires_grad_(True)
            distance = ((logits_from_embeddings(runner, leaf) - target) * weight).pow(2).sum()
            (grad,) = torch.autograd.grad(distance, [leaf])
        norm = grad.reshape(n, -1).norm(dim=1).clamp_min(torch.finfo(grad.dtype).tiny)
        point = (point - (eta / norm)[:, None, None] * grad).detach()
        points.append(point)
    return points


def gradient_path_attribution(engine: PatchingEngine, data: TaskData, steps: int = 5,
                              step_size: float | None = None,
                              batch_size: int | None = None) -> Tensor:
    """EAP-GP scores: receivers' gradients averaged over the gradient path (module docstring).

    Args:
        engine: The patching engine (its ablation must be ``resample``: the path walks
            towards the corrupted run).
        data: Task data; the metric is ``data.metric`` averaged over the N examples.
        steps: Path points ``m`` (>= 1; the paper's default 5).
        step_size: Step length per example (``None``: ``||x - x'||_F / m``).
        batch_size: Examples per pass (``None``: from the engine's memory budget).

    Returns:
        ``[S, R]`` float32 scores (0 off real edges), in the task's metric unit: an estimate
        of ``metric(all edges but e) - metric(full model)``.

    Raises:
        ConfigError: a model without a block runner, or an ablation other than resample.

    References:
        Zhang et al. (2025), "EAP-GP: Mitigating Saturation Effect in Gradient-based Automated
        Circuit Identification", arXiv:2502.06852, Algorithm 1 and eqs. 7-9.
    """
    runner = engine.runner
    if runner is None:
        raise ConfigError("EAP-GP runs on the block runner, which this model's architecture "
                          "does not have; use eap_ig instead.")
    if engine.ablation.kind != "resample":
        raise ConfigError(f"EAP-GP's path walks towards the corrupted run; the "
                          f"{engine.ablation.kind!r} ablation is not supported. Use the resample "
                          "ablation, or EAP / exact.")
    g = engine.graph
    n_chunk, p_chunk, _ = engine.attribution_plan(data.n, data.seq_len, steps, batch_size)
    t = int(data.positions.max()) + 1
    clean_tokens = engine._tokens(data.clean)[:, :t]
    corrupted_tokens = engine._tokens(data.corrupted)[:, :t]
    on_device = engine.on_device(data)
    # positions up to each example's last metric position (what running it alone reads;
    # later positions cannot change its metric)
    used = (torch.arange(t, device=engine.device)[None]
            <= on_device.positions.max(1).values[:, None])
    real = on_device.attention_mask[:, :t].bool() & used
    if on_device.corrupted_attention_mask is not None:
        real = real & on_device.corrupted_attention_mask[:, :t].bool()
    scores = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64, device=engine.device)
    with frozen_parameters(engine.model):
        for e0 in range(0, data.n, n_chunk):
            es = slice(e0, min(data.n, e0 + n_chunk))
            n = es.stop - es.start
            sub = on_device if n == data.n else on_device.subset(es)
            tokens = clean_tokens[es]
            with torch.no_grad():
                clean_run = runner.cache(tokens)
                corrupted_run = runner.cache(corrupted_tokens[es])
                target = runner.arch.final(corrupted_run.resid[-1])
            ablated = corrupted_run.senders
            diff = clean_run.senders - ablated  # a - a'
            path = gradient_path(runner, clean_run.senders[0], ablated[0], target, real[es],
                                 steps, step_size, used[es])
            for p0 in range(0, steps, p_chunk):
                chunk = path[p0: p0 + p_chunk]

                def metric(logits: Tensor, sub: TaskData = sub, c: int = len(chunk)) -> Tensor:
                    picked = logits.view(c, n, *logits.shape[1:]) if c > 1 else logits
                    return sub.metric(picked).sum() / (data.n * steps)

                with torch.enable_grad():
                    scores += runner.attribute(tokens, ablated, sub.positions, metric,
                                               points=[("input", p) for p in chunk], diff=diff)
    return (scores * g.edge_mask.to(scores.device)).float().cpu()
