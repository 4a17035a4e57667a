"""The one table of transformer-lens hook names the engine uses, per node and receiver.

Senders (what a node writes into the residual stream):

==========  ==================================  ===============================
node        hook                                 shape
==========  ==================================  ===============================
input       ``blocks.0.hook_resid_pre``         ``[batch, pos, d_model]``
a{L}.h{H}   ``blocks.{L}.attn.hook_result``      ``[batch, pos, n_heads, d_model]``
m{L}        ``blocks.{L}.hook_mlp_out``          ``[batch, pos, d_model]``
==========  ==================================  ===============================

Receivers (what a node reads, before its norm):

==================  ==============================  =====================================
receiver            hook                            shape
==================  ==============================  =====================================
a{L}.h{H}<q>        ``blocks.{L}.hook_q_input``     ``[batch, pos, n_heads, d_model]``
a{L}.{h|kv}{G}<k>   ``blocks.{L}.hook_k_input``     ``[batch, pos, n_kv_heads, d_model]``
a{L}.{h|kv}{G}<v>   ``blocks.{L}.hook_v_input``     ``[batch, pos, n_kv_heads, d_model]``
m{L}                ``blocks.{L}.hook_mlp_in``      ``[batch, pos, d_model]``
logits              ``ln_final.hook_in``            ``[batch, pos, d_model]``
==================  ==============================  =====================================

The decomposition the engine relies on: every receiver input equals the sum of its upstream
senders' outputs (the per-head results include the attention output bias share), checked on
GPT-2 and Llama bridges in the integration tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from circuitfind.errors import HookError
from circuitfind.graphs.graph import ComputeGraph


@dataclass(frozen=True)
class HookTable:
    """Hook names for one graph. All methods are pure name lookups."""

    graph: ComputeGraph

    input: str = "blocks.0.hook_resid_pre"
    final: str = "ln_final.hook_in"

    @staticmethod
    def head_result(layer: int) -> str:
        """Per-head attention outputs of ``layer``."""
        return f"blocks.{layer}.attn.hook_result"

    @staticmethod
    def mlp_out(layer: int) -> str:
        """MLP output of ``layer``."""
        return f"blocks.{layer}.hook_mlp_out"

    @staticmethod
    def qkv_input(layer: int, kind: str) -> str:
        """Split query/key/value input of ``layer`` (``kind`` in q, k, v)."""
        return f"blocks.{layer}.hook_{kind}_input"

    @staticmethod
    def mlp_in(layer: int) -> str:
        """MLP input of ``layer``."""
        return f"blocks.{layer}.hook_mlp_in"

    def all_names(self) -> list[str]:
        """Every hook the engine may use for this graph."""
        names = [self.input, self.final]
        for layer in range(self.graph.n_layers):
            names.append(self.head_result(layer))
            names += [self.qkv_input(layer, k) for k in "qkv"]
            if self.graph.mlp_index[layer] is not None:
                names += [self.mlp_out(layer), self.mlp_in(layer)]
        return names

    def check(self, model: Any) -> None:
        """Check that ``model`` exposes every hook and has the switches on.

        Raises:
            HookError: a hook is missing or a switch is off (the message says which and how
                to fix it).
        """
        cfg = getattr(model, "cfg", None)
        off = [flag for flag in ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in")
               if cfg is not None and not getattr(cfg, flag, False)]
        if off:
            raise HookError(f"The model has {', '.join(off)} switched off; the engine needs split "
                            "q/k/v inputs, per-head results and MLP-input hooks. Load it with "
                            "circuitfind.load_model(...) or call "
                            "circuitfind.models.enable_patching_hooks(model).")
        hook_dict = getattr(model, "hook_dict", None)
        if hook_dict is None:
            raise HookError(f"{type(model).__name__} has no hook_dict; circuitfind needs a "
                            "transformer-lens 4.x TransformerBridge (use circuitfind.load_model).")
        missing = [name for name in self.all_names() if name not in hook_dict]
        if missing:
            raise HookError(f"The model lacks {len(missing)} hook(s) the patching engine needs, "
                            f"e.g. {', '.join(missing[:4])}. Its architecture "
                            f"({getattr(cfg, 'architecture', '?')}) may not expose split q/k/v "
                            "inputs or per-head results in transformer-lens.")
