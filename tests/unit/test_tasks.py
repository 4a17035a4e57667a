"""The built-in tasks (ioi, gendered_pronoun, greater_than, induction) on real tokenizers.

No model is loaded: these tests check the data (alignment, answers, determinism, balance,
bad input) and the metrics on synthetic logits. The tokenizers come from ../shared through the
conftest fixtures and the tests skip without it.
"""

from __future__ import annotations

import math
import random
import string

import pytest
import torch

from circuitfind.errors import ConfigError, TaskDataError
from circuitfind.tasks import TASKS, TaskData, get_task
from circuitfind.tasks.gendered_pronoun import GenderedPronoun
from circuitfind.tasks.greater_than import GreaterThan, year_masks
from circuitfind.tasks.induction import Induction, token_pool
from circuitfind.tasks.ioi import ABBA_TEMPLATES, BABA_TEMPLATES, IOI, NAMES, OBJECTS, PLACES
from circuitfind.tasks.tokens import encode, sample_balanced, single_token_id

ALL_TASKS = ["ioi", "gendered_pronoun", "greater_than", "induction"]


@pytest.fixture(scope="module")
def char_tokenizer():
    """A character-level tokenizer (no merges): every multi-character word is split."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(["<unk>", "<bos>", *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer whose vocabulary lacks every name (they map to <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<unk> <bos> Then , and went to the . gave a she he She He her his girl boy".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")


@pytest.fixture(params=ALL_TASKS)
def task_and_tokenizer(request, gpt2_tokenizer, stories_tokenizer):
    """Each task with a tokenizer it supports (stories260k where it can, else GPT-2)."""
    name = request.param
    tok = gpt2_tokenizer if name in ("ioi", "greater_than") else stories_tokenizer
    return get_task(name), tok


def _tokens(tok, ids):
    return tok.convert_ids_to_tokens([int(i) for i in ids])


# ----------------------------------------------------------------------------- all tasks


def test_registered_with_field_vocabulary():
    assert set(ALL_TASKS) <= set(TASKS.names())
    for name in ALL_TASKS:
        task = get_task(name.replace("_", "-"))
        assert task.name == name
        assert task.metric_unit in ("logits", "probability", "nats")
        assert task.higher_is_better
    assert get_task("ioi").metric_name == "logit difference"
    assert get_task("greater_than").metric_name == "probability difference"
    assert get_task("induction").metric_unit == "nats"


def test_build_is_deterministic_and_seed_dependent(task_and_tokenizer):
    task, tok = task_and_tokenizer
    a, b, c = task.build(tok, 40, seed=3), task.build(tok, 40, seed=3), task.build(tok, 40, seed=4)
    for key in ("clean", "corrupted", "positions", "answers", "wrong_answers"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    assert a.clean_prompts == b.clean_prompts and a.info == b.info
    assert a.clean_prompts != c.clean_prompts


def test_clean_and_corrupted_align_and_start_with_bos(task_and_tokenizer):
    task, tok = task_and_tokenizer
    data = task.build(tok, 50, seed=0)
    assert isinstance(data, TaskData) and data.n == 50
    assert data.clean.shape == data.corrupted.shape
    assert (data.clean[:, 0] == tok.bos_token_id).all()
    assert (data.corrupted[:, 0] == tok.bos_token_id).all()
    # every example differs between clean and corrupted, only on real tokens
    real = data.attention_mask.bool()
    assert ((data.clean != data.corrupted) & real).any(1).all()
    assert torch.equal(data.clean[~real], data.corrupted[~real])


def test_prompts_are_not_repeated(task_and_tokenizer):
    task, tok = task_and_tokenizer
    data = task.build(tok, 200, seed=1)
    assert len(set(data.clean_prompts)) == 200


@pytest.mark.parametrize("n", [0, -3, 2.5, "10", True])
def test_bad_n_raises_config_error(task_and_tokenizer, n):
    task, tok = task_and_tokenizer
    with pytest.raises(ConfigError, match="must be an int >= 1"):
        task.build(tok, n)


def test_metric_supports_leading_dims(task_and_tokenizer):
    task, tok = task_and_tokenizer
    data = task.build(tok, 7, seed=0)
    p = data.positions.shape[1]
    logits = torch.randn(3, data.n, p, len(tok), generator=torch.Generator().manual_seed(0))
    batched = data.metric(logits)
    assert batched.shape == (3, data.n)
    for k in range(3):
        torch.testing.assert_close(data.metric(logits[k]), batched[k])
    assert torch.isfinite(batched).all()


def test_subset_keeps_the_metric_working(task_and_tokenizer):
    task, tok = task_and_tokenizer
    data = task.build(tok, 10, seed=0)
    sub = data.subset([1, 3, 5])
    logits = torch.randn(data.n, data.positions.shape[1], len(tok))
    torch.testing.assert_close(sub.metric(logits[[1, 3, 5]]), data.metric(logits)[[1, 3, 5]])


# ----------------------------------------------------------------------------- tokens.py


def test_single_token_id_handles_word_boundary_marker(stories_tokenizer, gpt2_tokenizer):
    # stories260k prepends '▁' to every input: " Lily" alone is two tokens, in a prompt one
    assert len(encode(stories_tokenizer, " Lily")) == 2
    lily = single_token_id(stories_tokenizer, " Lily", "t")
    assert stories_tokenizer.convert_ids_to_tokens(lily) == "▁Lily"
    assert lily in encode(stories_tokenizer, "there was a girl named Lily.")
    assert gpt2_tokenizer.convert_ids_to_tokens(single_token_id(gpt2_tokenizer, " Lily", "t")) \
        == "ĠLily"
    with pytest.raises(TaskDataError, match="single token"):
        single_token_id(stories_tokenizer, " Mary", "t")


def test_single_token_id_rejects_unknown_token(word_tokenizer):
    with pytest.raises(TaskDataError, match="unknown token"):
        single_token_id(word_tokenizer, " Mary", "t")


def test_sample_balanced_is_distinct_balanced_and_bounded():
    draws = sample_balanced(random.Random(0), 18, [(3, 2), (), (2,)], "t", n_classes=2)
    assert [c for c, _, _ in draws] == [0, 1] * 9
    for cls in (0, 1):
        mine = [(g, d) for c, g, d in draws if c == cls]
        assert len(set(mine)) == 9  # every combination of the class exactly once
    groups = [(3, 2), (), (2,)]
    assert all(len(d) == len(groups[g]) and all(x < m for x, m in zip(d, groups[g]))
               for _, g, d in draws)
    with pytest.raises(ConfigError, match="at most 18 distinct examples"):
        sample_balanced(random.Random(0), 19, [(3, 2), (), (2,)], "t", n_classes=2)
    with pytest.raises(ConfigError):
        sample_balanced(random.Random(0), 0, [(3,)], "t")


# ----------------------------------------------------------------------------- ioi


def test_ioi_word_lists_are_single_tokens_under_gpt2(gpt2_tokenizer):
    for word in NAMES + PLACES + OBJECTS:
        single_token_id(gpt2_tokenizer, " " + word, "ioi")
    data = IOI().build(gpt2_tokenizer, 100, seed=0)
    assert data.info["dropped_names"] == []
    assert data.info["dropped_places"] == [] and data.info["dropped_objects"] == []
    assert len(BABA_TEMPLATES) == len(ABBA_TEMPLATES) == 15


def test_ioi_examples_are_well_formed(gpt2_tokenizer):
    tok = gpt2_tokenizer
    data = IOI().build(tok, 100, seed=0)
    assert data.positions.shape == (100, 1)
    assert data.info["orders"].count("ABBA") == data.info["orders"].count("BABA") == 50
    for i in range(data.n):
        clean, corrupted = data.clean_prompts[i], data.corrupted_prompts[i]
        io, s = data.info["io_names"][i], data.info["s_names"][i]
        assert _tokens(tok, data.answers[i]) == ["Ġ" + io]
        assert _tokens(tok, data.wrong_answers[i]) == ["Ġ" + s]
        # the prompt ends right before the IO; IO appears once, S twice
        assert not clean.endswith(io)
        words = clean.replace(",", " ").replace(".", " ").split()
        assert words.count(io) == 1 and words.count(s) == 2
        # first-mentioned name is the IO in ABBA, the subject in BABA
        first = min((clean.find(" " + io + " "), io), (clean.find(" " + s + " "), s))[1]
        assert first == (io if data.info["orders"][i] == "ABBA" else s)
        # ABC: three distinct names, none of them the IO or S
        cwords = corrupted.replace(",", " ").replace(".", " ").split()
        abc = [w for w in cwords if w in NAMES and w not in words]
        assert len(abc) == 3 and len(set(abc)) == 3 and io not in cwords and s not in cwords
        # the last prompt token is read by the metric
        last = int(data.positions[i, 0])
        assert data.attention_mask[i, last] == 1 and (last + 1 == data.seq_len
                                                      or data.attention_mask[i, last + 1] == 0)


def test_ioi_metric_is_io_minus_s_logit(gpt2_tokenizer):
    data = IOI().build(gpt2_tokenizer, 4, seed=0)
    logits = torch.zeros(data.n, 1, len(gpt2_tokenizer))
    logits[torch.arange(data.n), 0, data.answers[:, 0]] = 2.0
    logits[torch.arange(data.n), 0, data.wrong_answers[:, 0]] = -1.5
    torch.testing.assert_close(data.metric(logits), torch.full((data.n,), 3.5))


def test_ioi_rejects_tokenizers_that_split_names(char_tokenizer, word_tokenizer,
                                                 stories_tokenizer):
    for tok in (char_tokenizer, word_tokenizer, stories_tokenizer):
        with pytest.raises(TaskDataError, match="single-token names"):
            IOI().build(tok, 10)


# ----------------------------------------------------------------------------- gendered pronoun


@pytest.mark.parametrize("which", ["stories", "gpt2"])
def test_gendered_pronoun_examples(which, stories_tokenizer, gpt2_tokenizer):
    tok = stories_tokenizer if which == "stories" else gpt2_tokenizer
    data = GenderedPronoun().build(tok, 300, seed=0)
    she, he = single_token_id(tok, " she", "t"), single_token_id(tok, " he", "t")
    assert data.info["genders"].count("female") == data.info["genders"].count("male") == 150
    for i, gender in enumerate(data.info["genders"]):
        clean, corrupted = data.clean_prompts[i], data.corrupted_prompts[i]
        assert data.answers[i, 0] == (she if gender == "female" else he)
        assert data.wrong_answers[i, 0] == (he if gender == "female" else she)
        f, m = ("She", "He") if gender == "female" else ("He", "She")
        assert f" {f} " in clean and f" {m} " in corrupted and f" {m} " not in clean
        assert data.info["names"][i] in clean and data.info["names"][i] not in corrupted.split()
        assert clean.endswith(",")
    if which == "stories":
        assert ["Mary", "John"] in data.info["dropped"]
        assert {w for p in data.clean_prompts for w in ("Lily", "Tim") if w in p} == {"Lily", "Tim"}


def test_gendered_pronoun_size_limit(stories_tokenizer):
    assert GenderedPronoun().build(stories_tokenizer, 500, seed=0).n == 500
    with pytest.raises(ConfigError, match="at most 500 distinct examples"):
        GenderedPronoun().build(stories_tokenizer, 501)


def test_gendered_pronoun_rejects_tokenizers_that_split_words(char_tokenizer, word_tokenizer):
    with pytest.raises(TaskDataError, match="single token"):
        GenderedPronoun().build(char_tokenizer, 10)
    with pytest.raises(TaskDataError, match="usable name pairs"):
        GenderedPronoun().build(word_tokenizer, 10)


# ----------------------------------------------------------------------------- greater-than


def test_greater_than_examples(gpt2_tokenizer):
    tok = gpt2_tokenizer
    data = GreaterThan().build(tok, 200, seed=0)
    year_ids = data.info["year_token_ids"]
    assert len(year_ids) == 100 and _tokens(tok, year_ids) == [f"{y:02d}" for y in range(100)]
    assert data.n == 200 and data.positions.shape == (200, 1)
    for i in range(data.n):
        xx, yy = data.info["centuries"][i], data.info["years"][i]
        assert 11 <= xx <= 17 and 2 <= yy <= 98
        last = int(data.positions[i, 0])
        row, crow = data.clean[i, : last + 1], data.corrupted[i, : last + 1]
        assert _tokens(tok, row[-4:]) == ["Ġto", "Ġthe", "Ġyear", f"Ġ{xx}"]
        assert _tokens(tok, row[-6:-4]) == [f"Ġ{xx}", f"{yy:02d}"]
        assert row[-5] == data.answers[i, 0] == year_ids[yy]
        assert crow[-5] == data.wrong_answers[i, 0] == year_ids[1]
        assert (row != crow).sum() == 1


def test_greater_than_probability_difference(gpt2_tokenizer):
    data = GreaterThan().build(gpt2_tokenizer, 5, seed=0)
    ids = torch.tensor(data.info["year_token_ids"])
    yy = torch.tensor(data.info["years"])
    v = len(gpt2_tokenizer)
    good, bad = year_masks(data, v, "cpu")
    assert good.shape == (5, v) and not (good & bad).any()
    assert torch.equal(good.sum(1) + bad.sum(1), torch.full((5,), 100))
    assert torch.equal(bad.sum(1), yy + 1)

    def peaked(year_offset):
        logits = torch.full((data.n, 1, v), -1e4)
        logits[torch.arange(data.n), 0, ids[yy + year_offset]] = 0.0
        return logits

    torch.testing.assert_close(data.metric(peaked(1)), torch.ones(5))
    torch.testing.assert_close(data.metric(peaked(0)), -torch.ones(5))
    both = torch.logaddexp(peaked(1), peaked(0))
    torch.testing.assert_close(data.metric(both), torch.zeros(5), atol=1e-6, rtol=0)
    stacked = torch.stack([peaked(1), peaked(-1)])
    torch.testing.assert_close(data.metric(stacked), torch.stack([torch.ones(5), -torch.ones(5)]))


def test_greater_than_rejects_digit_by_digit_tokenizer(stories_tokenizer, char_tokenizer):
    for tok in (stories_tokenizer, char_tokenizer):
        with pytest.raises(TaskDataError, match="two-digit years"):
            GreaterThan().build(tok, 10)


# ----------------------------------------------------------------------------- induction


@pytest.mark.parametrize("which", ["stories", "gpt2", "chars"])
def test_induction_layout(which, stories_tokenizer, gpt2_tokenizer, char_tokenizer):
    tok = {"stories": stories_tokenizer, "gpt2": gpt2_tokenizer, "chars": char_tokenizer}[which]
    h = 7
    data = Induction(half_len=h).build(tok, 30, seed=0)
    o = 1
    assert data.clean.shape == (30, o + 2 * h)
    a = data.clean[:, o:o + h]
    assert torch.equal(data.clean[:, o + h:], a)  # clean: [A, A]
    assert torch.equal(data.corrupted[:, o + h:], a)  # corrupted: [B, A]
    b = data.corrupted[:, o:o + h]
    for i in range(data.n):
        assert len(set(a[i].tolist())) == h and not set(a[i].tolist()) & set(b[i].tolist())
    assert data.positions.shape == data.answers.shape == (30, h - 1)
    assert torch.equal(data.positions[0], torch.arange(o + h, o + 2 * h - 1))
    assert torch.equal(data.clean.gather(1, data.positions + 1), data.answers)
    # the token at each metric position has occurred before, followed by the answer
    for p in range(h - 1):
        assert torch.equal(data.clean[:, data.positions[0, p] - h + 1], data.answers[:, p])


def test_induction_without_bos():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(string.ascii_letters)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])))
    assert tok.bos_token_id is None
    data = Induction(half_len=4).build(tok, 5, seed=0)
    assert data.clean.shape == (5, 8)
    assert torch.equal(data.clean[:, :4], data.clean[:, 4:])
    assert torch.equal(data.positions[0], torch.tensor([4, 5, 6]))
    assert torch.equal(data.clean.gather(1, data.positions + 1), data.answers)


def test_induction_token_pool_excludes_special_and_byte_tokens(stories_tokenizer, gpt2_tokenizer):
    for tok in (stories_tokenizer, gpt2_tokenizer):
        pool = token_pool(tok).tolist()
        assert not set(pool) & set(tok.all_special_ids)
        pieces = tok.convert_ids_to_tokens(pool)
        assert not any(p.startswith("<0x") for p in pieces)
        assert all(encode(tok, tok.decode([i])) == [i] for i in pool[:500])
    assert len(token_pool(stories_tokenizer)) >= 20


def test_induction_metric_is_mean_log_probability(stories_tokenizer):
    data = Induction(half_len=5).build(stories_tokenizer, 4, seed=0)
    v = len(stories_tokenizer)
    uniform = torch.zeros(data.n, 4, v)
    torch.testing.assert_close(data.metric(uniform), torch.full((data.n,), -math.log(v)))
    perfect = torch.full((data.n, 4, v), -1e4)
    perfect.scatter_(-1, data.answers[..., None], 0.0)
    torch.testing.assert_close(data.metric(perfect), torch.zeros(data.n))


@pytest.mark.parametrize("half_len", [1, 0, 2.0, None])
def test_induction_bad_half_len(half_len):
    with pytest.raises(ConfigError, match="half_len"):
        Induction(half_len=half_len)


def test_induction_too_long_for_pool(char_tokenizer):
    with pytest.raises(TaskDataError, match="usable vocabulary tokens"):
        Induction(half_len=200).build(char_tokenizer, 3)
