"""Tiny random Hugging Face models (any supported family) and a toy task for tests.

transformer-lens' ``boot_native`` random models do not expose split q/k/v inputs, so tests build
a small random ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` with a word-level tokenizer, save both
to a directory and boot that directory through :func:`circuitfind.load_model` — the same path a
user's model takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError
from circuitfind.tasks.base import Task, TaskData
from circuitfind.tasks.metrics import logit_diff


def _word_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<bos>", "<pad>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<unk>", eos_token="<bos>")


FAMILY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # arch -> (config class, model class, settings beyond the sizes); each family's own
    # features are switched on so that tests exercise them
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM",  # Llama-3's rope scaling, made to bite
               {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                    "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 4}}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 {"rotary_pct": 0.5, "use_parallel_residual": True}),
    "gpt_neox_seq": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                     {"rotary_pct": 0.5, "use_parallel_residual": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": None}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": None, "sliding_window": 4, "attn_logit_softcapping": 5.0,
                "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 6}),
}


def make_tiny_model_dir(path: str | Path, arch: str = "gpt2", n_layers: int = 2, n_heads: int = 4,
                        n_kv_heads: int | None = None, d_model: int = 32, vocab_size: int = 64,
                        n_ctx: int = 64, seed: int = 0) -> Path:
    """Save a random causal LM and a word-level tokenizer (words ``w0 w1 ...``) to ``path``.

    Weight matrices are Hugging Face's random init scaled by 3; the norms' weights are drawn
    from U[0.5, 1.5] and the biases from N(0, 0.1), so that code reading them is exercised.

    Args:
        path: Directory to create.
        arch: ``"gpt2"`` (LayerNorm, learned positions, biases), ``"llama"`` (RMSNorm, rotary,
            gated MLP; ``n_kv_heads < n_heads`` gives grouped-query attention) or another
            family of :data:`FAMILY_CONFIGS` (``gpt_neox``: parallel attention and MLP, partial
            rotary; ``mistral``/``qwen2``: sliding windows of 4 tokens (Qwen2 in its first
            layer); ``qwen3``: q/k norms; ``gemma2``: post-norms, soft-capping, local/global
            layers).
        n_layers, n_heads, n_kv_heads, d_model, vocab_size, n_ctx: Sizes.
        seed: Weight seed.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ConfigError: unknown ``arch``.
    """
    import transformers

    path = Path(path)
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=n_layers, n_head=n_heads, n_embd=d_model, n_positions=n_ctx,
            vocab_size=vocab_size, bos_token_id=0, eos_token_id=0))
    elif arch in FAMILY_CONFIGS:
        config_cls, model_cls, extra = FAMILY_CONFIGS[arch]
        kwargs: dict[str, Any] = dict(
            num_hidden_layers=n_layers, num_attention_heads=n_heads, hidden_size=d_model,
            intermediate_size=2 * d_model, vocab_size=vocab_size, max_position_embeddings=n_ctx,
            bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
        if not arch.startswith("gpt_neox"):
            kwargs["num_key_value_heads"] = n_kv_heads or n_heads
        elif n_kv_heads not in (None, n_heads):
            raise ConfigError("GPT-NeoX has no grouped-query attention; leave n_kv_heads unset.")
        kwargs.update(extra)
        if "head_dim" in extra:  # families whose head size is not d_model / n_heads by default
            kwargs["head_dim"] = d_model // n_heads
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    else:
        raise ConfigError(f"Unknown tiny-model arch {arch!r}; use 'gpt2' or one of "
                          f"{sorted(FAMILY_CONFIGS)}.")
    # random init is small; scale weights up a little so that patching effects are non-trivial,
    # and draw the norms' weights and the biases too (initialised to 1 and 0, they would leave
    # every use of them untested)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.mul_(3.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:  # a norm's weight
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    _word_tokenizer(vocab_size).save_pretrained(path)
    return path


def tiny_model(path: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """:func:`make_tiny_model_dir` then :func:`circuitfind.load_model` on CPU."""
    from circuitfind.models import load_model

    make_tiny_model_dir(path, **kwargs)
    return load_model(path, device="cpu", dtype=dtype)


class ToyTask(Task):
    """Random clean/corrupted token sequences with a logit-difference metric (tests only).

    Clean and corrupted rows are independent random words; the metric is the logit difference
    between two fixed random answer tokens at the last position. It has no circuit; it exists to
    exercise the engine.

    Args:
        seq_len: Tokens per prompt (without BOS).
        positions: Metric positions per example (the last ``positions`` tokens).
    """

    name = "toy"
    description = "random tokens, logit difference of two random tokens (tests only)"
    metric_name = "logit difference"
    metric_unit = "logits"

    def __init__(self, seq_len: int = 6, positions: int = 1) -> None:
        self.seq_len = seq_len
        self.n_positions = positions

    def build(self, tokenizer: Any, n: int, seed: int = 0) -> TaskData:
        """Build ``n`` random examples from word tokens ``w*`` of ``tokenizer``."""
        if n < 1:
            raise ConfigError(f"n must be >= 1; got {n}.")
        gen = torch.Generator().manual_seed(seed)
        words = [i for t, i in sorted(tokenizer.get_vocab().items()) if t.startswith("w")]
        ids = torch.tensor(words)
        pick = lambda: ids[torch.randint(len(ids), (n, self.seq_len), generator=gen)]  # noqa: E731
        bos = torch.full((n, 1), int(tokenizer.bos_token_id))
        clean, corrupted = torch.cat([bos, pick()], 1), torch.cat([bos, pick()], 1)
        answers = ids[torch.randint(len(ids), (n, 2), generator=gen)]
        t = clean.shape[1]
        positions = torch.arange(t - self.n_positions, t).repeat(n, 1)
        text = lambda row: " ".join(tokenizer.convert_ids_to_tokens(row[1:].tolist()))  # noqa: E731
        return TaskData(task=self, clean=clean, corrupted=corrupted, positions=positions,
                        answers=answers[:, :1], wrong_answers=answers[:, 1:],
                        attention_mask=torch.ones_like(clean),
                        clean_prompts=[text(r) for r in clean],
                        corrupted_prompts=[text(r) for r in corrupted], seed=seed)

    def metric(self, logits: Tensor, data: TaskData) -> Tensor:
        """Mean over metric positions of the logit difference answer - wrong answer (logits)."""
        return torch.stack([logit_diff(logits, data.answers, data.wrong_answers, p)
                            for p in range(logits.shape[-2])], -1).mean(-1)
