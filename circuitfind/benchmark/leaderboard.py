"""Leaderboard tables and faithfulness-curve figures from benchmark grids.

Reads the completed cells of every benchmark study in an Optuna storage (or the studies
named), groups them into one row per algorithm variant per (task, model, examples, ablation),
aggregates over seeds and writes:

- ``leaderboard.md``: one table per task/model, with the convention stated above the tables
  and, under each table, what each algorithm's scores are (metric changes or importances,
  :mod:`circuitfind.graphs.scores`: the curve's signed ranking read them so);
- ``leaderboard.csv`` and ``leaderboard.json``: the same rows, flat (JSON also carries the
  mean faithfulness curves and the convention's label);
- ``faithfulness_cpr.png`` / ``.pdf``: one panel per task/model, one line per algorithm: the
  mean over seeds of the normalized faithfulness of the top-k circuits under the ranking CPR
  integrates (MIB: signed), with a band of ± one standard deviation, edge fraction on a log
  x axis; ``faithfulness_cmd.png`` / ``.pdf``: the same under the ranking CMD integrates
  (MIB: |score|).

Aggregates: mean and sample standard deviation (``ddof = 1``; ``None`` with one seed) over
the seeds of a row. Unset values (no reference circuit, so no AUROC; NaN faithfulness) are
left out of a mean and shown as ``—``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from circuitfind._files import atomic_write
from circuitfind.benchmark.grid import STUDY_MARKER, iter_records
from circuitfind.benchmark.intervals import (curve_intervals, format_rank, ranks_with_ties,
                                             seed_interval)
from circuitfind.benchmark.storage import open_storage, optuna_module
from circuitfind.errors import ConfigError
from circuitfind.evaluation.faithfulness import ABOVE_ONE
from circuitfind.graphs.scores import ScoreMeaning, score_meaning

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.typing import LineStyleType

SORT_KEYS: dict[str, tuple[str, bool]] = {
    "cpr": ("cpr_mean", True), "cmd": ("cmd_mean", False),
    "auroc": ("edge_auc_mean", True), "time": ("wall_time_s_mean", False),
    "cost": ("score_forwards_mean", False)}
"""``--sort`` choices: the column and whether larger is better (sorted first)."""

METRICS = ("cpr", "cmd", "edge_auc", "node_auc", "wall_time_s", "score_time_s",
           "score_forwards", "peak_memory_bytes")
"""Record fields aggregated over seeds (``{name}_mean``, ``{name}_std`` in every row)."""

INTERVALS = ("cpr", "cmd", "edge_auc", "node_auc", "score_forwards", "wall_time_s")
"""Fields with a 95% bootstrap interval in every row (``{name}_ci``: ``[low, high]`` or
``None``; :mod:`circuitfind.benchmark.intervals`): CPR and CMD resample seeds and examples,
the others seeds."""

def _rank_key(sort: str) -> tuple[str, bool]:
    """The interval a ``--sort`` key ranks by (its :data:`SORT_KEYS` column without
    ``_mean``: ``cpr``, ``cmd``, ``edge_auc``, ``wall_time_s``, ``score_forwards``) and whether
    larger is better."""
    column, larger = SORT_KEYS[sort]
    return column.removesuffix("_mean"), larger

GROUP = ("task", "model", "n_examples", "ablation")


@dataclasses.dataclass(frozen=True)
class LeaderboardFiles:
    """What :func:`leaderboard` wrote.

    Attributes:
        rows: The aggregated rows (as in ``leaderboard.json``).
        written: Paths of the files written, tables first.
    """

    rows: tuple[dict[str, Any], ...]
    written: tuple[Path, ...]


def load_records(storage: str, studies: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The completed cells of benchmark studies in ``storage``.

    Args:
        storage: Optuna storage URL.
        studies: Study names (default: every study :func:`~circuitfind.benchmark.grid.bench`
            made in the storage).

    Returns:
        One record per completed cell (see :func:`~circuitfind.benchmark.grid.iter_records`).

    Raises:
        ConfigError: a storage that cannot be opened; a named study that does not exist or is
            not a benchmark grid; no benchmark study at all; studies whose faithfulness curves
            used different conventions or fractions (they cannot share a table).
    """
    optuna = optuna_module()
    store = open_storage(storage)
    names = optuna.study.get_all_study_names(store)
    if studies:
        missing = [s for s in studies if s not in names]
        if missing:
            raise ConfigError(f"No study {', '.join(map(repr, missing))} in {storage!r}; it holds "
                              f"{', '.join(map(repr, names)) or 'no study'}.")
    loaded = [optuna.load_study(study_name=n, storage=store) for n in (studies or names)]
    bench = [s for s in loaded if STUDY_MARKER in s.user_attrs]
    if studies and len(bench) < len(loaded):
        other = sorted(set(studies) - {s.study_name for s in bench})
        raise ConfigError(f"The study {', '.join(map(repr, other))} is not a benchmark grid "
                          "(made by circuitfind bench).")
    if not bench:
        raise ConfigError(f"{storage!r} holds no benchmark study; run `circuitfind bench CONFIG "
                          f"--storage {storage}` first.")
    curves = {json.dumps({k: s.user_attrs[STUDY_MARKER][k] for k in ("convention", "fractions")})
              for s in bench}
    if len(curves) > 1:
        raise ConfigError(f"The studies used different faithfulness curves ({sorted(curves)}); "
                          "pick studies of one convention with --study.")
    return [r for s in bench for r in iter_records(s)]


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean_std(values: Iterable[Any]) -> tuple[float | None, float | None]:
    xs = [v for v in map(_number, values) if v is not None]
    if not xs:
        return None, None
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else None)


def aggregate(records: Sequence[dict[str, Any]], sort: str = "cpr") -> list[dict[str, Any]]:
    """One row per algorithm variant per (task, model, examples, ablation), over seeds.

    Args:
        records: Cell records (:func:`load_records`).
        sort: ``cpr`` (descending), ``cmd`` (ascending), ``auroc`` (edge AUROC, descending),
            ``time`` (wall time, ascending) or ``cost`` (the algorithm's cost in plain forwards,
            ascending): the order of rows within each task/model, and what ranks them; groups
            are in (task, model) order. Unset values sort last.

    Returns:
        Rows with ``task``, ``model``, ``n_examples``, ``ablation``, ``algorithm`` (the
        variant's label), ``seeds``, ``n_seeds``, ``n_edges`` (the graph's), ``{metric}_mean``
        and ``{metric}_std`` for each of :data:`METRICS`, the pruning algorithms' circuit
        size (``circuit_edges_mean``), ``convention`` and ``convention_label``, and the mean
        curves (``fractions``, ``faithfulness_mean``, ``faithfulness_std``,
        ``faithfulness_cmd_mean``, ``faithfulness_cmd_std``), and what the algorithm's scores
        mean (``scores``: :meth:`ScoreMeaning.to_dict`; ``score_kind``, ``score_unit``), which
        is how the curve's signed ranking read them (:func:`record_score_meaning`); the 95%
        bootstrap intervals ``{name}_ci`` of :data:`INTERVALS` and ``ci_source``; ``rank`` and
        ``tied`` within the row's table, by the sort key's interval (:func:`_rank_key`, ties
        where intervals overlap: :func:`~circuitfind.benchmark.intervals.ranks_with_ties`).

    Raises:
        ConfigError: an unknown ``sort``.
    """
    if sort not in SORT_KEYS:
        raise ConfigError(f"Unknown sort key {sort!r}; choose one of {list(SORT_KEYS)}.")
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((*(r[k] for k in GROUP), r["label"]), []).append(r)
    rows = []
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        row: dict[str, Any] = dict(zip(GROUP, key[:-1]))
        row.update(algorithm=key[-1], seeds=[r["seed"] for r in rs], n_seeds=len(rs),
                   n_edges=rs[0]["n_edges"], n_nodes=rs[0]["n_nodes"],
                   convention=rs[0]["convention"], convention_label=rs[0]["convention_label"],
                   metric=rs[0].get("metric"), metric_unit=rs[0].get("metric_unit"))
        meaning = record_score_meaning(rs[0])
        row.update(scores=meaning.to_dict(), score_kind=meaning.kind, score_unit=meaning.unit)
        for name in METRICS:
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(r.get(name) for r in rs)
        row["circuit_edges_mean"], row["circuit_edges_std"] = _mean_std(
            (r.get("circuit") or {}).get("n_edges") for r in rs)
        row["fractions"] = rs[0]["curve"]["fractions"]
        for curve in ("faithfulness", "faithfulness_cmd"):
            stats = [_mean_std(r["curve"][curve][i] for r in rs)
                     for i in range(len(row["fractions"]))]
            row[f"{curve}_mean"] = [m for m, _ in stats]
            row[f"{curve}_std"] = [s for _, s in stats]
        row.update(_intervals(rs, row["fractions"]))
        rows.append(row)
    column, larger_first = SORT_KEYS[sort]

    def order(row: dict[str, Any]) -> tuple[Any, ...]:
        value = row[column]
        rank = (1, 0.0) if value is None else (0, -value if larger_first else value)
        return (str(row["task"]), str(row["model"]), row["n_examples"], row["ablation"], *rank,
                row["algorithm"])

    rows.sort(key=order)
    _rank(rows, sort)
    return rows


def _intervals(records: Sequence[dict[str, Any]], fractions: Sequence[float]
               ) -> dict[str, Any]:
    """``{name}_ci`` for :data:`INTERVALS` and ``ci_source`` (what CPR/CMD's intervals
    resampled) of one row's records."""
    out: dict[str, Any] = {f"{name}_ci": seed_interval([r.get(name) for r in records])
                           for name in INTERVALS}
    examples = [r["curve"].get("example_metrics") for r in records]
    if all(e is not None for e in examples):
        out.update({f"{k}_ci": v for k, v in curve_intervals(examples, fractions).items()})
        out["ci_source"] = "seeds and examples"
    else:  # cells recorded before the grid kept per-example metrics
        out["ci_source"] = "seeds"
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


def _rank(rows: list[dict[str, Any]], sort: str) -> None:
    """Set ``rank`` and ``tied`` of every row within its table (:data:`GROUP`), by the
    interval of the sort key (:func:`~circuitfind.benchmark.intervals.ranks_with_ties`)."""
    name, larger = _rank_key(sort)
    for rs in _sections(rows).values():
        for row, rank in zip(rs, ranks_with_ties([r[f"{name}_ci"] for r in rs], larger)):
            row["rank"], row["tied"] = (None, None) if rank is None else rank


def record_score_meaning(record: dict[str, Any]) -> ScoreMeaning:
    """What a bench cell's scores mean (ACDC's KL effects: importances; the others' metric
    changes).

    Args:
        record: A cell record (:func:`load_records`): its ``scores`` entry where the grid wrote
            one, else inferred from its ``algorithm``, ``params`` and ``metric`` as for a
            circuit saved before circuits declared it
            (:func:`~circuitfind.graphs.scores.score_meaning`).

    Returns:
        The :class:`~circuitfind.graphs.scores.ScoreMeaning`.
    """
    return score_meaning({"scores": record.get("scores"), "algorithm": record.get("algorithm"),
                          "algorithm_params": record.get("params"),
                          "metric": record.get("metric"),
                          "metric_unit": record.get("metric_unit")})


def _scores_line(rows: Sequence[dict[str, Any]]) -> str:
    """One line saying what each algorithm's scores are, algorithms with the same meaning
    together."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        text = ScoreMeaning.from_dict(r["scores"]).describe()
        groups.setdefault(text, []).append(f"**{r['algorithm']}**")
    return "Scores (the signed ranking puts each algorithm's most important edges first, as "\
        "its scores say): " + " ".join(f"{', '.join(names)}: {text}"
                                       for text, names in groups.items())


def _fmt(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _fmt_ci(mean: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    """``0.812 [0.790, 0.835]``: the mean over seeds and its 95% interval."""
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + ("" if ci is None else
                                   f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]")


def _sections(rows: Sequence[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in GROUP), []).append(row)
    return out


def _rank_of(row: dict[str, Any]) -> str:
    return format_rank(None if row.get("rank") is None else (row["rank"], bool(row["tied"])))


def rank_table(rows: Sequence[dict[str, Any]], sort: str = "cpr") -> list[str]:
    """Markdown lines of the summary table: one row per algorithm, one column per table
    (task on model), each cell the algorithm's rank there (``2=``: tied), and the mean rank.

    Args:
        rows: Rows from :func:`aggregate` (their ``rank`` and ``tied``).
        sort: The key the ranks were computed by (named in the caption).

    Returns:
        The lines (empty without rows).
    """
    sections = _sections(rows)
    if not sections:
        return []
    algorithms = sorted({r["algorithm"] for r in rows})
    by = {(key, r["algorithm"]): r for key, rs in sections.items() for r in rs}
    mean_rank = {}
    for a in algorithms:
        ranks = [by[(k, a)]["rank"] for k in sections if (k, a) in by
                 and by[(k, a)].get("rank") is not None]
        mean_rank[a] = sum(ranks) / len(ranks) if ranks else math.inf
    heads = [f"{task} / {model}" for task, model, *_ in sections]
    lines = [f"Rank by {_rank_key(sort)[0]} in each table (1 = best; `=` marks a tie: the 95% "
             "intervals of tied rows overlap those of the same better rows; — not ranked). "
             "Mean rank over the tables where the algorithm has one.", "",
             "| algorithm | " + " | ".join(heads) + " | mean rank |",
             "| --- | " + " | ".join("---:" for _ in heads) + " | ---: |"]
    for a in sorted(algorithms, key=lambda a: (mean_rank[a], a)):
        cells = [_rank_of(by[(k, a)]) if (k, a) in by else "" for k in sections]
        mr = "—" if math.isinf(mean_rank[a]) else f"{mean_rank[a]:.2f}"
        lines.append(f"| {a} | " + " | ".join(cells) + f" | {mr} |")
    return lines


def markdown(rows: Sequence[dict[str, Any]], sort: str = "cpr") -> str:
    """The Markdown leaderboard: a header stating the convention, the rank table, one table
    per task/model.

    Args:
        rows: Rows from :func:`aggregate`.
        sort: The sort key the rows were ordered and ranked by (named in the header).

    Returns:
        The Markdown text.
    """
    label, convention = (rows[0]["convention_label"], rows[0]["convention"]) if rows else ("", "")
    sources = sorted({r.get("ci_source", "seeds") for r in rows})
    lines = [
        "# circuitfind leaderboard", "",
        f"Faithfulness curves: {label} (`convention=\"{convention}\"`).",
        "**CPR** = area under the normalized faithfulness f = (m(C) − m(∅)) / (m(M) − m(∅)) "
        "over the edge fraction (higher is better); **CMD** = area under |1 − f| (lower is "
        "better). **AUROC**: ROC AUC of the edge (node) scores against the task's reference "
        "circuit (— where the task has none for the model). **cost**: the algorithm's run "
        "time in plain Hugging Face forwards of the cell's clean batch (measured in the cell, "
        "so comparable across machines). **time**: wall time of a cell (data, algorithm, "
        "curve, AUROC), seconds; **memory**: peak resident memory of the worker process "
        "during the cell (model included; freed heap returned to the system before each "
        "cell), MiB. **circuit edges**: the size of the circuit a pruning algorithm selected "
        "itself (— for attribution algorithms, whose scores only rank edges). "
        f"A CPR (or a curve point) above 1: {ABOVE_ONE}", "",
        "Each number is the mean over seeds with its 95% bootstrap confidence interval in "
        "brackets (CPR and CMD resample the seeds, then each seed's examples, recomputing the "
        "curve" + ("" if sources == ["seeds and examples"] else
                   " — rows recorded without per-example metrics resample seeds only")
        + "; the other columns resample seeds; no interval from one seed alone). See "
        "`circuitfind.benchmark.intervals`.", "",
        f"Rows sorted by {sort} within each task/model.", "", *rank_table(rows, sort),
    ]
    for (task, model, n, ablation), rs in _sections(rows).items():
        lines += ["", f"## {task} on {model}", "",
                  f"{n} examples, {ablation} ablation, {rs[0]['n_edges']} edges, "
                  f"{rs[0]['n_nodes']} nodes; metric: {rs[0]['metric']} "
                  f"({rs[0]['metric_unit']}).", "",
                  "| rank | algorithm | CPR ↑ | CMD ↓ | edge AUROC ↑ | node AUROC ↑ "
                  "| cost (forwards) ↓ | time (s) | memory (MiB) | circuit edges | seeds |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rs:
            mem = r["peak_memory_bytes_mean"]
            lines.append(
                f"| {_rank_of(r)} | {r['algorithm']} | {_fmt_ci(r['cpr_mean'], r['cpr_ci'])} "
                f"| {_fmt_ci(r['cmd_mean'], r['cmd_ci'])} "
                f"| {_fmt_ci(r['edge_auc_mean'], r['edge_auc_ci'])} "
                f"| {_fmt_ci(r['node_auc_mean'], r['node_auc_ci'])} "
                f"| {_fmt_ci(r['score_forwards_mean'], r['score_forwards_ci'], 1)} "
                f"| {_fmt(r['wall_time_s_mean'], None, 2)} "
                f"| {'—' if mem is None else f'{mem / 2**20:.0f}'} "
                f"| {_fmt(r['circuit_edges_mean'], None, 1)} "
                f"| {', '.join(map(str, r['seeds']))} |")
        lines += ["", _scores_line(rs)]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("task", "model", "n_examples", "ablation", "algorithm", "rank", "tied",
               "n_seeds", "seeds", "n_edges", "n_nodes",
               *(f"{m}_{s}" for m in METRICS for s in ("mean", "std")),
               *(f"{m}_ci_{end}" for m in INTERVALS for end in ("low", "high")), "ci_source",
               "circuit_edges_mean", "circuit_edges_std", "convention", "score_kind",
               "score_unit")


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as CSV (one line per row, :data:`CSV_COLUMNS`; seeds joined by spaces)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        flat = dict(r)
        for m in INTERVALS:
            flat[f"{m}_ci_low"], flat[f"{m}_ci_high"] = r.get(f"{m}_ci") or (None, None)
        writer.writerow(["" if flat.get(c) is None else (
            " ".join(map(str, flat[c])) if c == "seeds" else flat[c]) for c in CSV_COLUMNS])
    return buffer.getvalue()


def plot_curves(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str],
                which: str = "faithfulness") -> Path:
    """Draw the mean faithfulness curves: one panel per task/model, one line per algorithm.

    Args:
        rows: Rows from :func:`aggregate`.
        path: Output file (``.png`` at 200 dpi, ``.pdf``, ``.svg``).
        which: ``"faithfulness"`` (the ranking CPR integrates) or ``"faithfulness_cmd"`` (the
            ranking CMD integrates).

    Returns:
        The path written.

    Raises:
        ConfigError: no rows, or an unknown ``which``.
    """
    if not rows:
        raise ConfigError("No completed cells to plot.")
    if which not in ("faithfulness", "faithfulness_cmd"):
        raise ConfigError(f"which must be 'faithfulness' or 'faithfulness_cmd'; got {which!r}.")
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    from circuitfind.graphs.render import MPL_METADATA, MPL_RC, model_display_name

    sections = _sections(rows)
    labels = sorted({r["algorithm"] for r in rows})
    style = algorithm_styles(labels)
    ncols = min(3, len(sections))
    nrows = math.ceil(len(sections) / ncols)
    path = Path(path)
    with matplotlib.rc_context(MPL_RC):
        fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows + 0.7 + 0.22 * math.ceil(len(labels) / 3)))
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax, ((task, model, n, ablation), rs) in zip(axes.flat, sections.items()):
            for r in rs:
                colour, marker, line = style[r["algorithm"]]
                x = np.asarray(r["fractions"]) * 100
                mean = np.array([np.nan if v is None else v for v in r[f"{which}_mean"]])
                std = np.array([np.nan if v is None else v for v in r[f"{which}_std"]])
                ax.plot(x, mean, line, color=colour, marker=marker, markersize=3.5,
                        linewidth=1.4, label=r["algorithm"])
                if np.isfinite(std).any():
                    ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15,
                                    linewidth=0)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle=":")
            ax.axhline(0.0, color="0.6", linewidth=0.8, linestyle=":")
            ax.set_title(f"{task} on {model_display_name(model)}\n({n} examples, "
                         f"{rs[0]['n_edges']} edges, {ablation})", fontsize=9)
            ax.set_xlabel("edges kept (% of all edges, log scale)", fontsize=8)
            ax.set_ylabel("normalized faithfulness", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="major", color="0.9", linewidth=0.6)
        for ax in list(axes.flat)[len(sections):]:
            ax.set_visible(False)
        conv = rows[0]["convention"]
        ranking = {("mib", "faithfulness"): "signed ranking (the curve CPR integrates)",
                   ("mib", "faithfulness_cmd"): "|score| ranking (the curve CMD integrates)"}
        fig.suptitle(f"Faithfulness of top-k circuits, {conv.upper() if conv == 'mib' else conv}"
                     f" convention: " + ranking.get((conv, which), "single ranking")
                     + "; mean ± std over seeds", fontsize=10)
        handles = [Line2D([], [], color=style[lab][0], marker=style[lab][1],
                          linestyle=style[lab][2], label=lab) for lab in labels]
        fig.legend(handles=handles, loc="lower center", ncol=min(3, len(labels)), fontsize=8,
                   frameon=False)
        legend_h = (0.15 + 0.22 * math.ceil(len(labels) / 3)) / fig.get_figheight()
        fig.tight_layout(rect=(0, legend_h, 1, 0.96))
        fmt = path.suffix.lstrip(".").lower()
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=200, metadata=MPL_METADATA.get(fmt))
    return atomic_write(path, buffer.getvalue())  # several workers may write the same board


ALGORITHM_COLOURS = {"eap": "blue", "eap_ig": "orange", "exact": "bluish_green",
                     "acdc": "vermillion", "clean_corrupted": "reddish_purple",
                     "path_patching": "sky_blue"}
"""The Okabe-Ito colour of each built-in algorithm in every leaderboard figure."""
_SPARE_COLOURS = ("black", "yellow")


def algorithm_styles(labels: Sequence[str]) -> dict[str, tuple[str, str, LineStyleType]]:
    """``(colour, marker, line style)`` of each algorithm label (``eap_ig(steps=10)``).

    The colour belongs to the algorithm (:data:`ALGORITHM_COLOURS`; other algorithms get one
    of the spare colours by a stable hash of their name), so it is the same in every figure;
    variants of one algorithm (hyperparameters) share it and differ in marker and line style.
    """
    import zlib

    from circuitfind.graphs.render import OKABE_ITO

    markers = "osD^vP*X"
    lines: tuple[LineStyleType, ...] = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    out: dict[str, tuple[str, str, LineStyleType]] = {}
    for label in sorted(labels):
        base = label.split("(")[0]
        name = ALGORITHM_COLOURS.get(base) or _SPARE_COLOURS[
            zlib.crc32(base.encode()) % len(_SPARE_COLOURS)]
        i = seen.get(base, 0)
        seen[base] = i + 1
        out[label] = (OKABE_ITO[name], markers[i % len(markers)], lines[i % len(lines)])
    return out


def write_leaderboard(rows: Sequence[dict[str, Any]], out: str | os.PathLike[str],
                      sort: str = "cpr") -> tuple[Path, ...]:
    """Write ``leaderboard.{md,csv,json}`` and ``faithfulness_{cpr,cmd}.{png,pdf}`` to ``out``.

    Raises:
        ConfigError: no rows; ``out`` exists and is not a directory.
    """
    if not rows:
        raise ConfigError("No completed cells: nothing to put on a leaderboard.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; pass a directory.")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("leaderboard.md", markdown(rows, sort)), ("leaderboard.csv", to_csv(rows)),
                       ("leaderboard.json", json.dumps(
                           {"convention": rows[0]["convention"],
                            "convention_label": rows[0]["convention_label"], "sort": sort,
                            "rows": list(rows)}, indent=1) + "\n")):
        written.append(atomic_write(out / name, text.encode("utf-8")))
    for which, stem in (("faithfulness", "faithfulness_cpr"),
                        ("faithfulness_cmd", "faithfulness_cmd")):
        for suffix in (".png", ".pdf"):
            written.append(plot_curves(rows, out / f"{stem}{suffix}", which))
    return tuple(written)


def leaderboard(storage: str, out: str | os.PathLike[str], studies: Sequence[str] | None = None,
                sort: str = "cpr") -> LeaderboardFiles:
    """Tables and figures of the benchmark studies in ``storage``, written to ``out``.

    Args:
        storage: Optuna storage URL holding studies made by :func:`circuitfind.bench`.
        out: Output directory (created).
        studies: Study names (default: every benchmark study in the storage).
        sort: ``cpr``, ``cmd``, ``auroc`` or ``time`` (see :func:`aggregate`).

    Returns:
        :class:`LeaderboardFiles`.

    Raises:
        ConfigError: see :func:`load_records`, :func:`aggregate` and :func:`write_leaderboard`.
    """
    rows = aggregate(load_records(storage, studies), sort)
    return LeaderboardFiles(rows=tuple(rows), written=write_leaderboard(rows, out, sort))
