"""Train a zoo organism, measure it and write its shipped files.

Usage::

    python -m circuitfind.zoo.train induction-2l          # retrain, measure, overwrite
    python -m circuitfind.zoo.train all                   # every organism
    python -m circuitfind.zoo.train ioi-small --measure-only   # re-measure the shipped model
    python -m circuitfind.zoo.train induction-2l --out-dir /tmp/x   # write elsewhere

Training is deterministic: the weights and the data are seeded by the organism's ``seed``,
``torch.use_deterministic_algorithms(True)`` is on and the CPU uses one thread, so a rerun on the
same software versions writes the same ``model.safetensors``. It runs on the CPU (a few minutes
per organism on 2 cores; ``metrics.json`` records the time).

What is written to ``zoo/models/<name>/``:

- ``config.json``, ``model.safetensors`` (a Hugging Face ``GPT2LMHeadModel``, float32),
  ``tokenizer.json``, ``tokenizer_config.json`` (the word-level tokenizer);
- ``metrics.json``: training settings and time, and the measured numbers on held-out task data
  (clean and corrupted metric, accuracy, head scores where relevant, AUROC of EAP scores and of
  exact single-edge effects against the reference circuit, faithfulness of the reference);
- ``reference_circuit.json``: the reference circuit (:class:`~circuitfind.graphs.circuit.Circuit`
  JSON; ``scores`` are the exact single-edge effects, ``metadata`` holds the provenance).

How the reference circuit is derived is described per organism in ``zoo/README.md`` and in
:func:`derive_reference`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from circuitfind.errors import ConfigError, UnknownNameError
from circuitfind.models import zoo_source
from circuitfind.zoo.organisms import ORGANISMS, Organism, build_tokenizer

#: Single-edge effect threshold (fraction of the clean - corrupted gap) for derived references.
EFFECT_FRACTION = 0.05
_TRAIN_SEED_OFFSET = 1000


def _organism(name: str) -> Organism:
    if name not in ORGANISMS:
        raise UnknownNameError(f"Unknown zoo organism {name!r}. Available: "
                               f"{', '.join(sorted(ORGANISMS))}.")
    return ORGANISMS[name]


def build_model(org: Organism, vocab_size: int) -> Any:
    """A freshly initialised causal LM for ``org`` (seeded by the caller).

    ``GPT2LMHeadModel`` for the ``gpt2`` family, else the family's Hugging Face class with the
    settings of :data:`~circuitfind.zoo.organisms.FAMILIES`. Dropout is off. For ``attn_only``
    organisms every MLP weight and bias is set to exactly 0 and frozen
    (``requires_grad=False``).

    Raises:
        ConfigError: an unknown family.
    """
    import transformers

    from circuitfind.zoo.organisms import FAMILIES

    if org.family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=org.n_ctx, n_embd=org.d_model,
            n_layer=org.n_layers, n_head=org.n_heads, n_inner=1 if org.attn_only else org.d_mlp,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
            pad_token_id=1, tie_word_embeddings=True)
        model = transformers.GPT2LMHeadModel(config)
        mlps = [block.get_submodule("mlp") for block in model.transformer.h]
    elif org.family in FAMILIES:
        config_cls, model_cls, extra = FAMILIES[org.family]
        kwargs: dict[str, Any] = dict(
            vocab_size=vocab_size, max_position_embeddings=org.n_ctx, hidden_size=org.d_model,
            num_hidden_layers=org.n_layers, num_attention_heads=org.n_heads,
            intermediate_size=1 if org.attn_only else org.d_mlp, bos_token_id=0,
            eos_token_id=0, pad_token_id=1, **extra)
        if org.family != "gpt_neox":
            kwargs.update(num_key_value_heads=org.n_kv_heads or org.n_heads,
                          head_dim=org.d_model // org.n_heads)
        if org.family == "gemma2":
            kwargs["query_pre_attn_scalar"] = org.d_model // org.n_heads
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
        mlps = [layer.mlp for layer in model.base_model.layers]
    else:
        raise ConfigError(f"Unknown zoo family {org.family!r}; use 'gpt2' or one of "
                          f"{sorted(FAMILIES)}.")
    if org.attn_only:
        with torch.no_grad():
            for mlp in mlps:
                for p in mlp.parameters():
                    p.zero_()
                    p.requires_grad_(False)
    return model


def train_model(org: Organism, log_every: int = 250, threads: int = 1
                ) -> tuple[Any, Any, dict[str, Any]]:
    """Train ``org`` from scratch.

    Args:
        org: The organism.
        log_every: Print the loss every this many steps (0: silent).
        threads: CPU threads (``torch.set_num_threads``; restored afterwards). One thread is
            the default: the models are so small that a second thread barely helps, and it
            slows training badly when another process competes for the cores.

    Returns:
        ``(model, tokenizer, info)`` with the trained ``GPT2LMHeadModel`` (eval mode), its
        tokenizer and ``{"train_seconds", "final_loss", "torch", "transformers", ...}``.
    """
    import transformers

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(org.seed)
        tokenizer = build_tokenizer(org.vocab())
        model = build_model(org, len(tokenizer))
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=org.lr, betas=(0.9, 0.98),
                                weight_decay=org.weight_decay)

        def lr_at(step: int) -> float:
            # linear warm-up, constant, then linear decay to 10% over the last 20% of steps
            if step < org.warmup:  # warmup 0: none
                return org.lr * (step + 1) / org.warmup
            decay_from = int(0.8 * org.steps)
            if step < decay_from:
                return org.lr
            return org.lr * (1 - 0.9 * (step - decay_from) / max(1, org.steps - decay_from))

        start = time.perf_counter()
        loss_value = float("nan")
        for step in range(org.steps):
            tokens, positions, targets = org.batch(tokenizer, org.batch_size,
                                                   _TRAIN_SEED_OFFSET + org.seed * 1_000_000 + step)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            logits = model(tokens).logits  # [B, T, V]
            idx = positions[:, :, None].expand(-1, -1, logits.shape[-1])
            logp = torch.log_softmax(logits.gather(1, idx), dim=-1)  # [B, P, V]
            loss = -(targets * logp).sum() / targets.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_value = float(loss.detach())
            if log_every and (step % log_every == 0 or step == org.steps - 1):
                print(f"[{org.name}] step {step:5d}  loss {loss_value:.4f}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
        seconds = time.perf_counter() - start
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(old_threads)
    model.eval()
    info = {"train_seconds": round(seconds, 1), "final_loss": loss_value, "steps": org.steps,
            "batch_size": org.batch_size, "lr": org.lr, "seed": org.seed,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": threads,
            "n_parameters": sum(p.numel() for p in model.parameters())}
    return model, tokenizer, info


def save_model(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Write the model (safetensors) and tokenizer files to ``out_dir`` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for extra in ("generation_config.json",):  # not needed to load; keep the folder small
        (out_dir / extra).unlink(missing_ok=True)


def derive_reference(engine: Any, data: Any, effects: torch.Tensor
                     ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The reference circuit's kept mask and how it was derived.

    Every edge whose exact single-edge effect ``|m(full) - m(full without e)|`` (the metric
    change when that edge alone carries its corrupted value) is at least
    :data:`EFFECT_FRACTION` of ``|m(full) - m(empty)|`` is kept; then dangling edges are pruned
    (:func:`~circuitfind.graphs.circuit.prune_dangling`). The README checks the result against
    each organism's mechanism (head scores, head ablations).

    Args:
        engine: Patching engine of the organism.
        data: Held-out task data.
        effects: ``[S, R]`` exact single-edge effects on ``data``.

    Returns:
        ``(kept [S, R] bool, provenance dict)``.
    """
    from circuitfind.zoo.analysis import reference_from_effects

    g = engine.graph
    clean, corrupted = (float(v) for v in engine.evaluate(
        data, torch.stack([g.full_mask(), torch.zeros_like(g.full_mask())])))
    gap = clean - corrupted
    kept = reference_from_effects(g, effects, gap, EFFECT_FRACTION)
    how = {"method": "single-edge exact patching: keep |m(full) - m(full without e)| >= "
                     "effect_fraction * |m(full) - m(empty)|, then prune_dangling",
           "effect_fraction": EFFECT_FRACTION, "gap": gap,
           "threshold": EFFECT_FRACTION * abs(gap)}
    return kept, how


def measure(org: Organism, model_dir: Path) -> tuple[dict[str, Any], Any]:
    """Load the saved organism and measure it; return ``(metrics, reference_circuit)``."""
    from circuitfind.graphs.circuit import Circuit
    from circuitfind.graphs.graph import ComputeGraph
    from circuitfind.models import load_model
    from circuitfind.patching.engine import PatchingEngine
    from circuitfind.tasks import get_task
    from circuitfind.zoo import analysis

    model = load_model(model_dir, device="cpu")
    engine = PatchingEngine(model)
    task = get_task(org.task)
    data = task.build(model.tokenizer, org.eval_n, org.eval_seed)
    g = engine.graph
    logits = analysis.metric_logits(engine, data)  # [N, P, V]
    out: dict[str, Any] = {"eval_n": org.eval_n, "eval_seed": org.eval_seed,
                           "metric": task.metric_name, "metric_unit": task.metric_unit}
    head_scores = None
    if org.task == "induction":
        pred = logits.argmax(-1)
        out["accuracy"] = float((pred == data.answers).float().mean())
        head_scores = analysis.induction_head_scores(model, data)
        out["previous_token_scores"] = head_scores["previous_token"].tolist()
        out["induction_scores"] = head_scores["induction"].tolist()
    elif org.task == "ioi":
        pred = logits[:, 0].argmax(-1)
        out["accuracy"] = float((pred == data.answers[:, 0]).float().mean())
        ld = task.metric(logits[None], data)[0]
        out["fraction_logit_diff_positive"] = float((ld > 0).float().mean())
        io, s = data.answers[:, 0], data.wrong_answers[:, 0]
        out["attention_to_io"] = analysis.attention_to_token(model, data, io).tolist()
        out["attention_to_s1"] = analysis.attention_to_token(model, data, s, "first").tolist()
        out["attention_to_s2"] = analysis.attention_to_token(model, data, s, "last").tolist()
    elif org.task == "greater_than":
        from circuitfind.tasks.greater_than import year_masks

        good, _ = year_masks(data, logits.shape[-1], logits.device)
        pred = logits[:, 0].argmax(-1)
        out["accuracy"] = float(good[torch.arange(data.n), pred].float().mean())
        probs = torch.softmax(logits[:, 0].float(), -1)
        out["probability_mass_on_years"] = float(
            probs[:, data.info["year_token_ids"]].sum(-1).mean())
        out["attention_to_start_year"] = analysis.attention_to_token(
            model, data, data.answers[:, 0]).tolist()
    effects = analysis.single_edge_effects(engine, data)
    kept, how = derive_reference(engine, data, effects)
    faith = analysis.faithfulness(engine, data, kept)
    out.update({"clean_metric": faith["clean"], "corrupted_metric": faith["corrupted"],
                "reference_metric": faith["circuit"],
                "reference_faithfulness": faith["faithfulness"]})
    eap = engine.edge_attribution(data)
    ref_graph = ComputeGraph(g.n_layers, g.n_heads, g.n_kv_heads, attn_only=g.attn_only,
                             parallel_attn_mlp=g.parallel_attn_mlp, model_name=zoo_source(org.name))
    reference = Circuit(ref_graph, kept, effects, metadata={
        "model": zoo_source(org.name), "task": org.task, "data_seed": org.eval_seed,
        "n_examples": org.eval_n, "derivation": how,
        "scores": "exact single-edge effect m(full) - m(full without e), metric units",
        "faithfulness": faith["faithfulness"], "source": "circuitfind.zoo.train"})
    out["reference_n_edges"] = reference.n_edges
    out["reference_edges"] = reference.edges
    out["graph_n_edges"] = g.n_edges
    out["auroc_eap"] = analysis.edge_auroc(g, eap, reference)
    out["auroc_exact"] = analysis.edge_auroc(g, effects, reference)
    out["derivation"] = how
    for node in [n.name for n in g.senders if n.kind in ("attention", "mlp")]:
        mask = g.full_mask()
        mask[g.node_index(node)] = 0  # every outgoing edge of the node carries corrupted
        out[f"metric_without_{node}"] = float(engine.evaluate(data, mask)[0])
    return out, reference


def run(name: str, out_dir: Path | None = None, measure_only: bool = False) -> dict[str, Any]:
    """Train (unless ``measure_only``), save and measure one organism.

    Args:
        name: Organism name.
        out_dir: Where to write (default: the package's ``zoo/models/<name>/``).
        measure_only: Keep the saved model; only re-measure and rewrite metrics and reference.

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        UnknownNameError: unknown organism.
        ConfigError: ``measure_only`` but no saved model in ``out_dir``.
    """
    org = _organism(name)
    if out_dir is None:
        out_dir = Path(__file__).resolve().parent / "models" / name
    out_dir = Path(out_dir)
    previous: dict[str, Any] = {}
    if measure_only:
        if not (out_dir / "model.safetensors").is_file():
            raise ConfigError(f"No saved model in {str(out_dir)!r}; train it first "
                              f"(python -m circuitfind.zoo.train {name}).")
        if (out_dir / "metrics.json").is_file():
            previous = json.loads((out_dir / "metrics.json").read_text()).get("training", {})
    else:
        model, tokenizer, previous = train_model(org)
        save_model(model, tokenizer, out_dir)
    start = time.perf_counter()
    metrics, reference = measure(org, out_dir)
    metrics = {"organism": name, "task": org.task, "training": previous,
               "architecture": {"family": org.family, "n_layers": org.n_layers,
                                "n_heads": org.n_heads, "n_kv_heads": org.n_kv_heads,
                                "d_model": org.d_model,
                                "d_mlp": None if org.attn_only else org.d_mlp,
                                "attn_only": org.attn_only, "n_ctx": org.n_ctx},
               **metrics, "measure_seconds": round(time.perf_counter() - start, 1)}
    reference.to_json(out_dir / "reference_circuit.json", indent=1)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m circuitfind.zoo.train",
                                     description="Train and measure circuitfind zoo organisms.")
    parser.add_argument("name", help=f"organism name or 'all' ({', '.join(sorted(ORGANISMS))})")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="output directory (default: the package's zoo/models/NAME)")
    parser.add_argument("--measure-only", action="store_true",
                        help="do not retrain; re-measure the saved model")
    args = parser.parse_args(argv)
    names = sorted(ORGANISMS) if args.name == "all" else [args.name]
    if args.out_dir is not None and len(names) > 1:
        parser.error("--out-dir needs a single organism name")
    for name in names:
        try:
            metrics = run(name, args.out_dir, args.measure_only)
        except (UnknownNameError, ConfigError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        shown = {k: v for k, v in metrics.items() if k not in ("reference_edges", "derivation")}
        print(json.dumps(shown, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
