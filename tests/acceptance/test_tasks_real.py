"""The gendered_pronoun task on the real stories260k model (../shared/models/stories260k).

The model is loaded with plain ``transformers`` (the task never loads a model), fed the clean
and the corrupted prompts, and read at ``data.positions``. Measured on this machine (n = 200,
seed 0, float32 CPU), logit difference correct - other pronoun: clean mean +5.33 (female +5.42,
male +5.24; every example > 0, min +3.00); corrupted mean -5.25 (every example < 0, max
-2.58). The assertions leave a margin of 2 logits on the means.
"""

from __future__ import annotations

import pytest
import torch

from circuitfind.tasks import TaskData, get_task

pytestmark = pytest.mark.acceptance


def _metric(model, data: TaskData, tokens: torch.Tensor) -> torch.Tensor:
    """Per-example metric ``[N]`` of ``model`` on ``tokens`` (right-padded, so no mask needed)."""
    with torch.no_grad():
        logits = model(tokens).logits  # [N, T, V]
    index = data.positions[..., None].expand(-1, -1, logits.shape[-1])
    return data.metric(logits.gather(1, index))  # [N]


def test_stories260k_tracks_the_pronoun_gender(stories_dir, stories_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(stories_dir)).eval()
    data = get_task("gendered_pronoun").build(stories_tokenizer, 200, seed=0)
    clean = _metric(model, data, data.clean)
    corrupted = _metric(model, data, data.corrupted)
    female = torch.tensor([g == "female" for g in data.info["genders"]])
    print(f"\nstories260k gendered_pronoun (n={data.n}, seed=0): clean logit diff mean "
          f"{clean.mean():+.3f} (female {clean[female].mean():+.3f}, male "
          f"{clean[~female].mean():+.3f}, min {clean.min():+.3f}); corrupted mean "
          f"{corrupted.mean():+.3f} (max {corrupted.max():+.3f})")
    assert clean.mean() > 5.33 - 2.0
    assert corrupted.mean() < -5.25 + 2.0
    assert (clean > 0).all() and (corrupted < 0).all()
