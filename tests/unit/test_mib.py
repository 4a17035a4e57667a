"""MIB circuit-track task data from small files in MIB's format written here (no download)."""

from __future__ import annotations

import json

import pytest

import circuitfind as cf
from circuitfind.errors import ConfigError
from circuitfind.tasks.mib import MIB_TASKS, load_mib_rows, mib_task

datasets = pytest.importorskip("datasets")


def _ioi_row(io: str, s: str, c: str) -> dict:
    return {"prompt": f"Then, {io} and {s} went to the store. {s} gave a drink to",
            "metadata": {"indirect_object": io, "subject": s, "random_c": c},
            "choices": [io, s], "answerKey": 0,
            "s2_io_flip_counterfactual": {
                "prompt": f"Then, {io} and {s} went to the store. {io} gave a drink to",
                "choices": [s, io], "answerKey": 0},
            "abc_counterfactual": {
                "prompt": f"Then, {c} and {s} went to the park. {io} gave a drink to",
                "choices": [c, s], "answerKey": 0}}


def _choice_row(answer: int, cf_answer: int) -> dict:
    def block(key: int, labels: list[str]) -> dict:
        lines = "\n".join(f"{lab}. {col}" for lab, col in zip(labels, ["red", "blue", "green", "pink"]))
        return {"prompt": f"The sky is blue. What color is the sky?\n{lines}\nAnswer:",
                "choices": {"label": labels, "text": ["red", "blue", "green", "pink"]},
                "answerKey": key}
    row = block(answer, ["A", "B", "C", "D"])
    row["symbol_counterfactual"] = block(cf_answer, ["W", "X", "Y", "Z"])
    row["answerPosition_counterfactual"] = block((answer + 1) % 4, ["A", "B", "C", "D"])
    return row


def _arith_row(a: int, b: int, op: str) -> dict:
    value = a + b if op == "+" else a - b
    return {"prompt": f"Q: What is {a} {op} {b}? A:", "label": value, "operator": op,
            "random_counterfactual": {"prompt": f"Q: What is {a + 1} {op} {b}? A:",
                                      "label": value + 1}}


def _save(tmp_path, name, rows, split="train"):
    path = tmp_path / name
    datasets.DatasetDict({split: datasets.Dataset.from_list(rows)}).save_to_disk(str(path))
    return path


def test_ioi_maps_like_mib_with_its_counterfactuals(tmp_path, gpt2_tokenizer):
    path = _save(tmp_path, "ioi", [_ioi_row("Mary", "John", "Anne"), _ioi_row("Tom", "Kate", "Bob")])
    rows = load_mib_rows("ioi", path)
    assert rows[0].clean.endswith("John gave a drink to")
    assert rows[0].corrupted.endswith("Mary gave a drink to")  # s2_io_flip, MIB's default
    assert (rows[0].answers, rows[0].wrong) == ((" Mary",), (" John",))
    abc = load_mib_rows("mib-ioi", path, counterfactual="abc_counterfactual")
    assert abc[1].corrupted.startswith("Then, Bob and Kate went to the park")
    assert abc[1].wrong == (" Kate",)  # the clean subject, whatever the counterfactual
    with pytest.raises(ConfigError, match="no counterfactual 'random_names_counterfactual'; they "
                                          "have abc_counterfactual, s2_io_flip_counterfactual"):
        load_mib_rows("ioi", path, counterfactual="random_names_counterfactual")
    data = mib_task("ioi", path).build(gpt2_tokenizer)
    mib_ids = [gpt2_tokenizer(f" {n}", add_special_tokens=False).input_ids[0] for n in ("Mary", "Tom")]
    assert data.answers[:, 0].tolist() == mib_ids
    assert data.task.name == "mib_ioi" and data.task.metric_name == "logit difference"


def test_mcqa_arc_and_arithmetic(tmp_path, gpt2_tokenizer):
    choice = [_choice_row(1, 3), _choice_row(0, 2)]
    for task in ("mcqa", "arc_easy", "arc_challenge"):
        data = mib_task(task, _save(tmp_path, task, choice)).build(gpt2_tokenizer)
        assert data.answers[:, 0].tolist() == gpt2_tokenizer.convert_tokens_to_ids(["B", "A"])
        assert data.wrong_answers[:, 0].tolist() == gpt2_tokenizer.convert_tokens_to_ids(["Z", "Y"])
    pos = load_mib_rows("mcqa", _save(tmp_path, "m2", choice),
                        counterfactual="answerPosition_counterfactual")
    assert (pos[0].answers, pos[0].wrong) == (("B",), ("C",))
    arith = [_arith_row(12, 34, "+"), _arith_row(50, 20, "-"), _arith_row(3, 4, "+")]
    arith.append({**_arith_row(1, 1, "+"), "random_counterfactual": None})  # MIB skips it
    path = _save(tmp_path, "arith", arith)
    add = load_mib_rows("arithmetic_addition", path)
    sub = load_mib_rows("arithmetic_subtraction", path)
    assert [(r.answers, r.wrong) for r in add] == [(("46",), ("47",)), (("7",), ("8",))]
    assert [(r.answers, r.wrong, r.where) for r in sub] == [(("30",), ("31",), "row 2")]
    data = mib_task("arithmetic_addition", path).build(gpt2_tokenizer)
    assert data.answers[:, 0].tolist() == [gpt2_tokenizer("46").input_ids[0],
                                           gpt2_tokenizer("7").input_ids[0]]


def test_a_json_task_file_points_at_mib_data_and_bad_rows_are_dropped(tmp_path, gpt2_tokenizer):
    rows = [_ioi_row("Mary", "John", "Anne"), _ioi_row("Mary", "Mary", "Anne"),
            _ioi_row("Zorblaxian", "John", "Anne")]
    _save(tmp_path, "data", rows, split="test")
    spec = tmp_path / "mib_ioi.json"
    spec.write_text(json.dumps({"mib": "ioi", "data": "data", "split": "test",
                                "counterfactual": "abc_counterfactual"}))
    task = cf.get_task(str(spec))
    assert task.name == "mib_ioi" and task.source == str(spec) and len(task.rows) == 3
    data = task.build(gpt2_tokenizer)
    assert data.n == 1 and data.info["dropped"] == ["row 2", "row 3"]  # equal / multi-token
    with pytest.raises(ConfigError, match="has no split 'train'"):
        mib_task("ioi", tmp_path / "data")
    spec.write_text(json.dumps({"mib": "ioi", "data": "nowhere"}))
    with pytest.raises(ConfigError, match="does not exist"):
        cf.get_task(spec)
    spec.write_text(json.dumps({"mib": "ioi", "datа": "data"}))  # a Cyrillic a
    with pytest.raises(ConfigError, match="unknown key"):
        cf.get_task(spec)
    with pytest.raises(ConfigError, match="Unknown MIB task 'sva'"):
        mib_task("sva", tmp_path / "data")


def test_a_directory_of_jsonl_files(tmp_path, monkeypatch, gpt2_tokenizer):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "clone"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps(_ioi_row("Mary", "John", "Anne")) + "\n")
    rows = load_mib_rows("ioi", folder)
    assert len(rows) == 1 and rows[0].answers == (" Mary",)


def test_registered_hub_tasks_are_listed_without_network():
    assert {f"mib_{k}" for k in MIB_TASKS} <= set(cf.TASKS.names())
    task = cf.get_task("mib-arc-easy")
    assert task.metric_name == "logit difference" and "mib-bench/arc_easy" in task.description


def test_datasets_is_imported_only_when_mib_data_are_read():
    import subprocess
    import sys

    code = ("import sys, circuitfind as cf; cf.get_task('mib_ioi'); "
            "print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
