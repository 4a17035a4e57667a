"""Loading models as transformer-lens 4.x ``TransformerBridge`` objects with the hooks we need.

circuitfind patches edges between *senders* (the embedding, each attention head's output, each
MLP's output) and *receivers* (each head's q/k/v input, each MLP's input, the final residual).
That needs three transformer-lens switches: ``use_split_qkv_input`` (a separate residual copy per
head and per q/k/v), ``use_attn_result`` (per-head outputs) and ``use_hook_mlp_in``.
:func:`load_model` boots the model through ``TransformerBridge.boot_transformers`` and turns
them on.

Model arguments are resolved in one place, :func:`resolve_model_source`: a loaded bridge, a
zoo organism ``zoo:NAME`` (files shipped inside the package), a local Hugging Face directory
or a hub name. The ``zoo:`` prefix is parsed only by :func:`zoo_name` and written only by
:func:`zoo_source`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from circuitfind._progress import bars_wanted
from circuitfind.errors import ConfigError, ModelLoadError

ZOO_PREFIX = "zoo:"


def zoo_name(source: Any) -> str | None:
    """The organism name of a ``zoo:NAME`` model argument, or ``None`` for any other value."""
    if isinstance(source, str) and source.strip().startswith(ZOO_PREFIX):
        return source.strip()[len(ZOO_PREFIX):]
    return None


def zoo_source(name: str) -> str:
    """The model argument naming a zoo organism: ``zoo_source("ioi-small") == "zoo:ioi-small"``."""
    return ZOO_PREFIX + (zoo_name(name) or name)


_SOURCE_DIRS: dict[str, Callable[[str], Path]] = {}


def register_model_source(prefix: str, directory: Callable[[str], Path]) -> None:
    """Let model arguments ``PREFIX + NAME`` name the directory ``directory(NAME)``.

    The zoo registers ``zoo:`` when :mod:`circuitfind.zoo` is imported (as ``import
    circuitfind`` does); a package of model organisms can register its own prefix.

    Raises:
        ConfigError: a prefix that is empty or does not end with ``:``.
    """
    if not prefix.endswith(":") or len(prefix) < 2:
        raise ConfigError(f"A model-source prefix ends with ':' (like 'zoo:'); got {prefix!r}.")
    _SOURCE_DIRS[prefix] = directory


def _source_dir(prefix: str, name: str) -> Path:
    """The directory ``prefix + name`` names (``import circuitfind`` registers the zoo).

    Raises:
        ConfigError: nothing registered ``prefix``.
    """
    if prefix not in _SOURCE_DIRS:
        raise ConfigError(f"No model source is registered for {prefix!r}; import circuitfind "
                          "(its zoo registers 'zoo:').")
    return _SOURCE_DIRS[prefix](name)


@dataclass(frozen=True)
class ModelSource:
    """A resolved model argument.

    Attributes:
        kind: ``"bridge"`` (an already loaded model), ``"zoo"``, ``"local"`` or ``"hub"``.
        location: What to boot: the bridge itself, a directory path, or a hub name.
        display_name: The name recorded as provenance (``zoo:NAME``, the path, the hub name).
    """

    kind: str
    location: Any
    display_name: str


def resolve_model_source(source: Any) -> ModelSource:
    """Classify a model argument: a bridge, ``zoo:NAME``, a local directory or a hub name.

    Args:
        source: A ``TransformerBridge``, ``"zoo:NAME"``, a path (``str`` or ``os.PathLike``)
            or a hub name (``"gpt2"``, ``"org/model"``).

    Returns:
        The :class:`ModelSource`. Nothing is loaded.

    Raises:
        ConfigError: an argument of another type.
        UnknownNameError: an unknown zoo organism (the message lists them).
        ModelLoadError: a path that is not a Hugging Face model directory.
    """
    if _is_bridge(source):
        cfg = getattr(source, "cfg", None)
        name = getattr(cfg, "model_name", None) or getattr(cfg, "tokenizer_name", None) or "?"
        return ModelSource("bridge", source, str(name))
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"A model must be a hub name, a local directory, zoo:NAME or a "
                          f"TransformerBridge; got {type(source).__name__}.")
    organism = zoo_name(source)
    if organism is not None:
        return ModelSource("zoo", str(_source_dir(ZOO_PREFIX, organism)), zoo_source(organism))
    name = os.fspath(source)
    path = Path(name).expanduser()
    looks_local = path.exists() or name.startswith((".", "/", "~")) or os.sep in name.strip("/") \
        and not _looks_like_hub_id(name)
    if not looks_local:
        return ModelSource("hub", name, name)
    if not path.is_dir():
        raise ModelLoadError(f"{name!r} is not a directory. Pass a Hugging Face model "
                             "directory (with config.json, weights and tokenizer files), a "
                             "hub name such as 'gpt2', or zoo:NAME.")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} is not a Hugging Face model directory: it has no "
                             "config.json. Save one with model.save_pretrained(dir) and "
                             "tokenizer.save_pretrained(dir).")
    return ModelSource("local", str(path.resolve()), name)


def _is_bridge(obj: Any) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - transformer-lens is a hard dependency
        return False
    return isinstance(obj, TransformerBridge)


#: The dtypes a model loads in, by name (the command line's ``--dtype`` choices).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16, "float64": torch.float64}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                  "fp64": "float64", "double": "float64", "float": "float32"}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """The ``torch.dtype`` a model loads in, from its name (``None``: float32).

    Args:
        dtype: ``None``, a ``torch.dtype`` among :data:`DTYPES`' values, or a name: one of
            :data:`DTYPES` (``float32``, ``float16``, ``bfloat16``, ``float64``; any case, a
            ``torch.`` prefix allowed) or the short forms ``fp32``, ``fp16``, ``half``,
            ``bf16``, ``fp64``, ``double``.

    Returns:
        The ``torch.dtype``.

    Raises:
        ConfigError: anything else (an integer dtype, an unknown name); the message lists the
            choices.
    """
    if dtype is None:
        return torch.float32
    choices = ", ".join(DTYPES)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"A model cannot be loaded in {dtype}; use one of {choices}.")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"Unknown dtype {dtype!r}; use one of {choices}.",
                          cli=f"--dtype must be one of {choices}; got {dtype!r}.")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype | str | None) -> str:
    """The name of a dtype as :data:`DTYPES` spells it (``torch.bfloat16`` -> ``"bfloat16"``).

    Raises:
        ConfigError: as :func:`parse_dtype`.
    """
    parsed = parse_dtype(dtype)
    return next(name for name, value in DTYPES.items() if value == parsed)


def enable_patching_hooks(model: Any) -> Any:
    """Switch on split q/k/v inputs, per-head results and MLP-input hooks on a bridge.

    Args:
        model: A ``TransformerBridge``.

    Returns:
        The same model (modified in place).

    Raises:
        HookError: the bridge cannot expose one of those hooks for this architecture.
    """
    from circuitfind.errors import HookError

    for setter in ("set_use_split_qkv_input", "set_use_attn_result", "set_use_hook_mlp_in"):
        fn = getattr(model, setter, None)
        if fn is None:
            raise HookError(f"This model object has no {setter}(); circuitfind needs a "
                            "transformer-lens 4.x TransformerBridge (use circuitfind.load_model).")
        try:
            fn(True)
        except Exception as err:
            raise HookError(f"{setter}(True) failed on this {type(model).__name__} "
                            f"({getattr(model.cfg, 'architecture', '?')}): {err}. The engine "
                            "needs split q/k/v inputs, per-head results and MLP-input hooks."
                            ) from err
    return model


def load_model(name_or_path: Any, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None) -> Any:
    """Load a causal LM as a ``TransformerBridge`` ready for edge patching.

    Args:
        name_or_path: A Hugging Face hub name (``"gpt2"``; needs internet or the HF cache), a
            local Hugging Face model directory (``config.json`` + weights + tokenizer), a zoo
            organism (``"zoo:induction-2l"``, see :mod:`circuitfind.zoo`) or an existing
            ``TransformerBridge`` (its hook switches are turned on and it is returned); see
            :func:`resolve_model_source`.
        device: Torch device (default: CUDA if available, else CPU).
        dtype: Parameter dtype (default float32); a ``torch.dtype`` or a name like "float64".

    Returns:
        A ``transformer_lens.model_bridge.TransformerBridge`` in eval mode with
        ``use_split_qkv_input``, ``use_attn_result`` and ``use_hook_mlp_in`` on.

    Raises:
        ModelLoadError: the path is not a model directory, the name is not on the hub, or the
            hub cannot be reached and no local copy exists (the message says how to pass a
            local directory).
        HookError: the architecture does not expose the hooks circuitfind needs.
        UnknownNameError: an unknown zoo organism.
    """
    source = resolve_model_source(name_or_path)
    if source.kind == "bridge":
        model = enable_patching_hooks(source.location)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=parse_dtype(dtype) if dtype is not None else None)
        return model
    torch_dtype = parse_dtype(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name, looks_local = source.location, source.kind != "hub"
    from transformer_lens.model_bridge import TransformerBridge

    try:
        tokenizer = _saved_tokenizer(Path(name)) if looks_local else None
        with _loading_bars(bars_wanted()):
            model = TransformerBridge.boot_transformers(name, device=device, dtype=torch_dtype,
                                                        tokenizer=tokenizer)
    except Exception as err:  # translate the many hub / IO failures into one message
        raise ModelLoadError(_load_failure_message(name, looks_local, err)) from err
    model.eval()
    if source.kind == "zoo":
        model.cfg.model_name = source.display_name  # provenance: "zoo:NAME", not a site path
    return enable_patching_hooks(model)


_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_tokenizer(directory: Path) -> Any:
    """The tokenizer a local directory saved, where ``AutoTokenizer`` would replace it.

    transformers 5 picks a tokenizer class by the model's type: a directory whose
    ``tokenizer_config.json`` names a generic ``tokenizer.json`` tokenizer (``TokenizersBackend``
    or ``PreTrainedTokenizerFast``: a word-level or custom tokenizer saved beside, e.g., a Qwen2
    model) is loaded as ``Qwen2Tokenizer``, whose own pre-tokenizer then encodes nothing of that
    vocabulary. Such a directory gets its own tokenizer back; every other directory (a hub
    checkpoint's ``Qwen2Tokenizer``, ``GPT2Tokenizer``, ...) returns ``None`` and loads as
    usual.
    """
    import json

    config = directory / "tokenizer_config.json"
    if not (directory / "tokenizer.json").is_file() or not config.is_file():
        return None
    try:
        saved = json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None
    if saved not in _GENERIC_TOKENIZERS:
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    auto = AutoTokenizer.from_pretrained(str(directory))
    if type(auto).__name__ in _GENERIC_TOKENIZERS:
        return None
    # with add_bos_token set, the bridge keeps it (else it reloads it through AutoTokenizer,
    # as it does every tokenizer, to add BOS)
    return PreTrainedTokenizerFast.from_pretrained(str(directory), add_bos_token=True)


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """Hugging Face's weight-loading and download bars on (a terminal) or off (a log, or
    ``TQDM_DISABLE``), restored afterwards."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    was_hf = hf_logging.is_progress_bar_enabled()
    was_hub = not hub_utils.are_progress_bars_disabled()
    if not show:
        hf_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if not show and was_hf:
            hf_logging.enable_progress_bar()
        if not show and was_hub:
            hub_utils.enable_progress_bars()


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def _load_failure_message(name: str, local: bool, err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    if local:
        return (f"Could not load the model in {name!r} ({text}). The directory must hold a "
                "Hugging Face causal LM (config.json, model weights) and its tokenizer files.")
    return (f"Could not load the model {name!r} from the Hugging Face hub or its local cache "
            f"({text}). If this machine is offline, download the model elsewhere "
            f"(`huggingface-cli download {name} --local-dir DIR`) and pass that directory, "
            "e.g. `--model DIR` or `cf.load_model('DIR')`.")


def config_d_model(model: str) -> int:
    """The residual width (``n_embd``, ``hidden_size`` or ``d_model``) of a model named as
    :func:`circuitfind.discover` records it: a local directory's or zoo organism's
    ``config.json``, or a hub model's config in the Hugging Face cache (nothing is downloaded).

    Raises:
        ConfigError: no config to read, or no width in it.
    """
    import json

    hint = "pass d_model= (the model's hidden size; --d-model on the command line)."
    organism = zoo_name(str(model))
    if organism is not None:
        directory: Path | None = _source_dir(ZOO_PREFIX, organism)
    else:
        directory = Path(str(model)).expanduser()
    if directory is not None and (directory / "config.json").is_file():
        config = json.loads((directory / "config.json").read_text())
    else:  # a hub name: its config, if the Hugging Face cache holds it
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(model), local_files_only=True).to_dict()
        except (OSError, ValueError) as err:
            raise ConfigError(f"Cannot read the config of {model!r} (not a local model "
                              f"directory, not in the Hugging Face cache); {hint}") from err
    for key in ("n_embd", "hidden_size", "d_model"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ConfigError(f"The config of {model!r} has no n_embd/hidden_size/d_model; {hint}")




def model_config(source: Any) -> Any:
    """The Hugging Face config of a model argument, without loading any weights.

    Resolves ``source`` like :func:`load_model` (:func:`resolve_model_source`): a zoo organism
    or local directory is read from its ``config.json``, a hub name from the Hugging Face
    cache (nothing is downloaded). A loaded bridge gives its wrapped model's config.

    Returns:
        A ``transformers.PretrainedConfig``.

    Raises:
        ModelLoadError: a hub model whose config is not in the local cache, or a config
            transformers cannot read (the message says how to pass a local directory).
    """
    from transformers import AutoConfig

    resolved = resolve_model_source(source)
    if resolved.kind == "bridge":
        return resolved.location.original_model.config
    try:
        return AutoConfig.from_pretrained(str(resolved.location),
                                          local_files_only=resolved.kind == "hub")
    except (OSError, ValueError) as err:
        raise ModelLoadError(_load_failure_message(str(resolved.location),
                                                   resolved.kind != "hub", err)) from err


def model_tokenizer(source: Any) -> Any | None:
    """The tokenizer of a model argument, or ``None`` where none is at hand (no weights are
    loaded; a hub name is looked up in the local cache only)."""
    resolved = resolve_model_source(source)
    if resolved.kind == "bridge":
        return getattr(resolved.location, "tokenizer", None)
    from transformers import AutoTokenizer

    try:
        saved = _saved_tokenizer(Path(resolved.location)) if resolved.kind != "hub" else None
        return saved if saved is not None else AutoTokenizer.from_pretrained(
            str(resolved.location), local_files_only=resolved.kind == "hub")
    except (OSError, ValueError, TypeError):
        return None
