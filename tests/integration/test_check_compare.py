"""Researchers' everyday checks: does the model do the task, how alike are two circuits."""

from __future__ import annotations

import json

import pytest
import torch

import circuitfind as cf
from circuitfind.errors import ConfigError
from circuitfind.evaluation.check import check as check_data
from circuitfind.graphs import ComputeGraph
from circuitfind.graphs.circuit import Circuit
from circuitfind.testing import ToyTask
from tolerances import atol_for


def test_check_reports_accuracy_and_the_metric_on_clean_and_corrupted(tiny_models):
    model = tiny_models("gpt2")
    data = ToyTask().build(model.tokenizer, 6, seed=1)
    result = check_data(model, data, per_example=True)
    engine = cf.PatchingEngine(model)
    g = engine.graph
    full, empty = engine.evaluate(data, torch.stack([g.full_mask(torch.float64),
                                                     torch.zeros_like(g.full_mask(torch.float64))]))
    assert result.clean["mean"] == pytest.approx(float(full))
    assert result.corrupted["mean"] == pytest.approx(float(empty))
    assert result.gap == pytest.approx(float(full - empty))
    # accuracy: the answer's logit beats the wrong answer's at the metric position
    with torch.no_grad():
        logits = model(data.clean)[torch.arange(data.n), data.positions[:, 0]]
    wins = logits.gather(1, data.answers)[:, 0] > logits.gather(1, data.wrong_answers)[:, 0]
    assert result.accuracy == pytest.approx(float(wins.double().mean()))
    assert [row["correct"] for row in result.examples] == wins.tolist()
    assert len(result.examples) == 6 and json.dumps(result.to_dict())


def test_check_recognises_a_real_behaviour():
    real = cf.check("zoo:ioi-small", "ioi", n_examples=16)
    assert not real.noise and real.accuracy > 0.9 and "the model does ioi" in real.verdict


def test_check_flags_a_task_the_model_does_not_do(tiny_models):
    """A random model on random tokens has no behaviour: the gap is within the spread."""
    model = tiny_models("llama")
    result = check_data(model, ToyTask().build(model.tokenizer, 16, seed=5))
    assert result.noise and "NOT" in result.verdict


def test_compare_measures_overlap_rank_agreement_and_refuses_other_graphs(tmp_path):
    g = ComputeGraph(2, 4)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(g.n_senders, g.n_receivers, generator=gen) * g.edge_mask
    a = cf.graphs.select_top_n(g, scores, 20)
    same = cf.compare(a, a)
    assert same.edge_jaccard == same.node_jaccard == 1.0 and same.spearman == pytest.approx(1.0)
    assert same.top_k == {10: 1.0, 50: 1.0, 100: 1.0}
    # B: the same scores negated and stored as importances: |score| and importance orders of
    # the kept edges then disagree, and the numbers follow the definitions
    b = Circuit(g, cf.graphs.select_top_n(g, -scores, 30, absolute=False).kept, -scores,
                {"scores": {"kind": "importance", "unit": "nats"}})
    result = cf.compare(a, b, ks=(5, 40))
    ea, eb = set(a.edge_ids.tolist()), set(b.edge_ids.tolist())
    assert result.edge_jaccard == pytest.approx(len(ea & eb) / len(ea | eb))
    assert result.score_kinds == ("metric_change", "importance")
    ka, kb = g.to_edges(scores).abs(), g.to_edges(-scores)
    top = lambda keys, k: set(torch.sort(keys, descending=True, stable=True).indices[:k].tolist())  # noqa: E731
    assert result.top_k[40] == pytest.approx(len(top(ka, 40) & top(kb, 40)) / 40)
    with pytest.raises(ConfigError, match="different graphs"):
        cf.compare(a, Circuit.empty(ComputeGraph(3, 4)))
    with pytest.raises(ConfigError, match="integers"):
        cf.compare(a, a, ks=(0,))


def test_cli_check_and_compare(run, tmp_path):
    checked = run("check", "--task", "ioi", "--examples", "8", "--per-example")
    assert checked.returncode == 0, checked.stderr
    assert "the model does ioi" in checked.stdout and "#7" in checked.stdout
    out = tmp_path / "a"
    assert run("discover", "--task", "ioi", "--examples", "8", "--edges", "20", "--out",
               str(out), "--renderer", "matplotlib").returncode == 0
    assert run("export", str(out / "circuit.json"), "--format", "mib", "--out",
               str(tmp_path / "m.json")).returncode == 0
    # a circuitfind circuit against its own MIB export: identical
    compared = run("compare", str(out / "circuit.json"), str(tmp_path / "m.json"), "--json")
    assert compared.returncode == 0, compared.stderr
    result = json.loads(compared.stdout)
    assert result["edge_jaccard"] == 1.0 and result["spearman"] == pytest.approx(1.0)


# clean prompts of different lengths; rows with two answers or two wrong answers pad the others
# with -1, which accuracy must not read as token 0
PROMPT_ROWS = [
    {"clean": "w3 w4 w5", "corrupted": "w6 w7 w8 w9", "answer": " w12", "wrong": " w13"},
    {"clean": "w20 w21 w22 w23 w24", "corrupted": "w27 w28", "answer": " w29", "wrong": " w30"},
    {"clean": "w31 w32", "corrupted": "w33 w34", "answer": [" w35", " w36"], "wrong": " w37"},
    {"clean": "w40 w41 w42 w43", "corrupted": "w45 w46 w47 w48", "answer": " w50",
     "wrong": [" w51", " w52"]},
]


def _hf_next_logits(model, prompt: str) -> torch.Tensor:
    """Plain Hugging Face forward on the unpadded clean prompt (BOS first)."""
    tok = model.tokenizer
    hf = model.original_model if hasattr(model, "original_model") else (
        model._driver.underlying_model)
    ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].double()


def test_check_on_a_prompt_file_reads_every_row_and_ignores_answer_padding(tiny_models,
                                                                            tmp_path):
    model = tiny_models("llama")
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in PROMPT_ROWS))
    result = cf.check(model, str(path), per_example=True)
    tok = model.tokenizer
    expected_correct, expected_clean, largest = [], [], 0.0
    for row in PROMPT_ROWS:
        logits = _hf_next_logits(model, row["clean"])
        largest = max(largest, float(logits.abs().max()))
        ids = {key: [tok.convert_tokens_to_ids(t.strip()) for t in
                     ([row[key]] if isinstance(row[key], str) else row[key])]
               for key in ("answer", "wrong")}
        expected_correct.append(bool(logits[ids["answer"]].max() > logits[ids["wrong"]].max()))
        expected_clean.append(float(logits[ids["answer"]].mean() - logits[ids["wrong"]].mean()))
    assert result.n_examples == len(PROMPT_ROWS) and result.metric_name == "logit difference"
    assert [r["correct"] for r in result.examples] == expected_correct
    assert result.accuracy == pytest.approx(sum(expected_correct) / len(PROMPT_ROWS))
    # float32 softmaxes inside this float64 Llama (tests/tolerances.py); a logit difference
    # carries two logits' rounding
    assert [r["clean"] for r in result.examples] == pytest.approx(
        expected_clean, abs=2 * atol_for(model, largest))
    assert result.examples[2]["answer"] == ["w35", "w36"] and result.examples[0]["wrong"] == [
        "w13"]  # padding dropped


def test_check_on_mib_task_data_equals_the_same_rows_as_a_prompt_file(tiny_models, tmp_path):
    """MIB's IOI mapping (clean prompt, s2_io_flip counterfactual, answer the indirect object,
    wrong the subject) read through a MIB task file gives the prompt file's numbers."""
    datasets = pytest.importorskip("datasets")
    model = tiny_models("gpt2")

    def row(io: str, s: str) -> dict:
        return {"prompt": f"w9 {io} w10 {s} w11 {s} w12", "choices": [io, s], "answerKey": 0,
                "metadata": {"indirect_object": io, "subject": s, "random_c": "w3"},
                "s2_io_flip_counterfactual": {"prompt": f"w9 {io} w10 {s} w11 {io} w12",
                                              "choices": [s, io], "answerKey": 0}}

    names = [("w5", "w6"), ("w7", "w8"), ("w14", "w15")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(
        [row(io, s) for io, s in names])}).save_to_disk(str(tmp_path / "mib_ioi"))
    spec = tmp_path / "mib.json"
    spec.write_text(json.dumps({"mib": "ioi", "data": "mib_ioi"}))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(json.dumps({
        "clean": row(io, s)["prompt"], "corrupted": row(io, s)["s2_io_flip_counterfactual"][
            "prompt"], "answer": f" {io}", "wrong": f" {s}"}) for io, s in names))
    mib, mine = cf.check(model, str(spec)), cf.check(model, str(plain))
    assert mib.task == "mib_ioi" and mib.n_examples == 3
    for key in ("accuracy", "gap", "clean", "corrupted", "noise"):
        assert getattr(mib, key) == pytest.approx(getattr(mine, key))


def test_cli_check_on_a_prompt_file_needs_a_model(run, tmp_path):
    from circuitfind.testing import make_tiny_model_dir

    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in PROMPT_ROWS))
    refused = run("check", "--task", str(path))
    assert refused.returncode != 0 and "--model" in refused.stderr
    assert "Traceback" not in refused.stderr
    model_dir = make_tiny_model_dir(tmp_path / "tiny", arch="gpt2", n_layers=2, n_heads=2)
    checked = run("check", "--task", str(path), "--model", str(model_dir), "--per-example")
    assert checked.returncode == 0, checked.stderr
    lines = checked.stdout.splitlines()
    assert lines[0].startswith(f"{path.stem} on tiny, 4 examples: the model ")
    assert any(line.startswith("  accuracy ") and "wrong answer" in line for line in lines)
    # rows padded to two answers / two wrong answers show only their own tokens
    assert "'w35/w36' vs 'w37'" in checked.stdout and "'w12' vs 'w13'" in checked.stdout
    as_json = json.loads(run("check", "--task", str(path), "--model", str(model_dir),
                             "--json").stdout)
    assert as_json["n_examples"] == 4 and as_json["verdict"] in lines[0]


def test_cli_compare_refuses_other_graphs_and_bad_k_without_a_traceback(run, tmp_path):
    g = ComputeGraph(2, 4)
    scores = torch.randn(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(3))
    cf.graphs.select_top_n(g, scores * g.edge_mask, 12).save(tmp_path / "a.json")
    Circuit.empty(ComputeGraph(3, 4)).save(tmp_path / "b.json")
    other = run("compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert other.returncode != 0 and "different graphs" in other.stderr
    bad_k = run("compare", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--k", "5,x")
    assert bad_k.returncode == 2 and "--k takes comma-separated integers" in bad_k.stderr
    big_k = run("compare", str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--k", "5,1000")
    assert big_k.returncode == 0, big_k.stderr
    assert "k=5: 1.00" in big_k.stdout and f"k=1000: the graph has {g.n_edges} edges" in (
        big_k.stdout)
    for result in (other, bad_k):
        assert "Traceback" not in result.stderr
