"""`circuitfind discover --model stories260k --task FILE` on the user's own prompts (JSONL and
CSV), with the full model's metric equal to plain Hugging Face on the unpadded prompts."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

import circuitfind as cf
from circuitfind.cli import main
from tolerances import FLOAT32_MODEL_ULPS, float32_atol

pytestmark = pytest.mark.acceptance

GIRL = "Once upon a time, there was a little girl named Lily. She liked to play. One day,"
BOY = "Once upon a time, there was a little boy named Tim. He liked to play. One day,"
ROWS = [  # unequal lengths within and across rows
    {"clean": GIRL, "corrupted": BOY, "answer": " she", "wrong": " he"},
    {"clean": BOY, "corrupted": GIRL, "answer": " he", "wrong": " she"},
    {"clean": "Lily had a big red ball. One day, Lily lost the ball. Then",
     "corrupted": "Tim had a ball. One day, Tim lost it. Then", "answer": " Lily", "wrong": " Tim"},
    {"clean": "Tim saw a cat. Tim wanted to pet the cat. So",
     "corrupted": "Lily saw a big black cat in the garden. Lily wanted to pet it. So",
     "answer": " Tim", "wrong": " Lily"},
]


def _write(path, fmt: str):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    else:
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["clean", "corrupted", "answer", "wrong"])
            writer.writeheader()
            writer.writerows(ROWS)
    return path


def _plain_hf_logit_diffs(stories_dir) -> tuple[torch.Tensor, float]:
    """Logit difference per row from transformers alone: tokenizer(prompt) (BOS added), no
    padding, answer token = the token prompt + answer adds after the prompt; and the largest
    |logit| (the scale of float32 rounding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stories_dir))
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir)).eval()
    out, largest = [], 0.0
    for row in ROWS:
        ids = tok(row["clean"]).input_ids
        n = len(tok(row["clean"], add_special_tokens=False).input_ids)
        ans = tok(row["clean"] + row["answer"], add_special_tokens=False).input_ids[n:]
        wrong = tok(row["clean"] + row["wrong"], add_special_tokens=False).input_ids[n:]
        assert len(ans) == len(wrong) == 1
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        out.append(logits[ans[0]] - logits[wrong[0]])
        largest = max(largest, float(logits.abs().max()))
    return torch.stack(out), largest


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_discover_on_my_prompts_matches_plain_hugging_face(fmt, stories_dir, tmp_path,
                                                           monkeypatch, capsys):
    path = _write(tmp_path / f"mine.{fmt}", fmt)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["circuitfind", "discover", "--model", str(stories_dir),
                                      "--task", str(path), "--edges", "40", "--out",
                                      str(tmp_path / "run"), "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0, capsys.readouterr().err
    circuit = cf.Circuit.load(tmp_path / "run" / "circuit.json")
    expected, largest = _plain_hf_logit_diffs(stories_dir)
    # stories260k is a float32 model, padded here and unpadded in plain Hugging Face: a logit
    # difference to two logits' float32 rounding (measured: 8.1e-6, largest |logit| ~20)
    atol = 2 * float32_atol(largest, FLOAT32_MODEL_ULPS)
    faith = circuit.metadata["faithfulness"]
    print(f"\nstories260k, {fmt}: m(M) {faith['metric_full']:+.4f} (plain HF "
          f"{float(expected.mean()):+.4f}), m(∅) {faith['metric_empty']:+.4f}, "
          f"faithfulness {faith['faithfulness']:.3f} with {circuit.n_edges} edges")
    assert faith["metric_full"] == pytest.approx(float(expected.mean()), abs=atol)
    assert (expected > 0).all()  # the model prefers the clean answer on every row
    assert circuit.metadata["n_examples"] == len(ROWS)
    assert faith["metric_empty"] < faith["metric_full"]

    model = cf.load_model(stories_dir, device="cpu")
    data = cf.build_data(model, str(path))
    engine = cf.PatchingEngine(model)
    per_example = data.metric(engine.run(data, engine.graph.full_mask())[0])
    torch.testing.assert_close(per_example.float(), expected.float(), atol=atol, rtol=0)
