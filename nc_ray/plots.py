"""Figures of a sweep: heatmaps and the phase map over two config axes, and the paper's relations.

Every function returns a `matplotlib.figure.Figure` built without pyplot (no global state, the Agg
canvas renders it); `png_bytes` and `render_pngs` (several figures on several cores) render it. Grids come from `nc_ray.analysis.aggregate`
tables: one cell per (x, y); x is drawn on a log axis with the actual values as tick labels when it
is positive and spans at least a decade, y as categories. Cells without a complete member are
hatched grey; cells where some members are not complete (diverged, failed or unfinished) carry a
red hatch and "complete/total". The phase map's forecast boundary is lam_crit(depth - m) of
`nc_ray.theory`, labelled "reconstructed".
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.collections import LineCollection
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from nc_ray.analysis import (
    METADATA_KEY, PHASES, ForecastSetup, aggregate, certificate_counts, class_counts, complete_rows, forecast_comparison,
)
from nc_ray.query import Sweep

PHASE_COLORS = {
    "trivial": "#bdbdbd", "collapsed_low_rank": "#2c7bb6", "collapsed": "#abd9e9", "low_rank": "#d7191c", "not_collapsed": "#fdae61",
}
AXIS_LABELS = {"weight_decay": "weight decay λ", "depth": "depth L", "width": "width", "lr": "learning rate"}
MAX_ANNOTATED_CELLS = 400
MAX_POINTS = 20_000  # scatter plots sample this many rows at most


def _figure(width: float, height: float, *, left: float = 1.0, right: float = 0.3, bottom: float = 0.8, top: float = 0.55,
            wspace: float = 0.35, hspace: float = 0.55) -> Figure:
    """A figure of width x height inches with fixed margins (inches) and gaps (fractions of an axes).

    Fixed margins, not matplotlib's constrained layout: that layout costs two thirds of a figure's
    rendering time, and `nc-ray phase` draws a dozen figures.
    """
    figure = Figure(figsize=(width, height))
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                           wspace=wspace, hspace=hspace)
    return figure


def _side_colorbar(figure: Figure, mappable: ScalarMappable, label: str) -> None:
    """A colorbar in the right margin that `_figure(..., right=1.4)` keeps free."""
    width, _ = figure.get_size_inches()
    figure.colorbar(mappable, cax=figure.add_axes((1 - 1.05 / width, 0.2, 0.15 / width, 0.6)), label=label)


# Figures in the process being forked, read by the children (`render_pngs`): no pickling of them.
_TO_RENDER: list[Figure] = []


def _render(index: int) -> bytes:
    return png_bytes(_TO_RENDER[index])


def render_pngs(figures: Mapping[str, Figure], processes: int | None = None) -> dict[str, bytes]:
    """PNG bytes of each figure. Rendering is most of `nc-ray phase`'s and `report`'s time and
    holds the GIL, so several figures are rendered by forked processes, one per core (default),
    which inherit the figures instead of receiving them pickled.

    One at a time where fork is missing, and in a process with other Python threads (a Ray
    driver's, say): a forked child gets a copy of every lock those threads held at that moment,
    never released in the child, and can block on one for ever (one did, in CI: its parent waited
    in `Pool.terminate` because Ray's SIGTERM handler, inherited, never ran in the blocked child)."""
    global _TO_RENDER
    processes = min(processes or os.cpu_count() or 1, len(figures))
    if processes < 2 or threading.active_count() > 1 or "fork" not in multiprocessing.get_all_start_methods():
        return {name: png_bytes(figure) for name, figure in figures.items()}
    _TO_RENDER = list(figures.values())
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            return dict(zip(figures, pool.map(_render, range(len(_TO_RENDER)), chunksize=1)))
    finally:
        _TO_RENDER = []


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _label(name: str) -> str:
    return AXIS_LABELS.get(name, name.replace("_", " "))


def _column(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table[name].to_pylist(), dtype=object)


def _tick(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _is_log(values: Sequence) -> bool:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return numeric and min(values) > 0 and max(values) / min(values) >= 10


class _Grid:
    """The cells of an aggregate table laid out on (x, y) axes: positions, cell edges, values."""

    def __init__(self, table: pa.Table, x: str, y: str):
        xs_all, ys_all = _column(table, x), _column(table, y)
        self.x, self.y = x, y
        self.xs = sorted({v for v in xs_all if v is not None})
        self.ys = sorted({v for v in ys_all if v is not None})
        self.log_x = _is_log(self.xs)
        self.x_pos = np.log10(np.asarray(self.xs, dtype=float)) if self.log_x else np.arange(len(self.xs), dtype=float)
        self.x_edges = _edges(self.x_pos)
        self.y_edges = np.arange(len(self.ys) + 1) - 0.5
        row = {v: i for i, v in enumerate(self.ys)}
        col = {v: j for j, v in enumerate(self.xs)}
        self.cells = [(row[b], col[a], k) for k, (a, b) in enumerate(zip(xs_all, ys_all)) if a is not None and b is not None]
        # Member counts where the table has them (aggregate tables): cells with members not complete get marked.
        counted = "n_complete" in table.column_names
        self.complete = _column(table, "n_complete") if counted else None
        self.total = sum(_column(table, c) for c in ("n_complete", "n_diverged", "n_failed", "n_unfinished")) if counted else None

    def values(self, column: np.ndarray) -> np.ndarray:
        """(len(ys), len(xs)) float array of a column, NaN where no cell or no value."""
        out = np.full((len(self.ys), len(self.xs)), np.nan)
        for i, j, k in self.cells:
            out[i, j] = np.nan if column[k] is None else float(column[k])
        return out

    def x_position(self, value: float) -> float:
        return math.log10(value) if self.log_x else float(np.interp(value, self.xs, self.x_pos))

    def draw_axes(self, ax) -> None:
        ax.set_xticks(self.x_pos, [_tick(v) for v in self.xs], rotation=45, ha="right")
        ax.set_yticks(np.arange(len(self.ys)), [_tick(v) for v in self.ys])
        ax.set_xlim(self.x_edges[0], self.x_edges[-1])
        ax.set_ylim(self.y_edges[0], self.y_edges[-1])
        ax.set_xlabel(_label(self.x) + (" (log scale)" if self.log_x else ""))
        ax.set_ylabel(_label(self.y))

    def mark_cells(self, ax, has_value: np.ndarray) -> None:
        """Hatch cells without a value; mark and count cells with members that are not complete."""
        for i in range(len(self.ys)):
            for j in range(len(self.xs)):
                if not has_value[i, j]:
                    ax.add_patch(Rectangle((self.x_edges[j], self.y_edges[i]), self.x_edges[j + 1] - self.x_edges[j], 1,
                                           facecolor="#eeeeee", edgecolor="#999999", hatch="xx", lw=0))
        if self.complete is None:
            return
        for i, j, k in self.cells:
            if self.complete[k] < self.total[k]:
                ax.add_patch(Rectangle((self.x_edges[j], self.y_edges[i]), self.x_edges[j + 1] - self.x_edges[j], 1,
                                       fill=False, edgecolor="red", hatch="/", lw=1.5))
                ax.text(self.x_pos[j], i - 0.3, f"{self.complete[k]}/{self.total[k]} complete", ha="center", va="center", fontsize=6,
                        color="red", bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8})


def _edges(positions: np.ndarray) -> np.ndarray:
    if len(positions) == 1:
        return np.array([positions[0] - 0.5, positions[0] + 0.5])
    mid = (positions[1:] + positions[:-1]) / 2
    return np.concatenate([[2 * positions[0] - mid[0]], mid, [2 * positions[-1] - mid[-1]]])


def _norm(values: np.ndarray) -> Normalize:
    """Log scale when the finite values are positive and span more than two decades."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
        return LogNorm(finite.min(), finite.max())
    if finite.size == 0:
        return Normalize(0, 1)
    low, high = finite.min(), finite.max()
    return Normalize(low, high if high > low else low + 1)


def _draw_heatmap(figure: Figure, ax, grid: _Grid, values: np.ndarray, *, cmap: str, label: str) -> None:
    """Colored cells with their values written in, missing/incomplete cells marked, a colorbar."""
    norm = _norm(values)
    mesh = ax.pcolormesh(grid.x_edges, grid.y_edges, np.ma.masked_invalid(values), cmap=cmap, norm=norm)
    if values.size <= MAX_ANNOTATED_CELLS:
        for i, j, _ in grid.cells:
            if np.isfinite(values[i, j]):
                r, g, b, _a = mesh.cmap(norm(values[i, j]))
                ax.text(grid.x_pos[j], i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=7,
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    grid.mark_cells(ax, np.isfinite(values))
    grid.draw_axes(ax)
    figure.colorbar(mesh, ax=ax, label=label + (" (log scale)" if isinstance(norm, LogNorm) else ""))


def heatmap(table: pa.Table, column: str, *, x: str = "weight_decay", y: str = "depth", title: str | None = None) -> Figure:
    """A heatmap of `column` of an aggregate table over (x, y), with a colorbar and cell values."""
    grid = _Grid(table, x, y)
    figure = _figure(max(4.5, 1.6 + 0.62 * len(grid.xs)) + 1.0, max(2.8, 1.4 + 0.5 * len(grid.ys)) + 0.4, right=0.2)
    ax = figure.add_subplot()
    _draw_heatmap(figure, ax, grid, grid.values(_column(table, column)), cmap="viridis", label=column)
    ax.set_title(title or column)
    return figure


def phase_map(
    table: pa.Table, *, x: str = "weight_decay", y: str = "depth",
    boundary: Mapping[object, float] | None = None, boundary_label: str = "forecast λ_crit (reconstructed)", title: str | None = None,
) -> Figure:
    """The categorical phase of each cell of an `aggregate` table, its thresholds in the title; `boundary` (y value -> x value, e.g. depth -> lam_crit)
    is drawn as a step line over the rows, the x range widened to show it."""
    grid = _Grid(table, x, y)
    codes = {phase: index for index, phase in enumerate(PHASES)}
    values = grid.values(np.array([codes.get(p) for p in _column(table, "phase")], dtype=object))
    figure = _figure(max(4.5, 1.6 + 0.62 * len(grid.xs)) + 2.6, max(3.4, 1.4 + 0.5 * len(grid.ys)) + 0.6, right=2.9)
    ax = figure.add_subplot()
    cmap = ListedColormap([PHASE_COLORS[p] for p in PHASES])
    ax.pcolormesh(grid.x_edges, grid.y_edges, np.ma.masked_invalid(values), cmap=cmap, norm=BoundaryNorm(np.arange(len(PHASES) + 1) - 0.5, len(PHASES)))
    grid.mark_cells(ax, np.isfinite(values))
    grid.draw_axes(ax)
    handles = [Patch(facecolor=PHASE_COLORS[p], label=p) for p in PHASES] + [Patch(facecolor="#eeeeee", hatch="xx", label="no complete member")]
    if "rank_below_dnc" in table.column_names:
        # Not on trivial cells: the zero function has no rank to speak of.
        flags = zip(_column(table, "rank_below_dnc"), _column(table, "phase"))
        below = grid.values(np.array([1.0 if flag and phase != "trivial" else None for flag, phase in flags], dtype=object))
        for i, j, _ in grid.cells:
            if below[i, j] == 1.0:
                ax.text(grid.x_pos[j], i + 0.25, "<K−1", ha="center", va="center", fontsize=6, color="black")
        handles.append(Line2D([], [], linestyle="none", marker="$<$", color="black", label="hidden rank < K − 1"))
    marks = [(grid.x_position(b), i, b) for i, v in enumerate(grid.ys) if (b := (boundary or {}).get(v)) is not None and 0 < b < math.inf]
    if marks:
        xs = [p for p, _, _ in marks for _ in (0, 1)]
        ys = [e for _, i, _ in marks for e in (i - 0.5, i + 0.5)]
        ax.plot(xs, ys, color="black", lw=2.2, ls="--")
        for position, i, value in marks:
            ax.text(position, i, f" {value:.3g}", ha="left", va="center", fontsize=7)
        low, high = ax.get_xlim()
        ax.set_xlim(min(low, min(xs) - 0.15), max(high, max(xs) + 0.5))
        handles.append(Line2D([], [], color="black", lw=2.2, ls="--", label=boundary_label))
    t = json.loads(table.schema.metadata[METADATA_KEY])["thresholds"]
    rules = (f"thresholds (medians over seeds):\ntrivial: train_acc ≤ 1/K + {t['trivial_acc_margin']:g}\n   or median σ1 < {t['trivial_sv_max']:g}\n"
             f"DNC1: train_acc ≥ {t['collapsed_acc']:g} and\n   penultimate tcv_rel ≤ {t['collapsed_tcv_rel']:g}\n"
             f"low rank: hidden rank_rel_1e2 ≤ {t['low_rank_per_class']:g}·K\n"
             "collapsed_low_rank: both; collapsed:\n   DNC1 only; low_rank: low rank only")
    handles.append(Line2D([], [], linestyle="none", label=rules))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    ax.set_title(title or "phase per cell (final epoch, medians over seeds)")
    return figure


def bound_figure(sweep: Sweep) -> Figure:
    """dist_k against the certificates b0 (grey) and b0_perp (red) per layer, at the final epoch of
    complete members, log-log with y = x: every point sits on or left of the line, and a segment
    joins each row's two certificates, showing how much b0_perp tightens b0. Zero matrices (sv_max
    < 1e-10) and layers with at most K outputs (rank <= K by shape, dist_k = 0) are not drawn; the
    counts in the title are over every row of the sweep."""
    data = sweep.sql(
        f"""SELECT r.layer, r.dist_k, r.b0, r.b0_perp FROM {complete_rows("metrics")}
        WHERE r.b0 > 0 AND r.b0 < 'inf'::DOUBLE AND r.b0_perp IS NOT NULL AND r.sv_max >= 1e-10 AND r.dist_k > 0
        USING SAMPLE reservoir({MAX_POINTS} ROWS) REPEATABLE (0)"""
    )
    stats = certificate_counts(sweep) | sweep.sql(
        f"""SELECT median(r.bound_ratio) AS ratio, median(r.bound_perp_ratio) AS perp_ratio
        FROM {complete_rows("metrics")} WHERE r.layer < r.depth"""
    ).to_pylist()[0]
    layers = sorted(set(data["layer"].to_pylist())) or [1]
    columns = min(4, len(layers))
    rows = math.ceil(len(layers) / columns)
    figure = _figure(3.2 * columns + 0.6, 3.0 * rows + 0.9, top=0.9, wspace=0.45)
    layer_col, dist, b0, b0_perp = (np.asarray(data[c].to_pylist(), dtype=float) for c in ("layer", "dist_k", "b0", "b0_perp"))
    for index, layer in enumerate(layers):
        ax = figure.add_subplot(rows, columns, index + 1)
        here = layer_col == layer
        if here.any():
            ax.add_collection(LineCollection(np.stack([np.stack([b0_perp[here], dist[here]], 1), np.stack([b0[here], dist[here]], 1)], 1),
                                             colors="#dddddd", linewidths=0.6))
            ax.scatter(b0[here], dist[here], s=7, color="#888888", label="b0", zorder=2)
            ax.scatter(b0_perp[here], dist[here], s=7, color="#d7191c", label="b0_perp", zorder=3)
            low, high = min(dist[here].min(), b0_perp[here].min()), max(b0[here].max(), dist[here].max())
            ax.plot([low, high], [low, high], color="black", lw=1, label="y = x")
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(f"layer {int(layer)}", fontsize=9)
        ax.set_xlabel("certificate")
        ax.set_ylabel("dist_k")
        if index == 0:
            ax.legend(fontsize=7)

    def share(ok: int, n: int) -> str:
        return f"{ok / n:.4f} ({ok}/{n})" if n else "n/a"

    def median(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    figure.suptitle(
        f"dist_k ≤ b0_perp ≤ b0 on every row: bound_ok {share(stats['ok'], stats['n'])}, "
        f"bound_perp_ok {share(stats['perp_ok'], stats['perp_n'])}\n"
        f"final epoch, layers 1..L−1: median dist_k/b0 {median(stats['ratio'])}, dist_k/b0_perp {median(stats['perp_ratio'])}", fontsize=9)
    return figure


def _lines_over_decay(ax, table: pa.Table, column: str, group: str, *, quartiles: bool) -> None:
    """One line per value of `group` of `column` against weight_decay (median with IQR band)."""
    groups = _column(table, group)
    decay = np.asarray(table["weight_decay"].to_pylist(), dtype=float)
    for value in sorted({g for g in groups if g is not None}):
        here = groups == value
        order = np.argsort(decay[here])
        median = np.asarray(table[column].to_pylist(), dtype=float)[here][order]
        line, = ax.plot(decay[here][order], median, marker="o", ms=3, label=f"{group} {value}")
        if quartiles:
            q25 = np.asarray(table[column.replace("_median", "_q25")].to_pylist(), dtype=float)[here][order]
            q75 = np.asarray(table[column.replace("_median", "_q75")].to_pylist(), dtype=float)[here][order]
            ax.fill_between(decay[here][order], q25, q75, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("weight decay λ")


def rank_figure(sweep: Sweep) -> Figure:
    """dist_k_rel and rank_rel_1e2 of the hidden layers against λ, one line per depth (median over
    seeds, IQR band), K marked on the rank panel."""
    table = aggregate(sweep, metrics=("dist_k_rel", "rank_rel_1e2"), layers="hidden")
    figure = _figure(11, 4, wspace=0.25)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    _lines_over_decay(left, table, "dist_k_rel_median", "depth", quartiles=True)
    left.set_ylabel("dist_k_rel (hidden layers)")
    left.set_yscale("log")
    _lines_over_decay(right, table, "rank_rel_1e2_median", "depth", quartiles=True)
    classes = {k for k in table["n_classes"].to_pylist() if k is not None}
    for k in classes:
        right.axhline(k, color="black", ls=":", lw=1, label=f"K = {k}")
    right.set_ylabel("rank_rel_1e2 (hidden layers)")
    right.legend(fontsize=8)
    figure.suptitle("relative distance to rank K and relative rank of the hidden layers (final epoch, median over seeds)")
    return figure


def tcv_figure(sweep: Sweep) -> Figure:
    """tcv_rel of each layer's input against λ, one panel per depth, one line per layer."""
    table = sweep.sql(
        f"SELECT r.depth, r.layer, r.weight_decay, median(r.tcv_rel) AS tcv_rel FROM {complete_rows('metrics')} GROUP BY ALL ORDER BY ALL"
    )
    depths = sorted(set(table["depth"].to_pylist()))
    figure = _figure(3.4 * max(1, len(depths)) + 0.4, 3.6, wspace=0.4)
    for index, depth in enumerate(depths):
        ax = figure.add_subplot(1, len(depths), index + 1)
        _lines_over_decay(ax, table.filter(pc.equal(table["depth"], depth)), "tcv_rel", "layer", quartiles=False)
        ax.set_yscale("log")
        ax.set_title(f"depth {depth}", fontsize=9)
        ax.set_ylabel("tcv_rel of the layer's input")
        ax.legend(fontsize=6)
    figure.suptitle("within-class variability entering each layer (final epoch, median over seeds)")
    return figure


def _message_figure(text: str) -> Figure:
    """A small figure that says why there is nothing to draw."""
    figure = Figure(figsize=(6, 1.2))
    figure.text(0.5, 0.5, text, ha="center", va="center")
    return figure


def trajectory_figure(sweep: Sweep) -> Figure:
    """Metrics over training epochs, one line per λ (median over seeds of complete members), one
    column per depth: hidden-layer rank_rel_1e2 (K dotted), penultimate tcv_rel, and stationarity
    (max over layers: how far from a critical point, in units of the weight-decay force)."""
    table = sweep.sql(
        f"""WITH per_member AS (
            SELECT r.depth, r.weight_decay, r.epoch, r.member_id,
                median(r.rank_rel_1e2) FILTER (WHERE r.layer < r.depth AND (r.layer > 1 OR r.depth <= 2)) AS rank,
                any_value(r.tcv_rel) FILTER (WHERE r.layer = r.depth) AS tcv,
                max(r.stationarity) AS stationarity
            FROM {complete_rows("metrics", "all")} GROUP BY ALL)
        SELECT depth, weight_decay, epoch, median(rank) AS rank, median(tcv) AS tcv, median(stationarity) AS stationarity
        FROM per_member GROUP BY ALL ORDER BY depth, weight_decay, epoch"""
    )
    classes = sorted({k for _, _, k in class_counts(sweep)})
    depths = sorted(set(table["depth"].to_pylist()))
    panels = (("rank", "hidden rank_rel_1e2", False), ("tcv", "penultimate tcv_rel", True), ("stationarity", "stationarity (max over layers)", True))
    figure = _figure(3.4 * max(1, len(depths)) + 1.8, 2.6 * len(panels) + 0.5, right=1.4, wspace=0.5, hspace=0.6)
    decays = sorted(set(table["weight_decay"].to_pylist()))
    norm = LogNorm(min(decays), max(decays)) if decays and min(decays) > 0 and max(decays) > min(decays) else Normalize(0, 1)
    rows = table.to_pylist()
    for column, depth in enumerate(depths):
        for row_index, (name, label, log) in enumerate(panels):
            ax = figure.add_subplot(len(panels), len(depths), row_index * len(depths) + column + 1)
            for decay in decays:
                line = [(r["epoch"], r[name]) for r in rows if r["depth"] == depth and r["weight_decay"] == decay and r[name] is not None]
                if line:
                    ax.plot(*zip(*line), color=colormaps["plasma"](norm(decay)), lw=1.2)
            if name == "rank":
                for k in classes:
                    ax.axhline(k, color="black", ls=":", lw=1)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"depth {depth}", fontsize=9)
            ax.set_ylabel(label, fontsize=8)
            ax.set_xlabel("epoch", fontsize=8)
    _side_colorbar(figure, ScalarMappable(norm=norm, cmap="plasma"), "weight decay λ")
    figure.suptitle("training trajectories (median over seeds; K dotted on the rank panels)")
    return figure


def objective_table(sweep: Sweep) -> pa.Table:
    """Per complete member at its final epoch: its cell (depth, λ), `objective` F_λ and penultimate tcv_rel."""
    return sweep.sql(
        f"""SELECT r.depth, r.weight_decay, r.member_id, any_value(r.objective) AS objective,
            any_value(r.tcv_rel) FILTER (WHERE r.layer = r.depth) AS tcv_rel
        FROM {complete_rows("metrics")} WHERE r.objective IS NOT NULL GROUP BY ALL ORDER BY ALL"""
    )


def collapse_objective_concordance(table: pa.Table) -> tuple[int, int]:
    """Within each cell, over pairs of members: (pairs where the more collapsed member, lower
    penultimate tcv_rel, also has the lower objective F_λ; pairs compared). Ties are not counted."""
    cells: dict[tuple, list[tuple[float, float]]] = {}
    for r in table.to_pylist():
        if r["tcv_rel"] is not None and r["objective"] is not None:
            cells.setdefault((r["depth"], r["weight_decay"]), []).append((r["tcv_rel"], r["objective"]))
    agree = total = 0
    for members in cells.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                sign = (members[a][0] - members[b][0]) * (members[a][1] - members[b][1])
                if sign != 0:
                    total += 1
                    agree += sign > 0
    return agree, total


def objective_figure(sweep: Sweep) -> Figure:
    """Within each cell, the objective F_λ against penultimate tcv_rel across seeds (final epoch), one
    panel per depth: F relative to the cell's lowest member, seeds of a cell joined by a line.
    The paper's claim (DNC1 configurations are global optima) predicts that the more collapsed
    member of a cell has the lower objective."""
    table = objective_table(sweep)
    rows = table.to_pylist()
    depths = sorted({r["depth"] for r in rows})
    if not depths:
        return _message_figure("no objective values: rows written before version 2 do not have them")
    figure = _figure(3.4 * max(1, len(depths)) + 1.6, 3.6, right=1.4, left=0.9, wspace=0.45)
    decays = sorted({r["weight_decay"] for r in rows})
    norm = LogNorm(min(decays), max(decays)) if decays and min(decays) > 0 and max(decays) > min(decays) else Normalize(0, 1)
    for index, depth in enumerate(depths):
        ax = figure.add_subplot(1, len(depths), index + 1)
        for decay in decays:
            cell = sorted((r["tcv_rel"], r["objective"]) for r in rows if r["depth"] == depth and r["weight_decay"] == decay and r["tcv_rel"])
            if not cell:
                continue
            lowest = min(f for _, f in cell)
            points = [(t, (f - lowest) / abs(lowest) if lowest else 0.0) for t, f in cell]
            color = colormaps["plasma"](norm(decay))
            ax.plot(*zip(*points), color=color, lw=0.8, marker="o", ms=4)
        ax.set_xscale("log")
        ax.set_xlabel("penultimate tcv_rel")
        ax.set_ylabel("(F_λ − min over the cell) / min")
        ax.set_title(f"depth {depth}", fontsize=9)
    agree, total = collapse_objective_concordance(table)
    verdict = f"{agree} of {total} pairs" if total else "no pairs"
    _side_colorbar(figure, ScalarMappable(norm=norm, cmap="plasma"), "weight decay λ")
    figure.suptitle(f"objective against collapse within each cell: the more collapsed member has the lower F_λ in {verdict}", fontsize=9)
    return figure


def default_member(sweep: Sweep) -> str | None:
    """A complete member in the middle of the grid: the deepest depth, the middle weight decay, lowest seed."""
    rows = sweep.sql(
        """WITH c AS (SELECT * FROM members WHERE status = 'complete' AND depth = (SELECT max(depth) FROM members WHERE status = 'complete')),
        d AS (SELECT DISTINCT weight_decay FROM c ORDER BY weight_decay)
        SELECT member_id FROM c WHERE weight_decay = (SELECT weight_decay FROM d LIMIT 1 OFFSET (SELECT count(*) FROM d) // 2)
        ORDER BY seed LIMIT 1"""
    ).to_pylist()
    return rows[0]["member_id"] if rows else None


def spectra_figure(sweep: Sweep, member_id: str | None = None) -> Figure:
    """Singular values of every layer of one member (default: `default_member`) at each evaluation epoch."""
    member_id = member_id or default_member(sweep)
    table = sweep.spectra(["depth", "weight_decay", "seed", "epoch", "layer", "singular_values"], member_id=member_id)
    if table.num_rows == 0:
        raise ValueError(f"no spectra rows for member {member_id!r}")
    first = table.slice(0, 1).to_pylist()[0]
    layers = sorted(set(table["layer"].to_pylist()))
    epochs = sorted(set(table["epoch"].to_pylist()))
    columns = min(4, len(layers))
    rows = math.ceil(len(layers) / columns)
    figure = _figure(3.2 * columns + 1.4, 2.8 * rows + 0.6, right=1.4, wspace=0.45, hspace=0.6)
    norm = Normalize(min(epochs), max(max(epochs), min(epochs) + 1))
    records = table.to_pylist()
    for index, layer in enumerate(layers):
        ax = figure.add_subplot(rows, columns, index + 1)
        for record in sorted((r for r in records if r["layer"] == layer), key=lambda r: r["epoch"]):
            values = np.asarray(record["singular_values"], dtype=float)
            ax.plot(np.arange(1, values.size + 1), np.maximum(values, 1e-12), color=colormaps["viridis"](norm(record["epoch"])), lw=1)
        ax.set_yscale("log")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("index i")
        ax.set_ylabel("σ_i")
    _side_colorbar(figure, ScalarMappable(norm=norm, cmap="viridis"), "epoch")
    figure.suptitle(f"singular values over epochs: member {member_id} (depth {first['depth']}, λ = {first['weight_decay']:.3g}, seed {first['seed']})")
    return figure


def forecast_figure(comparison: pa.Table, setup: ForecastSetup) -> Figure:
    """The forecast against the middle layers, per depth over λ (medians over seeds, IQR bands):
    the measured size (mean of the significant σ_i > 0.1 σ_1) with the forecast s* dashed (left),
    the measured count of significant σ_i with the forecast k dotted (middle), and the relative
    error |size − s*| / s* per cell (right)."""
    figure = _figure(15, 4.4, wspace=0.3)
    size_ax, count_ax, error_ax = (figure.add_subplot(1, 3, i) for i in (1, 2, 3))
    depth = np.asarray(comparison["depth"].to_pylist())
    decay = np.asarray(comparison["weight_decay"].to_pylist(), dtype=float)
    column = {name: np.asarray(comparison[name].to_pylist(), dtype=float)
              for name in ("size", "size_q25", "size_q75", "count", "count_q25", "count_q75", "s_star")}
    for value in sorted(set(depth.tolist())):
        here = np.flatnonzero(depth == value)
        here = here[np.argsort(decay[here])]
        line, = size_ax.plot(decay[here], column["size"][here], marker="o", ms=3, label=f"depth {value}")
        size_ax.fill_between(decay[here], column["size_q25"][here], column["size_q75"][here], color=line.get_color(), alpha=0.2)
        size_ax.plot(decay[here], column["s_star"][here], color=line.get_color(), ls="--", lw=1)
        count_ax.plot(decay[here], column["count"][here], marker="o", ms=3, color=line.get_color(), label=f"depth {value}")
        count_ax.fill_between(decay[here], column["count_q25"][here], column["count_q75"][here], color=line.get_color(), alpha=0.2)
    k = comparison["k"][0].as_py() if comparison.num_rows else None
    if k is not None:
        count_ax.axhline(k, color="black", ls=":", lw=1.2, label=f"forecast k = {k}")
    for ax in (size_ax, count_ax):
        ax.set_xscale("log")
        ax.set_xlabel("weight decay λ")
        ax.legend(fontsize=7)
    size_ax.set_ylabel("mean significant σ (dashed: forecast s*)")
    size_ax.set_title(f"size: r = {setup.radius:.3g}, tail D = L − {setup.collapse_layer}", fontsize=9)
    count_ax.set_ylabel("number of σ_i > 0.1 σ_1")
    count_ax.set_title("count of significant singular values", fontsize=9)
    grid = _Grid(comparison, "weight_decay", "depth")
    _draw_heatmap(figure, error_ax, grid, grid.values(_column(comparison, "rel_error")), cmap="magma",
                  label="|size − s*| / s*  (hatched: s* = 0)")
    figure.suptitle(f"forecast ({setup.label}) against measurement: middle layers, final epoch, median over seeds")
    return figure


def standard_figures(
    sweep: Sweep, table: pa.Table, heatmaps: Mapping[str, tuple[str, str]], setup: ForecastSetup | None, member_id: str | None = None,
) -> dict[str, Figure]:
    """The phase map of an aggregate table (with the forecast boundary when its axes are
    weight_decay x depth and `setup` is given), its heatmaps (name -> (column, title)), and, when
    complete members have final-epoch rows, the relation plots: bound, rank, tcv, spectra and forecast.
    An empty table (no member yet) gives no figure."""
    if table.num_rows == 0:
        return {}
    info = json.loads(table.schema.metadata[METADATA_KEY])
    x, y = info["x"], info["y"]
    boundary = None
    if setup is not None and (x, y) == ("weight_decay", "depth"):
        boundary = setup.critical_weight_decay([d for d in table["depth"].to_pylist() if d is not None])
    label = f"forecast λ_crit(L − {setup.collapse_layer}) ({setup.label})" if setup else ""
    figures = {f"phase_map_{x}_{y}": phase_map(table, x=x, y=y, boundary=boundary, boundary_label=label)}
    for name, (column, title) in heatmaps.items():
        figures[f"heatmap_{name}"] = heatmap(table, column, x=x, y=y, title=title)
    final_rows = sweep.sql(f"SELECT count(*) AS n FROM {complete_rows('metrics')}")["n"][0].as_py()
    if final_rows:  # none when every final-epoch file is damaged or skipped: nothing to relate
        figures["relation_bound"] = bound_figure(sweep)
        figures["relation_trajectories"] = trajectory_figure(sweep)
        figures["relation_objective"] = objective_figure(sweep)
        figures["relation_rank"] = rank_figure(sweep)
        figures["relation_tcv"] = tcv_figure(sweep)
        figures["relation_spectra"] = spectra_figure(sweep, member_id)
        if setup is not None:
            comparison = forecast_comparison(sweep, setup)
            if comparison.num_rows:  # none when no complete member has a middle layer (depth 2 only)
                figures["relation_forecast"] = forecast_figure(comparison, setup)
    return figures
