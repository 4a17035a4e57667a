"""Prompt-file tasks on tiny models: unequal lengths score like one example at a time, and the
metrics equal plain Hugging Face forward passes on the unpadded prompts."""

from __future__ import annotations

import json

import pytest
import torch

import circuitfind as cf
from circuitfind.patching import PatchingEngine
from circuitfind.tasks.files import PromptRow, PromptTask
from tolerances import EPS32, assert_close, atol_for

# clean and corrupted lengths differ within rows (both ways) and across rows
ROWS = [
    ("w3 w4 w5", "w6 w7 w8 w9 w10 w11", " w12", " w13"),
    ("w20 w21 w22 w23 w24 w25 w26", "w27 w28", " w29", " w30"),
    ("w31 w32", "w33 w34", [" w35", " w36"], " w37"),
    ("w40 w41 w42 w43 w44", "w45 w46 w47 w48 w49", " w50", [" w51", " w52"]),
]


def _task(rows, metric="logit_diff") -> PromptTask:
    out = [PromptRow(c, x, tuple([a] if isinstance(a, str) else a),
                     tuple([w] if isinstance(w, str) else w), f"row {i}")
           for i, (c, x, a, w) in enumerate(rows, 1)]
    return PromptTask(out, metric=metric, name="t")


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
@pytest.mark.parametrize("algorithm", ["eap", "exact"])
def test_unequal_lengths_score_like_one_example_at_a_time(tiny_models, name, algorithm):
    model = tiny_models(name)
    data = cf.build_data(model, _task(ROWS))
    lengths_c, lengths_x = data.attention_mask.sum(1), data.corrupted_attention_mask.sum(1)
    assert (lengths_c != lengths_x).any() and len(set(lengths_c.tolist())) > 1
    assert data.seq_len == int(torch.maximum(lengths_c, lengths_x).max())
    batched = cf.score_edges(model, data=data, algorithm=algorithm)
    singles = [cf.score_edges(model, data=cf.build_data(model, _task([row])), algorithm=algorithm)
               for row in ROWS]
    for row, single in zip(ROWS, singles):  # one example alone is not padded beyond itself
        alone = cf.build_data(model, _task([row]))
        assert alone.seq_len == max(alone.attention_mask.sum(), alone.corrupted_attention_mask.sum())
    expected = torch.stack(singles).double().mean(0)  # the metric is the batch mean
    assert batched.abs().max() > 1e-3
    # scores are float64 sums stored as float32 (one rounding each: one ulp of the largest);
    # the Llama model adds its float32 steps (atol_for)
    largest = float(torch.stack(singles).abs().max())
    assert_close(model, batched.double(), expected, float64=EPS32 * largest)


def _hf_logits(model, prompt_ids: list[int]) -> torch.Tensor:
    """Plain Hugging Face forward on unpadded tokens: next-token logits after the prompt."""
    hf = model.original_model if hasattr(model, "original_model") else model._driver.underlying_model
    with torch.no_grad():
        return hf(torch.tensor([prompt_ids])).logits[0, -1]


@pytest.mark.parametrize("metric", ["logit_diff", "prob_diff", "log_prob", "kl"])
def test_metric_values_equal_plain_hugging_face(tiny_models, metric):
    model = tiny_models("llama")
    tok = model.tokenizer
    data = cf.build_data(model, _task(ROWS, metric))
    engine = PatchingEngine(model)
    full = engine.run(data, engine.graph.full_mask())[0]  # [N, 1, V]
    values = data.metric(full)
    for i, (clean, _, answers, wrong) in enumerate(ROWS):
        answers = [answers] if isinstance(answers, str) else answers
        wrong = [wrong] if isinstance(wrong, str) else wrong
        logits = _hf_logits(model, [tok.bos_token_id] + tok.encode(clean, add_special_tokens=False))
        ids_a = [tok.convert_tokens_to_ids(a.strip()) for a in answers]
        ids_w = [tok.convert_tokens_to_ids(w.strip()) for w in wrong]
        probs = logits.double().softmax(-1)
        expected = {"logit_diff": logits[ids_a].mean() - logits[ids_w].mean(),
                    "prob_diff": probs[ids_a].sum() - probs[ids_w].sum(),
                    "log_prob": probs[ids_a].sum().log(),
                    "kl": torch.tensor(0.0)}[metric]
        # float32 softmaxes inside this float64 Llama: each logit to atol_for; these metrics
        # move by at most the sum of two logits' errors
        assert float(values[i]) == pytest.approx(float(expected), abs=2 * atol_for(model, logits))
    if metric == "kl":  # the empty circuit moves away from the full model
        empty = data.metric(engine.run(data, engine.graph.full_mask() * 0)[0])
        assert (empty > 1e-4).all()


def test_eap_refuses_a_metric_whose_gradient_vanishes_in_the_clean_run(tiny_models):
    """KL to the full model is 0 at its minimum in the clean run: EAP's gradient would be 0
    everywhere, so EAP says so; EAP-IG integrates along the path and is not 0."""
    from circuitfind.algorithms import EAP, EAPIG
    from circuitfind.errors import ConfigError

    model = tiny_models("llama")
    data = cf.build_data(model, _task(ROWS, "kl"))
    engine = PatchingEngine(model)
    assert engine.edge_attribution(data).abs().max() < 1e-6  # what EAP would return
    with pytest.raises(ConfigError, match="eap_ig or exact"):
        EAP().score(engine, data)
    assert EAPIG(steps=3).score(engine, data).abs().max() > 1e-4


def test_cli_discover_on_a_prompt_file(tiny_models, tmp_path, monkeypatch, capsys):
    import sys

    from circuitfind.cli import main
    from circuitfind.testing import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path / "model", arch="gpt2")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "my_behaviour", "description": "my own prompts",
                                "metric": "prob_diff",
                                "examples": [{"clean": c, "corrupted": x, "answer": a, "wrong": w}
                                             for c, x, a, w in ROWS]}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["circuitfind", "discover", "--model", str(model_dir),
                                      "--task", str(path), "--edges", "10", "--out",
                                      str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0, capsys.readouterr().err
    saved = cf.Circuit.load(tmp_path / "run" / "circuit.json")
    assert saved.metadata["task"] == "my_behaviour"
    assert saved.metadata["task_source"] == str(path)
    assert saved.metadata["metric"] == "probability difference"
    assert saved.metadata["n_examples"] == len(ROWS)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "my own prompts" in report
