"""The plan for long prompts (no model: shapes written out): the checkpointed pass when one
example's plain gradient pass does not fit, the chunk of query positions it needs, host memory
for the sender buffer on a GPU, and a budget too small refused with the least that runs."""

from __future__ import annotations

import pytest

from circuitfind.errors import ConfigError
from circuitfind.patching import plan as mp
from circuitfind.patching.plan import ModelShape

GiB = 2**30
# Qwen-2.5-0.5B's shape (the long-prompt target); parameters as loaded (tied embeddings)
QWEN = ModelShape(name="qwen2.5-0.5b", n_layers=24, n_heads=14, n_kv_heads=2, d_model=896,
                  d_head=64, d_mlp=4864, d_vocab=151936, n_params=494_032_768, rms_norm=True,
                  mlp_mats=3)
# Gemma-2-2B's: soft-capped (eager) attention keeps each chunk's pattern
GEMMA = ModelShape(name="gemma-2-2b", n_layers=26, n_heads=8, n_kv_heads=4, d_model=2304,
                   d_head=256, d_mlp=9216, d_vocab=256000, n_params=2_614_341_888,
                   eager_attention=True, post_norm=True, rms_norm=True, mlp_mats=3)


def test_long_prompt_on_qwen_fits_six_gib_checkpointed():
    plan = mp.attribution_plan(QWEN, 1, 2048, 1, 6 * GiB)
    assert plan.fits and plan.peak <= plan.budget and plan.position_chunk == 2048
    # its weights, one sender buffer (S T d) and less than a GiB of one block's work
    store = mp.sender_bytes(QWEN, 2048)
    assert plan.weights + store < plan.peak < plan.weights + store + GiB
    assert plan.minimum <= plan.peak < mp.gradient_pass_minimum(QWEN, 2048)
    assert "long prompts" in plan.summary() and not plan.offload
    # the fused attention kernel keeps no pattern: no chunk smaller than the prompt helps
    assert mp.checkpointed_row_bytes(QWEN, 2048, 16) == mp.checkpointed_row_bytes(QWEN, 2048,
                                                                                   2048)
    # short prompts keep the plain (faster) pass
    assert mp.attribution_plan(QWEN, 8, 32, 1, 6 * GiB).position_chunk is None


def test_eager_attention_gets_the_largest_chunk_that_fits():
    t = 4096
    rows = {c: mp.checkpointed_row_bytes(GEMMA, t, c) for c in (4096, 2048, 1024, 512)}
    assert rows[4096] > rows[2048] > rows[1024] > rows[512]  # a chunk's pattern
    fixed = GEMMA.weights + mp.sender_bytes(GEMMA, t)
    for chunk in (2048, 1024, 512):
        plan = mp.attribution_plan(GEMMA, 2, t, 1, fixed + rows[chunk])
        assert plan.position_chunk == chunk and plan.examples_per_pass == 1
        assert plan.peak <= plan.budget and f"chunks of {chunk} query" in plan.summary()
    assert mp.attribution_plan(GEMMA, 2, t, 1, 2 * (fixed + rows[4096])).position_chunk == t


def test_gpu_puts_the_sender_buffer_in_host_memory_when_short():
    t = 4096
    row = mp.checkpointed_row_bytes(QWEN, t, t)
    budget = QWEN.weights + row + mp.sender_bytes(QWEN, t) // 2  # half the buffer's room
    on_gpu = mp.attribution_plan(QWEN, 1, t, 1, budget, device="cuda")
    assert on_gpu.offload and on_gpu.peak == QWEN.weights + row <= budget
    assert on_gpu.host == mp.sender_bytes(QWEN, t) and "host memory (4.94 GiB)" in \
        on_gpu.summary()
    with pytest.raises(ConfigError, match="at least"):  # a CPU has no host memory to spare
        mp.attribution_plan(QWEN, 1, t, 1, budget, device="cpu")
    roomy = mp.attribution_plan(QWEN, 1, t, 1, budget + mp.sender_bytes(QWEN, t),
                                device="cuda")
    assert not roomy.offload  # the buffer stays on the device when it fits


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_too_small_a_budget_is_refused_with_the_least_that_runs(device):
    least = mp.checkpointed_minimum(QWEN, 2048, 5, device=device)
    assert mp.attribution_plan(QWEN, 1, 2048, 5, least, device=device).fits
    with pytest.raises(ConfigError, match=f"at least {least} bytes"):
        mp.attribution_plan(QWEN, 1, 2048, 5, least - 1, device=device)


def test_time_counts_the_recomputation():
    plain = mp.attribution_plan(QWEN, 1, 512, 1, 64 * GiB)
    long = mp.attribution_plan(QWEN, 1, 512, 1, mp.gradient_pass_minimum(QWEN, 512) - 1)
    assert plain.position_chunk is None and long.position_chunk == 512
    # one forward more (the blocks' recomputation, its attention twice; a unit is a Hugging
    # Face forward, which also projects every position onto the vocabulary)
    assert plain.forward_units + 0.5 < long.forward_units < 1.5 * plain.forward_units
