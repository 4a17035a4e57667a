"""Writing a discovered circuit to a run directory, so that a drawing can never cost a run.

:func:`write_run` writes the results first — ``circuit.json`` (lossless, every edge's score),
``circuit.graphml`` and ``report.md``, each moved into place atomically after all three are
written — and only then draws: ``circuit.dot`` (the Graphviz source) and ``circuit.svg``. A
drawing that fails leaves the results in place and is reported in one line on the
``circuitfind`` logger with the command that draws it later (``circuitfind render``); it is
not an error. :func:`check_output_dir` and :func:`check_output_file` validate output paths
before any work is done.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circuitfind.errors import ConfigError, OutputExistsError
from circuitfind.evaluation.faithfulness import ABOVE_ONE
from circuitfind.graphs.circuit import Circuit
from circuitfind.graphs.render import RenderOptions, render
from circuitfind.graphs.scores import score_meaning
from circuitfind.patching.spec import DEFAULT_ABLATION
from circuitfind.view import view as write_view

__all__ = ["write_run", "RunFiles", "report_markdown", "check_output_dir", "check_output_file",
           "DATA_FILES", "DRAWING_FILES", "VIEW_FILE", "RUN_FILES"]

LOGGER = logging.getLogger("circuitfind")

DATA_FILES = ("circuit.json", "circuit.graphml", "report.md")
"""The results of a run, written before anything is drawn."""
DRAWING_FILES = ("circuit.dot", "circuit.svg")
"""The drawing of a run (best effort)."""
VIEW_FILE = "view.html"
"""The interactive viewer of a run (best effort, after the drawings)."""
RUN_FILES = DATA_FILES + DRAWING_FILES + (VIEW_FILE,)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_dir(directory: Path, what: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".circuitfind-probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"{what}: the directory {str(directory)!r} is not writable "
                          f"({err.strerror or err}); choose another location.") from err


def check_output_dir(out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Check, before any work, that a run can be written to the directory ``out``.

    ``out`` and missing parents are created by :func:`write_run` (like ``mkdir -p``); the
    nearest existing ancestor must be a writable directory.

    Returns:
        ``out`` as a Path.

    Raises:
        ConfigError: ``out`` or an ancestor is a file, or the directory is not writable.
        OutputExistsError: ``out`` already holds a run and ``overwrite`` is False.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"The output directory {str(out)!r} exists and is not a directory.")
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not overwrite:
        what = f"{str(out)!r} already holds a run ({', '.join(existing)}); pass "
        how = " to replace it or choose another output directory."
        raise OutputExistsError(f"{what}overwrite=True{how}", cli=f"{what}--overwrite{how}")
    base = _nearest_existing(out)
    if not base.is_dir():
        raise ConfigError(f"Cannot create the output directory {str(out)!r}: {str(base)!r} is "
                          "not a directory.")
    _check_writable_dir(base, f"Cannot write the run to {str(out)!r}")
    return out


def check_output_file(path: str | os.PathLike[str]) -> Path:
    """Check, before any work, that the file ``path`` can be written.

    Returns:
        ``path`` as a Path.

    Raises:
        ConfigError: its directory is missing, not a directory or not writable, or ``path``
            is a directory.
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise ConfigError(f"Cannot write {str(path)!r}: the directory {str(directory)!r} does "
                          "not exist; create it first (mkdir -p).")
    if path.is_dir():
        raise ConfigError(f"Cannot write {str(path)!r}: it is a directory.")
    _check_writable_dir(directory, f"Cannot write {str(path)!r}")
    return path


@dataclass(frozen=True)
class RunFiles:
    """What :func:`write_run` wrote.

    Attributes:
        written: Paths written, results first.
        drawing_error: Why a drawing failed (one line, ``"circuit.svg: Error: message"``),
            or ``None`` when both were drawn.
    """

    written: tuple[Path, ...]
    drawing_error: str | None


def write_run(circuit: Circuit, out: str | os.PathLike[str], *, overwrite: bool = False,
              renderer: str | None = None, options: RenderOptions | None = None,
              view: bool = True) -> RunFiles:
    """Write a circuit's results, then its drawing, to the directory ``out``.

    Args:
        circuit: The circuit (from :func:`circuitfind.discover`).
        out: The run directory (created with missing parents).
        overwrite: Replace the files of a run already in ``out``.
        renderer: ``"graphviz"``, ``"matplotlib"`` or ``None`` (Graphviz when ``dot`` is on the
            PATH, else matplotlib).
        options: Drawing options for ``circuit.svg``.
        view: Also write ``view.html``, the interactive viewer (:func:`circuitfind.view.view`),
            after the drawings and as they are: a failure is reported, never raised.

    Returns:
        A :class:`RunFiles`. When drawing fails its ``drawing_error`` says why, the failure is
        logged in one line with the ``circuitfind render`` command that draws it later, and
        ``circuit.json``, ``circuit.graphml`` and ``report.md`` are in place.

    Raises:
        ConfigError, OutputExistsError: see :func:`check_output_dir` (nothing is written).
        OSError: writing the results failed (e.g. the disk is full).
    """
    out = check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out))
    try:
        circuit.to_json(tmp / "circuit.json", indent=1)
        circuit.to_graphml(tmp / "circuit.graphml")
        (tmp / "report.md").write_text(report_markdown(circuit), encoding="utf-8")
        for name in DATA_FILES:  # each file replaced atomically; all written before any moves
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    written = [out / name for name in DATA_FILES]
    for name in (*DRAWING_FILES, VIEW_FILE):  # no stale drawing of an earlier run survives
        (out / name).unlink(missing_ok=True)
    errors = []
    for name, name_renderer in (("circuit.dot", None), ("circuit.svg", renderer)):
        try:  # each drawing on its own: no drawing failure may cost the run or the other file
            written.append(render(circuit, out / name, renderer=name_renderer, options=options))
        except Exception as err:  # noqa: BLE001
            errors.append(f"{name}: {type(err).__name__}: {err}")
    if view:
        try:
            written.append(write_view(circuit, out / VIEW_FILE))
        except Exception as err:  # noqa: BLE001
            errors.append(f"{VIEW_FILE}: {type(err).__name__}: {err}")
    if not errors:
        return RunFiles(tuple(written), None)
    reason = " ".join("; ".join(errors).split())
    drawn = (*DRAWING_FILES, VIEW_FILE) if view else DRAWING_FILES
    missing = " and ".join(n for n in drawn if not (out / n).exists())
    later = (f" (the viewer: circuitfind view {out / 'circuit.json'} --out {out / VIEW_FILE})"
             if view and not (out / VIEW_FILE).exists() else "")
    LOGGER.warning(f"{missing} not drawn ({reason}); {', '.join(DATA_FILES)} are saved in "
                   f"{str(out)!r}. Draw it later with: circuitfind render "
                   f"{out / 'circuit.json'} {out / 'circuit.svg'}{later}")
    return RunFiles(tuple(written), reason)


def report_markdown(circuit: Circuit) -> str:
    """The run report (Markdown): provenance, faithfulness, and the top edges by |score|."""
    md = circuit.metadata
    f = md.get("faithfulness", {})
    lines = [f"# circuitfind: {md.get('task')} on {md.get('model')}", "",
             "| field | value |", "| --- | --- |"]
    rows = [("model", md.get("model")), ("task", md.get("task")),
            ("metric", f"{md.get('metric')} ({md.get('metric_unit')})"),
            ("algorithm", md.get("algorithm")),
            ("algorithm parameters", json.dumps(md.get("algorithm_params", {}))),
            ("ablation (what removed edges carry)", ablation_kind(md)),
            ("task description", md.get("task_description") or ""),
            ("examples / seed", f"{md.get('n_examples')} / {md.get('seed')}"),
            ("selection", json.dumps(md.get("selection", {}))),
            ("edges (selected → after pruning)", f"{md.get('selected_edges')} → {circuit.n_edges}"
                                                  f" of {f.get('n_total_edges')}"),
            ("wall time", f"{md.get('wall_time_s')} s"),
            ("versions", ", ".join(f"{k} {v}" for k, v in md.get("versions", {}).items()))]
    acdc = md.get("acdc")
    if acdc:
        rows.append(("ACDC", f"τ={acdc.get('threshold')} ({acdc.get('objective')}, "
                             f"{acdc.get('mode')} mode); {acdc.get('tested_edges')} edges and "
                             f"{acdc.get('node_tests')} q/k/v nodes tested; objective "
                             f"{_fmt(acdc.get('value_circuit'))} {acdc.get('objective_unit')}"))
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Faithfulness", "", "| quantity | value |", "| --- | --- |",
              f"| normalized faithfulness (m(C) − m(∅)) / (m(M) − m(∅)) | {_fmt(f.get('faithfulness'))} |",
              f"| m(C), circuit | {_fmt(f.get('metric_circuit'))} {f.get('metric_unit', '')} |",
              f"| m(M), full model | {_fmt(f.get('metric_full'))} {f.get('metric_unit', '')} |",
              f"| m(∅), empty circuit | {_fmt(f.get('metric_empty'))} {f.get('metric_unit', '')} |",
              f"| KL(full ‖ circuit) at metric positions | {_fmt(f.get('kl_div'))} nats |", ""]
    value = f.get("faithfulness")
    if isinstance(value, (int, float)) and (value > 1 or value < 0):
        lines += [f"Note: {ABOVE_ONE[0].upper()}{ABOVE_ONE[1:]}", ""]
    ref = md.get("reference")
    if ref:
        lines += ["## Against the reference circuit", "",
                  f"Reference: {ref.get('source')} ({ref.get('n_edges')} edges). ROC AUC of the "
                  "algorithm's |scores| over all edges (Conmy et al. 2023; ties count one half):",
                  "", "| level | ROC AUC |", "| --- | ---: |",
                  f"| edges | {_fmt(ref.get('edge_auc'))} |",
                  f"| nodes (max |score| of incident edges) | {_fmt(ref.get('node_auc'))} |", ""]
    search = md.get("path_patching")
    if search:
        lines += ["## Path-patching levels", "",
                  f"Senders selected where |effect| > {_fmt(search.get('threshold_abs'))} "
                  f"{md.get('metric_unit', '')} (effect: metric change when the sender is "
                  "corrupted only along its direct paths into the level's receivers).", "",
                  "| level | receivers | selected senders (effect) |", "| ---: | --- | --- |"]
        for i, level in enumerate(search.get("levels", [])):
            receivers = ", ".join(f"`{r}`" for r in level["receivers"])
            senders = ", ".join(f"`{s}` ({v:+.4f})" for s, v in level["senders"].items())
            lines.append(f"| {i} | {receivers} | {senders or 'none'} |")
        lines.append("")
    if circuit.scores is not None and circuit.n_edges:
        scores = circuit.edge_scores()
        top = sorted(scores.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:25]
        lines += ["## Top edges by |score|", "",
                  f"Score: {score_meaning(md).describe()}", "", "| edge | score |",
                  "| --- | ---: |"]
        lines += [f"| `{name}` | {value:+.5f} |" for name, value in top]
        lines.append("")
    lines += ["Files: `circuit.json` (lossless, all edge scores), `circuit.graphml`, "
              "`circuit.svg` and its Graphviz source `circuit.dot` (redraw with `circuitfind "
              "render circuit.json OUT.pdf`).", ""]
    return "\n".join(lines)


def ablation_kind(metadata: dict[str, Any]) -> str:
    """The ablation a circuit was found with (``resample`` for circuits that predate the field)."""
    value = metadata.get("ablation") or DEFAULT_ABLATION
    return str(value.get("kind", DEFAULT_ABLATION) if isinstance(value, dict) else value)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "undefined (m(M) = m(∅))" if math.isnan(value) else f"{value:.4f}"
    return str(value)
