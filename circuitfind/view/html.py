"""The interactive circuit viewer: one self-contained HTML file.

:func:`view` writes a page that works offline in any current browser, with no server and no
network: the circuit's data (:func:`circuitfind.view.data.view_data`), the page's script and
its styles are all inside the file. The script (``assets/viewer.js``) is plain JavaScript
drawing SVG; it uses no third-party library (decisions.md says why).

What the page does:

- the renderer's fixed-order layered layout (``input`` on top, per layer a row of heads and
  a row for the MLP, ``logits`` at the bottom); drag to pan, wheel to zoom, "fit";
- hover an edge: sender, receiver, q/k/v/MLP input, score with its kind and unit
  (:mod:`circuitfind.graphs.scores`) and rank; hover a node: its drawn in- and out-edges with
  their scores;
- a slider over circuit size (top-n in the viewer's order, :mod:`circuitfind.view.order`) or
  a threshold on the ranking key, showing the edge count and the normalized faithfulness at
  that size from the stored curve (measured where the curve has the size, interpolated
  between its sizes otherwise), with the curve drawn and the size marked;
- click a node (or find it by name) to pin it: the drawn edges on any path through it to the
  logits are highlighted;
- two circuits: their union, coloured shared / only A / only B, with the edge Jaccard;
- export the current view as SVG or PNG.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from circuitfind._files import atomic_write
from circuitfind.errors import ConfigError
from circuitfind.graphs.circuit import Circuit
from circuitfind.view.data import view_data

__all__ = ["view", "view_html"]


def _asset(name: str) -> str:
    # one name per step: Python 3.10's Traversable.joinpath takes one
    return (resources.files("circuitfind.view") / "assets" / name).read_text(encoding="utf-8")


def _load(obj: Any, what: str) -> Circuit:
    if isinstance(obj, Circuit):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        from circuitfind.evaluation.compare import load_any

        path = Path(obj)
        if path.is_dir():  # a run directory
            path = path / "circuit.json"
        if not path.exists():
            raise ConfigError(f"{what}: {str(obj)!r} does not exist; pass a circuit.json, "
                              "circuit.graphml, MIB JSON file or a run directory.")
        return load_any(path)
    raise ConfigError(f"{what} must be a Circuit or a path to a circuit file; got "
                      f"{type(obj).__name__}.")


def _label(obj: Any, default: str) -> str:
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        return path.name if path.name not in ("circuit.json", "") else path.parent.name or default
    return default


def view_html(circuit: Circuit | str | os.PathLike[str],
              other: Circuit | str | os.PathLike[str] | None = None,
              labels: tuple[str, str] | None = None, max_edges: int | None = None) -> str:
    """The viewer page as text (see :func:`view`)."""
    a = _load(circuit, "view's circuit")
    b = None if other is None else _load(other, "view's second circuit")
    if labels is None:
        labels = (_label(circuit, "A"), _label(other, "B"))
        if labels[0] == labels[1]:
            labels = ("A", "B")
    data = view_data(a, b, labels=labels, max_edges=max_edges)
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    text = text.replace("</", "<\\/").replace("<!--", "<\\!--")  # safe inside <script>
    page = _asset("viewer.html")
    for key, value in (("__CSS__", _asset("viewer.css")), ("__SVG_CSS__", _asset("viewer-svg.css")),
                       ("__JS__", _asset("viewer.js")),
                       ("__DATA__", text)):
        page = page.replace(key, value, 1)
    return page


def view(circuit: Circuit | str | os.PathLike[str], path: str | os.PathLike[str],
         other: Circuit | str | os.PathLike[str] | None = None,
         labels: tuple[str, str] | None = None, max_edges: int | None = None) -> Path:
    """Write the interactive viewer of a circuit (or of two, compared) to one HTML file.

    Args:
        circuit: A :class:`Circuit`, or a path to ``circuit.json`` / ``circuit.graphml`` /
            MIB circuit JSON, or a run directory (its ``circuit.json``).
        path: The ``.html`` file to write (atomically; its directory must exist).
        other: A second circuit (same kinds of value) over the same graph: the page shows
            the union of both, coloured shared / only in A / only in B, with the Jaccard.
        labels: Names of the two circuits (default: their file or run directory names, else
            ``A`` and ``B``).
        max_edges: One circuit: the most edges the size slider reaches (default: every edge
            with a finite score; never fewer than the kept edges).

    Returns:
        The path written.

    Raises:
        ConfigError: a missing or unreadable circuit file, circuits over different graphs,
            a bad ``max_edges``, or a directory that does not exist or is not writable.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"Cannot write {str(path)!r}: the directory {str(path.parent)!r} "
                          "does not exist; create it first (mkdir -p).")
    page = view_html(circuit, other, labels=labels, max_edges=max_edges)
    try:
        return atomic_write(path, page.encode("utf-8"))
    except OSError as err:
        raise ConfigError(f"Cannot write {str(path)!r}: {err.strerror or err}.") from err
