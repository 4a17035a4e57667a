"""Definitions of the zoo's model organisms: architecture, vocabulary, training data.

An :class:`Organism` is a frozen description of one small model the project trains itself:
its GPT-2-layout architecture (Hugging Face ``GPT2LMHeadModel``, so that
``TransformerBridge.boot_transformers`` loads it like any GPT-2), its word-level vocabulary,
the training distribution and the optimiser settings. :mod:`circuitfind.zoo.train` turns a
definition into the shipped files; nothing here trains or loads a model.

Tokenizers. Every organism uses a word-level tokenizer (``tokenizers.models.WordLevel``) with a
GPT-2-like pre-tokenizer: a piece is an optional leading space followed by two digits, a word
(a letter then letters/digits) or one punctuation character (regex :data:`PIECE_PATTERN`), and
the decoder concatenates the pieces (``decoders.Fuse``), so ``decode(encode(text)) == text``
for text made of vocabulary pieces. Words therefore carry their leading space, like GPT-2's
(``" Mary"``), and years split as GPT-2 splits them (``" 1732"`` -> ``" 17"`` + ``"32"``), which
is what the ``ioi`` and ``greater_than`` tasks check. Specials: ``<bos>`` (id 0, also EOS),
``<pad>`` (1), ``<unk>`` (2); the tasks prepend ``<bos>`` themselves.

Attention-only models. Hugging Face's GPT-2 has no attention-only switch. An organism with
``attn_only=True`` is a GPT-2 whose MLPs have exactly zero weights and biases (``c_fc`` and
``c_proj``), frozen during training: every MLP outputs exactly 0, so the MLP nodes ``m{L}``
exist in circuitfind's graph but every edge into or out of them has exactly zero effect
(their clean and corrupted outputs are both 0). The MLP width is the minimum (``n_inner=1``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError

#: The pre-tokenizer regex of every zoo tokenizer (see the module docstring).
PIECE_PATTERN = r"\s?\d\d|\s?[A-Za-z][A-Za-z0-9]*|\s?[^\sA-Za-z0-9]"
SPECIALS: tuple[str, ...] = ("<bos>", "<pad>", "<unk>")

#: A batch sampler: (tokenizer, n, seed) -> (tokens [n, T] int64, positions [n, P] int64,
#: targets [n, P, V] float, a weighted probability distribution over the vocabulary per
#: position; the loss is sum(-targets * log p) / sum(targets)).
BatchFn = Callable[[Any, int, int], tuple[Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class Organism:
    """One model organism: what it is, how it is built and how it is trained.

    Attributes:
        name: Zoo name (``"induction-2l"``); the files live in ``zoo/models/<name>/``.
        description: One line for listings.
        task: Name of its circuitfind task (``"induction"``).
        task_kwargs: Keyword arguments of the task's constructor used for evaluation.
        mechanism: A short statement of the verified mechanism (details in the README).
        n_layers: Transformer blocks.
        n_heads: Attention heads per block.
        d_model: Residual width.
        d_mlp: MLP width (ignored when ``attn_only``).
        n_ctx: Learned positions.
        attn_only: MLPs held at exactly zero (see the module docstring).
        seed: Seed of initialisation and of the training data.
        steps: Optimiser steps.
        batch_size: Sequences per step.
        lr: Peak AdamW learning rate (linear warm-up over ``warmup`` steps, constant, then linear
            decay to 10% over the last 20% of the steps).
        warmup: Warm-up steps.
        weight_decay: AdamW weight decay (every trainable parameter).
        eval_n: Examples of held-out task data used for the measured numbers.
        eval_seed: Seed of that held-out data (training batch ``i`` uses seed
            ``1000 + 1_000_000 * seed + i``).
        vocab: Builds the vocabulary pieces (specials excluded), in id order.
        batch: Training batch sampler (see :data:`BatchFn`).
        family: Model family (:data:`FAMILIES`): ``"gpt2"`` (``GPT2LMHeadModel``, learned
            positions) or a rotary family built with its own Hugging Face class.
        n_kv_heads: Key/value heads (grouped-query attention; ``None``: one per query head).
    """

    name: str
    description: str
    task: str
    mechanism: str
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    n_ctx: int
    attn_only: bool
    seed: int
    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float
    eval_n: int
    eval_seed: int
    vocab: Callable[[], list[str]] = field(repr=False)
    batch: BatchFn = field(repr=False)
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    family: str = "gpt2"
    n_kv_heads: int | None = None


# ---------------------------------------------------------------------------------- tokenizer
def build_tokenizer(pieces: list[str]) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``SPECIALS + pieces``.

    Args:
        pieces: Vocabulary pieces (with their leading space where they follow a space), in
            id order after the specials; duplicates are an error.

    Returns:
        The tokenizer (``<bos>`` = 0 is BOS and EOS, ``<pad>`` = 1, ``<unk>`` = 2).

    Raises:
        ConfigError: a duplicated piece, or a piece the pre-tokenizer would split.
    """
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS) + list(pieces)
    if len(set(words)) != len(words):
        raise ConfigError("Zoo vocabulary pieces must be distinct.")
    bad = [p for p in pieces if re.fullmatch(PIECE_PATTERN, p) is None]
    if bad:
        raise ConfigError(f"Zoo vocabulary pieces must each match {PIECE_PATTERN!r}; got {bad[:5]}.")
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>",
                                   pad_token="<pad>", unk_token="<unk>")


def _pieces_of(texts: list[str]) -> list[str]:
    """Distinct pre-tokenizer pieces of ``texts``, in order of first appearance."""
    import re

    seen: dict[str, None] = {}
    for text in texts:
        for piece in re.findall(PIECE_PATTERN, text):
            seen.setdefault(piece, None)
    return list(seen)


def _one_hot_targets(tokens: Tensor, positions: Tensor, vocab_size: int) -> Tensor:
    """``[n, P, V]`` one-hot distributions of the tokens after ``positions``."""
    nxt = tokens.gather(1, positions + 1)
    return torch.nn.functional.one_hot(nxt, vocab_size).float()


# ---------------------------------------------------------------------------------- induction
INDUCTION_WORDS = 60  # pieces " w0" ... " w59"
INDUCTION_LEN = 40  # tokens after BOS in every training sequence


def _induction_vocab() -> list[str]:
    return [f" w{i}" for i in range(INDUCTION_WORDS)]


def _induction_batch(tokenizer: Any, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Random-token sequences with one repeated segment; next-token loss, weighted.

    Each row is ``<bos>`` followed by 40 tokens ``R1 A A R2``: ``A`` holds ``h`` distinct tokens
    (``h`` uniform in 3..20), ``R1`` (length uniform in 0..40-2h) and ``R2`` are i.i.d. uniform
    tokens. The random offset and length leave no positional shortcut (an earlier version with
    ``R1`` empty in half of the rows learned position-based attention instead of induction). Targets: the next
    token at every position, with weight 1 where it is predictable by induction (the second
    copy's tokens 1..h-1) and 0.1 elsewhere (the targets are weighted one-hot rows).
    """
    gen = torch.Generator().manual_seed(seed)
    v, length, h_max = INDUCTION_WORDS, INDUCTION_LEN, 20
    h = torch.randint(3, h_max + 1, (n,), generator=gen)[:, None]  # [n, 1]
    tokens = torch.randint(v, (n, length), generator=gen)
    segment = torch.rand(n, v, generator=gen).argsort(-1)[:, :h_max]  # distinct per row
    r1 = (torch.rand(n, generator=gen) * (length - 2 * h[:, 0] + 1)).long()[:, None]
    pos = torch.arange(length)[None, :]
    first = (pos >= r1) & (pos < r1 + h)
    second = (pos >= r1 + h) & (pos < r1 + 2 * h)
    tokens = torch.where(first, segment.gather(1, (pos - r1).clamp(0, h_max - 1)), tokens)
    tokens = torch.where(second, segment.gather(1, (pos - r1 - h).clamp(0, h_max - 1)), tokens)
    tokens = torch.cat([torch.full((n, 1), int(tokenizer.bos_token_id)),
                        tokens + len(SPECIALS)], 1)  # [n, 41]
    positions = torch.arange(length).expand(n, -1).clone()  # predicts tokens[:, 1:]
    weight = 0.1 + 0.9 * (second & (pos > r1 + h)).float()  # [n, 40], by predicted token
    return tokens, positions, _one_hot_targets(tokens, positions, len(tokenizer)) * weight[..., None]


# ---------------------------------------------------------------------------------- IOI
IOI_NAMES = 40  # the first 40 names of the ioi task's list


def _ioi_vocab() -> list[str]:
    from circuitfind.tasks.ioi import BABA_TEMPLATES, NAMES, OBJECTS, PLACES

    texts = [t.replace("[A]", "Mary").replace("[B]", "John").replace("[PLACE]", p)
             .replace("[OBJECT]", o) for t in BABA_TEMPLATES for p in PLACES for o in OBJECTS]
    words = [p for p in _pieces_of(texts) if p not in (" Mary", " John", "Mary", "John")]
    return words + [" " + w for w in NAMES[:IOI_NAMES]]


IOI_LM_WEIGHT = 0.3  # weight of the next-token loss on the prompt text (the IO target has 1)


def _ioi_batch(tokenizer: Any, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Clean ``ioi`` prompts: the indirect object at the last position, plus the template text.

    Targets: at the last prompt position, the indirect object (weight 1); at every earlier
    position, the next token of the prompt (weight :data:`IOI_LM_WEIGHT`; padding gets 0).
    The language-model part is what makes IOI learnable here: trained on the IO target alone,
    the model stalls at about ln 2 (mass split between the two names, see ``zoo/README.md``);
    with it, it solves the task within a few hundred steps. It teaches the model to predict
    names from the context (the name after ``"and"`` or at the start of the second clause is
    one of the names already seen) and where in the template each word stands.
    """
    from circuitfind.tasks import get_task

    data = get_task("ioi").build(tokenizer, n, seed)
    tokens = data.clean  # [n, T], right-padded
    t = tokens.shape[1]
    end = data.positions[:, 0]  # [n]
    pos = torch.arange(t)[None, :]
    nxt = torch.cat([tokens[:, 1:], tokens[:, -1:]], 1)  # next token; last column unused
    nxt = torch.where(pos == end[:, None], data.answers, nxt)  # [n, T]
    weight = torch.where(pos < end[:, None], IOI_LM_WEIGHT, 0.0)
    weight = torch.where(pos == end[:, None], 1.0, weight)  # [n, T]
    positions = pos.expand(n, -1).clone()
    targets = torch.nn.functional.one_hot(nxt, len(tokenizer)).float() * weight[..., None]
    return tokens, positions, targets


# ---------------------------------------------------------------------------------- greater-than
def _greater_than_vocab() -> list[str]:
    from circuitfind.tasks.greater_than import CENTURIES, NOUNS, TEMPLATE

    words = _pieces_of([TEMPLATE.format(noun=w, xx=17, yy=32) for w in NOUNS])
    words = [w for w in words if not any(c.isdigit() for c in w)]
    return words + [f" {xx}" for xx in CENTURIES] + [f"{yy:02d}" for yy in range(100)]


def _greater_than_batch(tokenizer: Any, n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Clean ``greater_than`` prompts; target: uniform over the years after the start year."""
    from circuitfind.tasks import get_task
    from circuitfind.tasks.greater_than import year_masks

    data = get_task("greater_than").build(tokenizer, n, seed)
    good, _ = year_masks(data, len(tokenizer), "cpu")  # [n, V]
    targets = good.float() / good.float().sum(-1, keepdim=True)
    return data.clean, data.positions, targets[:, None, :]


# ---------------------------------------------------------------------------------- the zoo
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # family -> (config class, model class, settings beyond the sizes): each family's own
    # features on, at values that leave the task possible (Mistral's 12-token window, in both
    # layers, covers the evaluation's look-back of 9 but not the longest training repeats;
    # Gemma-2's local layer 0 needs to see only the previous token for its previous-token heads)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 {"rotary_pct": 0.5, "use_parallel_residual": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 12}),
    # the Qwen organisms' rotary base is Llama's 10^4, written out (Qwen's checkpoints use 10^6
    # for long contexts)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"sliding_window": 8, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0}),
}
"""The rotary families the zoo trains induction organisms of (besides GPT-2's)."""

FAMILY_ORGANISMS: tuple[tuple[str, str, str, int | None, int, int, str], ...] = (
    # (name suffix, family, label, key/value heads, training steps, seed, measured mechanism)
    ("llama", "llama", "Llama (RMSNorm, grouped-query attention)", 2, 2500, 0,
     "see zoo/README.md"),
    ("neox", "gpt_neox", "GPT-NeoX/Pythia (parallel attention and MLP, partial rotary)",
     None, 2500, 0, "see zoo/README.md"),
    ("mistral", "mistral", "Mistral (sliding window, grouped-query attention)", 2, 2500, 0,
     "see zoo/README.md"),
    ("qwen2", "qwen2", "Qwen2 (q/k/v biases, grouped-query attention)", 2, 3000, 1,
     "see zoo/README.md"),
    ("qwen3", "qwen3", "Qwen3 (q/k norms, grouped-query attention)", 2, 3000, 1,
     "see zoo/README.md"),
    ("gemma2", "gemma2", "Gemma-2 (post-norms, soft-capping, local/global layers)", 2, 2500, 0,
     "see zoo/README.md"),
)
"""One induction organism per rotary family (the leaderboard's family rows)."""

ORGANISMS: dict[str, Organism] = {o.name: o for o in (
    Organism(
        name="induction-2l",
        description="2-layer attention-only transformer with a previous-token head and an "
                    "induction head",
        task="induction",
        mechanism="previous-token heads a0.h0, a0.h2 -> K-composition -> induction heads "
                  "a1.h0 (main), a1.h2, a1.h3 -> logits; a0.h1, a0.h3 carry the copied token "
                  "(V-composition)",
        n_layers=2, n_heads=4, d_model=32, d_mlp=1, n_ctx=64, attn_only=True,
        seed=0, steps=6000, batch_size=64, lr=3e-3, warmup=0, weight_decay=0.01,
        eval_n=200, eval_seed=0, vocab=_induction_vocab, batch=_induction_batch),
    Organism(
        name="ioi-small",
        description="2-layer GPT-2-layout transformer trained on the IOI templates",
        task="ioi",
        mechanism="a0.h2 attends to the subject's second mention (the last name) -> MLPs "
                  "suppress S in the logits and steer name movers a1.h1, a1.h2 (queries) "
                  "to the indirect object",
        n_layers=2, n_heads=4, d_model=64, d_mlp=256, n_ctx=64, attn_only=False,
        seed=0, steps=2000, batch_size=64, lr=2e-3, warmup=200, weight_decay=0.01,
        eval_n=200, eval_seed=0, vocab=_ioi_vocab, batch=_ioi_batch),
    Organism(
        name="greater-than-small",
        description="2-layer GPT-2-layout transformer trained on greater-than year spans",
        task="greater_than",
        mechanism="layer-0 heads a0.h2, a0.h1 attend to the start year YY -> MLP 0 -> logits "
                  "(directly and via MLP 1); layer 1 nearly unused",
        n_layers=2, n_heads=4, d_model=64, d_mlp=256, n_ctx=32, attn_only=False,
        seed=0, steps=2000, batch_size=128, lr=3e-3, warmup=100, weight_decay=0.01,
        eval_n=200, eval_seed=0, vocab=_greater_than_vocab, batch=_greater_than_batch),
    *(Organism(
        name=f"induction-{short}",
        description=f"2-layer attention-only {label} (rotary positions) with previous-token "
                    "and induction heads",
        task="induction",
        mechanism=mechanism,
        n_layers=2, n_heads=4, n_kv_heads=kv, d_model=32, d_mlp=1, n_ctx=64, attn_only=True,
        seed=seed, steps=steps, batch_size=64, lr=3e-3, warmup=100, weight_decay=0.01,
        eval_n=200, eval_seed=0, vocab=_induction_vocab, batch=_induction_batch,
        family=family) for short, family, label, kv, steps, seed, mechanism in FAMILY_ORGANISMS),
)}
