"""File helpers every circuitfind writer and reader shares.

- :func:`atomic_write`: the one way circuitfind writes a file (circuit JSON and GraphML, MIB
  files, drawings, checkpoints of long runs): a temporary file in the target directory, flushed
  to disk, then ``os.replace``. A crash never leaves a half-written file, and a reader never sees
  one.
- :func:`read_bytes`, :func:`read_json`: read a file, turning a missing, unreadable or invalid
  file into a :class:`~circuitfind.errors.ConfigError` that names it.
- :func:`floats_for_json`: float32 values as JSON numbers that read back bit for bit (the circuit
  and MIB codecs both write scores this way).

This module sits below every package of circuitfind (it imports only :mod:`circuitfind.errors`),
so graphs, algorithms and the CLI can all use it without bending the import direction.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from circuitfind.errors import ConfigError

__all__ = ["atomic_write", "read_bytes", "read_json", "floats_for_json"]


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory + replace).

    The temporary file is flushed and fsynced before it replaces ``path``; an existing file's
    permission bits are kept (a new file gets ``0o644``). On any error the temporary file is
    removed and ``path`` is left as it was.

    Args:
        path: The file to write; its directory must exist.
        data: The complete content.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: the directory does not exist or is not writable, or the disk is full.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def read_bytes(path: str | os.PathLike[str], what: str) -> bytes:
    """The content of ``path``.

    Args:
        path: The file to read.
        what: What the file is, for the error message (``"circuit JSON"``).

    Raises:
        ConfigError: the file is missing or unreadable (naming ``what`` and ``path``).
    """
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"No {what} file at {str(path)!r}.") from None
    except OSError as err:
        raise ConfigError(f"Cannot read {what} file {str(path)!r}: {err}.") from err


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """The parsed JSON of ``path`` (UTF-8).

    Args:
        path: The file to read.
        what: What the file is, for the error message (``"MIB circuit JSON"``).

    Raises:
        ConfigError: a missing or unreadable file, or invalid UTF-8/JSON (naming ``what``).
    """
    raw = read_bytes(path, what)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {err}.") from err


def floats_for_json(values: Tensor) -> list[float]:
    """float32 values ``[E]`` as Python floats whose ``repr`` is short and reads back exactly.

    ``str(np.float32(x))`` is the shortest decimal that rounds to ``x`` as a float32; it is used
    when reading it as a double and rounding to float32 gives ``x`` bit for bit (checked for
    every value), else the exact double value of ``x`` is used. Non-finite values stay NaN and
    ±inf (Python's JSON extension writes them as ``NaN`` and ``Infinity``).

    Args:
        values: ``[E]`` float32 tensor on the CPU.

    Returns:
        ``E`` Python floats, in order.
    """
    arr = values.numpy().astype(np.float32, copy=False)
    short = np.array([float(str(v)) for v in arr], dtype=np.float64)
    exact = arr.astype(np.float64)
    same = short.astype(np.float32).view(np.uint32) == arr.view(np.uint32)
    return np.where(same, short, exact).tolist()
