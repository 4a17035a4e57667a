"""Models split across devices: where each stage of the forward runs, and an adapter that runs
each block's primitives on its block's device.

Why. A model loaded with the bridge's ``device_map`` / ``n_devices`` (Hugging Face's
dispatcher, as for a model larger than one GPU) has its blocks on different devices. Hugging
Face's own forward moves activations between them with hooks on each module's ``forward``;
the block runner (:mod:`circuitfind.patching.runner`) reads the weights in place and calls no
module's ``forward``, so it has to move activations itself.

Method. :meth:`Placement.of` reads the device of every stage from the Hugging Face modules'
parameters: the embeddings, each block (all its parameters must share one device, as
Hugging Face's device maps keep them), and the final norm with the unembedding. The runner
keeps its buffers (cached residuals, sender outputs and differences, gradients) on the
*home* device, the one the engine puts tokens on (the model's first parameter's). When the
stages span more than one device, :func:`placed` wraps the family's adapter in a
:class:`PlacedArchitecture`: each primitive of block ``L`` (norms, projections, attention,
per-head outputs, MLP, the gradient helpers) receives its tensor arguments moved to block
``L``'s device, computes there with that block's weights, and returns its results to the home
device (``out=`` buffers are filled in place, as the adapter's contract says); the embedding
and the final norm and unembedding run on their own devices likewise. Moves are
differentiable, so EAP's backward pass crosses devices the same way. Per call a block moves
its activations in and its outputs out (a few ``[N, T, d_model]`` tensors), never weights,
except for :meth:`PlacedArchitecture.w_out`'s callers outside the adapter (the output bias of
the fully ablated residual, once per pass). A model on one device gets its adapter unwrapped:
no cost.

Limits. The home device holds every buffer (its memory is what the engine's budget sizes);
the final norm and the unembedding must share a device (a tied unembedding lives with the
embeddings: map the final norm there too); offloaded (``cpu`` / ``disk`` / ``meta``)
parameters of an accelerate device map are not supported by the runner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from circuitfind.errors import ConfigError
from circuitfind.patching.architectures.base import Architecture, unwrap, weights

LAYER_METHODS = (
    "ln_attn", "ln_mlp", "norm_parts", "qkv_offsets", "qkv_input_weights", "qkv_input_grads",
    "mlp", "mlp_into", "qkv", "head_weights", "project", "project_some", "project_heads",
    "project_heads_normed", "w_out", "attend", "head_results", "head_results_all",
    "head_outputs", "attn_from_heads", "attn_out", "post_norm", "post_norm_jvp", "post_norm_rms",
    "qk_norm", "ln_attn_rms", "qkv_head_weights",
)
"""The adapter methods whose first argument is a layer: they run on that layer's device."""


def _device_of(params: Iterable[Tensor], what: str) -> torch.device:
    """The one device ``params`` live on.

    Raises:
        ConfigError: none, or more than one device.
    """
    devices = {p.device for p in params}
    if len(devices) != 1:
        found = ", ".join(sorted(str(d) for d in devices)) or "no parameters"
        raise ConfigError(f"The block runner runs {what} on one device, but its parameters are "
                          f"on {found}; give it one device in the device_map (Hugging Face's "
                          "'auto' and 'balanced' maps keep each block whole).")
    return devices.pop()


@dataclass(frozen=True)
class Placement:
    """The device of each stage of a model's forward.

    Attributes:
        home: Where the runner's buffers live (the model's first parameter's device, which is
            where the engine puts tokens).
        embed: The input embeddings' device.
        layers: Each block's device, ``[n_layers]``.
        final: The final norm's and the unembedding's device.
    """

    home: torch.device
    embed: torch.device
    layers: tuple[torch.device, ...]
    final: torch.device

    @classmethod
    def of(cls, arch: Architecture) -> Placement:
        """Read the placement of ``arch``'s model from its modules' parameters.

        Args:
            arch: A family adapter (its ``hf`` model and ``blocks``).

        Returns:
            The placement.

        Raises:
            ConfigError: a block, or the final norm with the unembedding, spans devices; or a
                parameter is offloaded to the ``meta`` device.
        """
        hf = unwrap(arch.hf)
        blocks = [unwrap(b) for b in arch.blocks]
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        embedding = weights(hf.get_input_embeddings())[0]
        head_module = hf.get_output_embeddings()
        head = embedding if head_module is None else weights(head_module)[0]
        # the final norm: the parameters outside the blocks, embeddings and unembedding
        rest = [p for name, p in hf.named_parameters() if id(p) not in in_blocks
                and p is not embedding and p is not head
                and "embed" not in name and ".wpe." not in name and ".wte." not in name]
        final_params = [*rest, head]
        placement = cls(
            home=next(hf.parameters()).device,
            embed=embedding.device,
            layers=tuple(_device_of(b.parameters(), f"block {i}") for i, b in enumerate(blocks)),
            final=_device_of(final_params, "the final norm and the unembedding"))
        if any(d.type == "meta" for d in placement.devices):
            raise ConfigError("Some of the model's parameters are on the 'meta' device (an "
                              "offloading device_map); circuitfind's block runner reads the "
                              "weights in place: load the model onto real devices.")
        return placement

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Every stage's device: home, embeddings, blocks, final."""
        return (self.home, self.embed, *self.layers, self.final)

    @property
    def single(self) -> bool:
        """Whether every stage runs on the home device."""
        return all(d == self.home for d in self.devices)


def move(value: Any, device: torch.device, copy: bool = False) -> Any:
    """``value`` with every tensor (also inside tuples, lists and dicts) moved to ``device``.

    Args:
        value: A tensor, or a tuple / list / dict holding some; other values pass unchanged.
        device: The target device.
        copy: Copy tensors already on ``device`` too (as a move between real devices does;
            the tests use it to check that nothing relies on sharing memory across a move).
    """
    if isinstance(value, Tensor):
        return value.to(device, copy=copy)
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device, copy) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device, copy) for k, v in value.items()}
    return value


if TYPE_CHECKING:
    # to the type checker a placed adapter is an adapter: it has the whole interface (the
    # layer methods as wrappers, the rest forwarded by ``__getattr__``)
    _Adapter = Architecture
else:
    _Adapter = object


class PlacedArchitecture(_Adapter):
    """A family adapter whose per-layer primitives run on their layer's device.

    Every method of :data:`LAYER_METHODS` takes the layer first: its tensor arguments move to
    that layer's device, the adapter computes there, and its results move to the home device
    (an ``out=`` buffer is filled in place). :meth:`embed` and :meth:`final` run on the
    embedding's and the unembedding's devices. Attributes and other methods are the
    adapter's. Built by :func:`placed`.

    Args:
        arch: The family adapter.
        placement: Its model's :class:`Placement`.
        mover: How a value moves to a device (default :func:`move`; tests record calls).
    """

    def __init__(self, arch: Architecture, placement: Placement,
                 mover: Callable[[Any, torch.device], Any] = move) -> None:
        self.arch, self.placement, self.mover = arch, placement, mover
        for name in LAYER_METHODS:
            setattr(self, name, self._on_layer(getattr(arch, name)))

    def __getattr__(self, name: str) -> Any:  # attributes and shared methods of the adapter
        return getattr(self.arch, name)

    def _run(self, fn: Callable[..., Any], device: torch.device, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        """``fn(*args, **kwargs)`` on ``device``; results (or ``out``) on the home device."""
        home, to = self.placement.home, self.mover
        out = kwargs.pop("out", None)
        args, kwargs = to((args, kwargs), device)
        if out is None:
            return to(fn(*args, **kwargs), home)
        # the adapter fills ``out`` (on the block's device here) and returns it or a view of
        # all of it (``out.view(...)``): fill the caller's buffer, return the same view of it
        local = torch.empty_like(out, device=device)
        result = fn(*args, out=local, **kwargs)
        out.copy_(local)
        if result is local:
            return out
        if result.data_ptr() == local.data_ptr() and result.numel() == local.numel():
            return out.view(result.shape)
        return to(result, home)  # a result besides ``out``

    def _on_layer(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def on_layer(layer: int, *args: Any, **kwargs: Any) -> Any:
            return self._run(fn, self.placement.layers[layer], (layer, *args), kwargs)

        on_layer.__doc__ = fn.__doc__
        return on_layer

    def embed(self, tokens: Tensor) -> Tensor:
        """The adapter's embeddings, computed on the embeddings' device."""
        return self._run(self.arch.embed, self.placement.embed, (tokens,), {})

    def final(self, x: Tensor) -> Tensor:
        """The adapter's final norm and unembedding, computed on their device."""
        return self._run(self.arch.final, self.placement.final, (x,), {})


def placed(arch: Architecture) -> Architecture | PlacedArchitecture:
    """``arch`` itself when its model runs on one device, else a :class:`PlacedArchitecture`.

    Raises:
        ConfigError: see :meth:`Placement.of`.
    """
    placement = Placement.of(arch)
    return arch if placement.single else PlacedArchitecture(arch, placement)


__all__ = ["LAYER_METHODS", "Placement", "PlacedArchitecture", "move", "placed"]
