"""``cf.check`` on a real pretrained model: stories260k does gendered pronouns and has no
induction behaviour.

Measured with this code (64 examples, seed 0): gendered_pronoun logit difference 5.17 ± 0.77
clean vs -5.29 ± 0.86 corrupted, accuracy 100%; induction log probability -11.1 ± 1.4 nats
clean vs -11.3 ± 1.4 corrupted (gap 0.14 nats), top-1 accuracy 0.7%. The assertions keep a
margin from those values.
"""

from __future__ import annotations

import pytest

import circuitfind as cf

pytestmark = pytest.mark.acceptance


@pytest.fixture(scope="module")
def model(stories_dir):
    return cf.load_model(stories_dir, device="cpu")


def test_check_recognises_gendered_pronouns(model):
    result = cf.check(model, "gendered_pronoun", n_examples=32)
    assert not result.noise and result.accuracy > 0.9
    assert result.clean["mean"] > 3 and result.corrupted["mean"] < -3
    assert result.verdict.startswith("the model does gendered_pronoun: logit difference")


def test_check_flags_induction_as_noise(model):
    result = cf.check(model, "induction", n_examples=32)
    assert result.noise and abs(result.gap) < result.clean["std"]
    assert result.accuracy < 0.1  # top-1: the repeated token is almost never predicted
    assert "NOT clearly" in result.verdict and "noise" in result.verdict
