"""Prompt files as tasks: formats, the answer-token rule, and validation that lists every
problem with its line or row."""

from __future__ import annotations

import json

import pytest
import torch

import circuitfind as cf
from circuitfind.errors import ConfigError, TaskDataError, UnknownNameError
from circuitfind.tasks.files import PromptTask
from circuitfind.tasks.lookup import load_task_file

LILY = "Once upon a time, there was a little girl named Lily. She liked to play. One day,"
TIM = "Once upon a time, there was a little boy named Tim. He liked to play. One day,"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_csv_and_json_give_the_same_rows(tmp_path):
    rows = [{"clean": LILY, "corrupted": TIM, "answer": " she", "wrong": " he"},
            {"clean": TIM, "corrupted": LILY, "answer": [" he", " Tim"], "wrong": " she"}]
    a = cf.get_task(_jsonl(tmp_path / "a.jsonl", rows))
    csv_path = tmp_path / "b.csv"
    csv_path.write_text('clean, corrupted ,answer,wrong\n'
                        f'"{LILY}","{TIM}", she, he\n'
                        f'"{TIM}","{LILY}","["" he"", "" Tim""]", she\n', encoding="utf-8")
    b = cf.get_task(str(csv_path))
    (tmp_path / "c.json").write_text(json.dumps({"name": "pronouns", "description": "my prompts",
                                                 "metric": "prob_diff", "examples": rows}))
    c = cf.get_task(tmp_path / "c.json")
    assert [(r.clean, r.corrupted, r.answers, r.wrong) for r in a.rows] == \
        [(r.clean, r.corrupted, r.answers, r.wrong) for r in b.rows] == \
        [(r.clean, r.corrupted, r.answers, r.wrong) for r in c.rows]
    assert a.rows[1].answers == (" he", " Tim")
    assert (a.name, a.metric_key, a.metric_unit) == ("a", "logit_diff", "logits")
    assert (c.name, c.description, c.metric_key, c.metric_unit) == \
        ("pronouns", "my prompts", "prob_diff", "probability")
    assert load_task_file(tmp_path / "c.json", metric="kl").metric_key == "kl"
    assert b.rows[0].where == "line 2" and a.rows[1].where == "line 2" and c.rows[1].where == "row 2"


def test_every_problem_is_listed_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"clean": LILY, "corrupted": TIM, "answer": " she", "wrong": " he"}),
        json.dumps({"clean": "", "corrupted": TIM, "answer": " she", "wrong": " he"}),
        json.dumps({"clean": LILY, "corrupted": TIM, "anwser": " she", "wrong": " he"}),
        "{not json",
        json.dumps({"clean": LILY, "corrupted": TIM, "answer": " she", "wrong": " she"}),
        json.dumps({"clean": LILY, "corrupted": "  ", "answer": " she", "wrong": " he"}),
    ]), encoding="utf-8")
    with pytest.raises(TaskDataError) as err:
        cf.get_task(str(path))
    message = str(err.value)
    assert "5 problems" in message
    assert "line 2: empty clean prompt" in message
    assert "line 3: missing 'answer' (found: clean, corrupted, anwser, wrong)" in message
    assert "line 4: not valid JSON" in message
    assert "line 5: answer equal to wrong (' she')" in message
    assert "line 6: empty corrupted prompt" in message
    assert "line 1" not in message


def test_csv_missing_column_is_reported_per_row_grouped(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("clean,corrupted,answer\n" + "".join(f"a{i},b{i}, x\n" for i in range(12)))
    with pytest.raises(TaskDataError, match=r"line 2, line 3, .* and 4 more: missing 'wrong'"):
        cf.get_task(path)
    task = cf.get_task(path, metric="log_prob")  # log_prob needs no wrong answer
    assert len(task.rows) == 12 and task.rows[0].wrong == ()


def test_bad_encoding_and_empty_files(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("clean,corrupted,answer,wrong\nCaf\xe9,b, x, y\n".encode("latin-1"))
    with pytest.raises(TaskDataError, match=r"line 2: unreadable encoding: byte 0xe9"):
        cf.get_task(path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TaskDataError, match="has no rows"):
        cf.get_task(tmp_path / "empty.jsonl")
    (tmp_path / "header.csv").write_text("clean,corrupted,answer,wrong\n")
    with pytest.raises(TaskDataError, match="has no rows"):
        cf.get_task(tmp_path / "header.csv")


def test_missing_paths_and_names(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist\. A task is a registered name without "
                                          r"a suffix \(.*ioi.*\)"):
        cf.get_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="suffix must be one of"):
        (tmp_path / "x.txt").write_text("hi")
        cf.get_task(str(tmp_path / "x.txt"))
    with pytest.raises(UnknownNameError, match="Did you mean 'ioi'"):
        cf.get_task("ioj")
    with pytest.raises(ConfigError, match="apply to prompt files"):
        cf.get_task("ioi", metric="kl")
    with pytest.raises(ConfigError, match="Unknown metric 'kld'"):
        cf.get_task(_jsonl(tmp_path / "a.jsonl", [{"clean": "a", "corrupted": "b", "answer": " c",
                                                   "wrong": " d"}]), metric="kld")


@pytest.mark.parametrize("which", ["stories", "gpt2"])
def test_answer_token_is_what_follows_the_prompt(which, tmp_path, stories_tokenizer,
                                                  gpt2_tokenizer):
    tok = stories_tokenizer if which == "stories" else gpt2_tokenizer
    rows = [{"clean": LILY, "corrupted": TIM + " Then they went home.", "answer": " Lily",
             "wrong": " Tim"},
            {"clean": "Tim and Lily play.", "corrupted": "Lily and Tim play.", "answer": " Tim",
             "wrong": [" Lily", " he"]}]
    data = cf.get_task(_jsonl(tmp_path / "p.jsonl", rows)).build(tok)
    for i, row in enumerate(rows):
        prompt = tok.encode(row["clean"], add_special_tokens=False)
        full = tok.encode(row["clean"] + row["answer"], add_special_tokens=False)
        assert full[: len(prompt)] == prompt and len(full) == len(prompt) + 1
        assert int(data.answers[i, 0]) == full[-1]
        assert tok.convert_ids_to_tokens(full[-1]).lstrip("▁Ġ") == row["answer"].strip()
        bos = [tok.bos_token_id]
        assert data.clean[i, : len(prompt) + 1].tolist() == bos + prompt
        assert int(data.positions[i, 0]) == len(prompt)  # the clean prompt's last token
    assert data.wrong_answers.shape == (2, 2) and int(data.wrong_answers[0, 1]) == -1
    assert data.corrupted_attention_mask[0].sum() > data.attention_mask[0].sum()
    if which == "stories":  # " Lily" alone is two tokens here; after a prompt it is one
        assert len(tok.encode(" Lily", add_special_tokens=False)) == 2


def test_multi_token_answers_are_named_and_first_token_offered(tmp_path, gpt2_tokenizer):
    rows = [{"clean": "The capital of France is", "corrupted": "The capital of Italy is",
             "answer": " Parisville", "wrong": " Rome"},
            {"clean": "I like", "corrupted": "You like", "answer": " cats", "wrong": " dogs"},
            {"clean": "I saw", "corrupted": "We saw", "answer": " Xylophonist", "wrong": " it"}]
    path = _jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(TaskDataError) as err:
        cf.get_task(path).build(gpt2_tokenizer)
    message = str(err.value)
    assert "2 problems" in message
    assert "line 1: the continuation ' Parisville' is 2 tokens ['ĠParis', 'ville']" in message
    assert "line 3: the continuation ' Xylophonist'" in message and "--first-token" in message
    data = cf.get_task(path, first_token=True).build(gpt2_tokenizer)
    assert int(data.answers[0, 0]) == gpt2_tokenizer.encode(" Paris")[0]
    kept = PromptTask(cf.get_task(path).rows, drop_invalid=True).build(gpt2_tokenizer)
    assert kept.n == 1 and kept.info["dropped"] == ["line 1", "line 3"]


def test_tokens_equal_after_tokenizing_are_rejected(tmp_path, gpt2_tokenizer):
    rows = [{"clean": "I like", "corrupted": "You like", "answer": " cats", "wrong": [" dogs", " cats "]}]
    # " cats " differs as text but its first token equals the answer's
    with pytest.raises(TaskDataError, match=r"line 1: answer equal to wrong: both give token\(s\) \['Ġcats'\]"):
        cf.get_task(_jsonl(tmp_path / "e.jsonl", rows), first_token=True).build(gpt2_tokenizer)


def test_n_takes_the_first_rows_and_data_subset_keeps_both_masks(tmp_path, gpt2_tokenizer):
    rows = [{"clean": "a" + " b" * i, "corrupted": "c" + " d" * (5 - i), "answer": " e", "wrong": " f"}
            for i in range(5)]
    task = cf.get_task(_jsonl(tmp_path / "n.jsonl", rows))
    assert task.default_n == 5
    data = task.build(gpt2_tokenizer, n=3)
    assert data.n == 3 and data.clean_prompts == [r["clean"] for r in rows[:3]]
    sub = data.subset([2, 0])
    assert torch.equal(sub.corrupted_attention_mask, data.corrupted_attention_mask[[2, 0]])
    assert sub.clean_prompts == [rows[2]["clean"], rows[0]["clean"]]
    moved = sub.to("cpu")
    assert torch.equal(moved.corrupted_attention_mask, sub.corrupted_attention_mask)
