"""The masked pass's per-mask arithmetic against its plain definitions.

- eq. (1)'s sums read only the senders a receiver has a nonzero weight from
  (``_Form.senders``): the spans equal a brute-force scan, and a sum over the span equals the
  sum over every sender;
- every q/k/v receiver's own projection in one batched matmul per mask (``heads_matmul``)
  equals ``torch.matmul``, for sliced inputs and inputs broadcast over the masks;
- the stacked (norm-folded) q/k/v head weights (``Architecture.qkv_head_weights``) equal the
  per-kind ``head_weights``, for every head and for subsets, and follow an in-place change of
  the weights.

The passes that use them are pinned to the hooked engine by test_runner.py and
test_fast_path_matrix.py (float32 and float64, every family and strategy).
"""

from __future__ import annotations

import numpy as np
import torch

from circuitfind.patching.architectures.base import heads_matmul
from circuitfind.patching.masked_pass import _Form, receiver_changes


def test_form_senders_span_the_nonzero_weights_and_keep_the_sums():
    gen = torch.Generator().manual_seed(0)
    k, a, j, r, x = 3, 7, 9, 6, 40  # sums of 16 or more rows: spans are found
    w_shared = (torch.rand(k, a, r, generator=gen) < 0.2).double()
    w_dyn = (torch.rand(k, j, r, generator=gen) < 0.2).double()
    w_dyn[:, :, 4] = 0  # a receiver no computed sender reaches
    shared = torch.randn(a, x, generator=gen, dtype=torch.float64)
    current = torch.randn(k, j, x, generator=gen, dtype=torch.float64)
    form = _Form(w_shared, w_dyn, shared, np.ones((k, r), dtype=bool))
    for rs in ([0], [1, 3], [4], [0, 1, 2, 3, 4, 5]):
        for part, w, limit in (("shared", w_shared, a), ("dyn", w_dyn, j), ("dyn", w_dyn, 5)):
            used = w[:, :limit][:, :, rs].ne(0).any(2).any(0).nonzero()[:, 0].tolist()
            expected = (used[0], used[-1] + 1) if used else (0, 0)
            if limit * k < 16:  # short sums are read whole
                expected = (0, limit)
            assert form.senders(part, rs, limit) == expected
        lo, hi = form.senders("dyn", rs, j)
        full = receiver_changes(w_dyn[:, :, rs], current)
        if hi:
            torch.testing.assert_close(receiver_changes(w_dyn[:, lo:hi][:, :, rs],
                                                        current[:, lo:hi]), full)
        else:
            assert full.abs().max() == 0


def test_heads_matmul_equals_matmul():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 7, 4, generator=gen)
    w = torch.randn(2, 4, 6, generator=gen)
    sliced = x[:, 1:3]  # a slice of the receivers: not one batch axis
    torch.testing.assert_close(heads_matmul(sliced, w), torch.matmul(sliced, w))
    broadcast = x[:1, :2].expand(3, -1, -1, -1)
    out = heads_matmul(broadcast, w)
    assert out.stride(0) == 0  # taken once
    torch.testing.assert_close(out, torch.matmul(broadcast, w))


def test_qkv_head_weights_stack_the_head_weights(tmp_path):
    from circuitfind.graphs import ComputeGraph
    from circuitfind.patching.runner import block_runner
    from circuitfind.testing import tiny_model

    model = tiny_model(tmp_path, arch="qwen2", n_layers=2, n_heads=4, n_kv_heads=2, seed=3)
    lay = block_runner(model, ComputeGraph.from_model(model)).arch
    scale = torch.rand(lay.head_weights(1, "q")[0].shape[1]) + 0.5
    heads = {"q": [3, 0], "k": [1], "v": [0, 1]}
    for sel in (None, heads):
        w, b = lay.qkv_head_weights(1, sel, scale)
        parts = [lay.head_weights(1, kind) for kind in "qkv"]
        pick = (lambda t, kind: t) if sel is None else (lambda t, kind: t[sel[kind]])
        torch.testing.assert_close(w, torch.cat([scale[:, None] * pick(wh, kind)
                                                 for (wh, _), kind in zip(parts, "qkv")]))
        assert b is not None  # Qwen2's q/k/v biases
        torch.testing.assert_close(b, torch.cat([pick(bh, kind)
                                                 for (_, bh), kind in zip(parts, "qkv")]))
    kept, _ = lay.qkv_head_weights(1)
    assert lay.qkv_head_weights(1)[0] is kept  # kept between calls
    with torch.no_grad():
        lay.head_weights(1, "k")[0].mul_(2.0)  # an in-place change of the weights
    torch.testing.assert_close(lay.qkv_head_weights(1)[0][4:6], lay.head_weights(1, "k")[0])
