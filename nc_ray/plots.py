"""Figures of a sweep: heatmaps and the phase map over two config axes, and the paper's relations.

Every function returns a `matplotlib.figure.Figure` built without pyplot (no global state, the Agg
canvas renders it); `save_png` / `png_bytes` write it. Grids come from `nc_ray.analysis.aggregate`
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
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from nc_ray.analysis import METADATA_KEY, PHASES, ForecastSetup, aggregate, forecast_comparison
from nc_ray.query import Sweep

PHASE_COLORS = {
    "trivial": "#bdbdbd", "collapsed_low_rank": "#2c7bb6", "collapsed": "#abd9e9", "low_rank": "#d7191c", "not_collapsed": "#fdae61",
}
AXIS_LABELS = {"weight_decay": "weight decay λ", "depth": "depth L", "width": "width", "lr": "learning rate"}
MAX_ANNOTATED_CELLS = 400
MAX_POINTS = 20_000  # scatter plots sample this many rows at most


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write `figure` as a PNG file (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(figure))
    return path


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
    figure = Figure(figsize=(max(4.5, 1.6 + 0.62 * len(grid.xs)), max(2.8, 1.4 + 0.5 * len(grid.ys))), layout="constrained")
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
    figure = Figure(figsize=(max(4.5, 1.6 + 0.62 * len(grid.xs)), max(3.4, 1.4 + 0.5 * len(grid.ys))), layout="constrained")
    ax = figure.add_subplot()
    cmap = ListedColormap([PHASE_COLORS[p] for p in PHASES])
    ax.pcolormesh(grid.x_edges, grid.y_edges, np.ma.masked_invalid(values), cmap=cmap, norm=BoundaryNorm(np.arange(len(PHASES) + 1) - 0.5, len(PHASES)))
    grid.mark_cells(ax, np.isfinite(values))
    grid.draw_axes(ax)
    handles = [Patch(facecolor=PHASE_COLORS[p], label=p) for p in PHASES] + [Patch(facecolor="#eeeeee", hatch="xx", label="no complete member")]
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
    rules = (f"thresholds (medians over seeds):\ntrivial: train_acc ≤ 1/K + {t['trivial_acc_margin']:g}\n   or σ1 ≤ {t['trivial_sv_max']:g}\n"
             f"collapsed_low_rank: train_acc ≥ {t['collapsed_acc']:g},\n   penultimate tcv_rel ≤ {t['collapsed_tcv_rel']:g},\n"
             f"   hidden rank_rel_1e2 ≤ {t['low_rank_per_class']:g}·K")
    handles.append(Line2D([], [], linestyle="none", label=rules))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
    ax.set_title(title or "phase per cell")
    return figure


def bound_figure(sweep: Sweep) -> Figure:
    """dist_k against the certificate b0 per layer, every evaluation row (log-log, y = x drawn):
    every point must sit on or under the line."""
    data = sweep.sql(
        f"SELECT layer, weight_decay, dist_k, b0 FROM metrics WHERE b0 > 0 USING SAMPLE reservoir({MAX_POINTS} ROWS) REPEATABLE (0)"
    )
    stats = sweep.sql("SELECT count(*) FILTER (WHERE bound_ok) AS ok, count(bound_ok) AS n FROM metrics").to_pylist()[0]
    layers = sorted(set(data["layer"].to_pylist()))
    columns = min(4, max(1, len(layers)))
    rows = max(1, math.ceil(len(layers) / columns))
    figure = Figure(figsize=(3.2 * columns, 3.0 * rows), layout="constrained")
    layer_col, decay, dist, b0 = (np.asarray(data[c].to_pylist(), dtype=float) for c in ("layer", "weight_decay", "dist_k", "b0"))
    positive = dist[dist > 0]
    floor = positive.min() / 2 if positive.size else 1e-12
    norm = LogNorm(decay.min(), decay.max()) if decay.size and decay.min() > 0 and decay.max() > decay.min() else None
    scatter = None
    for index, layer in enumerate(layers):
        ax = figure.add_subplot(rows, columns, index + 1)
        here = layer_col == layer
        scatter = ax.scatter(b0[here], np.maximum(dist[here], floor), c=decay[here], cmap="plasma", norm=norm, s=9)
        low = min(b0[here].min(), np.maximum(dist[here], floor).min())
        high = max(b0[here].max(), dist[here].max())
        ax.plot([low, high], [low, high], color="black", lw=1, label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"layer {int(layer)}", fontsize=9)
        ax.set_xlabel("b0 (certificate)")
        ax.set_ylabel("dist_k (zeros at the floor)")
    if scatter is not None:
        figure.colorbar(scatter, ax=figure.axes, label="weight decay λ", shrink=0.8)
    share = f"{stats['ok'] / stats['n']:.4f}" if stats["n"] else "n/a"
    figure.suptitle(f"dist_k ≤ b0 on every row: bound_ok fraction {share} ({stats['ok']}/{stats['n']} rows)")
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
    figure = Figure(figsize=(11, 4), layout="constrained")
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
        """SELECT m.depth, m.layer, m.weight_decay, median(m.tcv_rel) AS tcv_rel
        FROM metrics m JOIN members f ON m.sweep = f.sweep AND m.member_id = f.member_id
        WHERE f.status = 'complete' AND m.epoch = f.final_epoch GROUP BY ALL ORDER BY ALL"""
    )
    depths = sorted(set(table["depth"].to_pylist()))
    figure = Figure(figsize=(3.4 * max(1, len(depths)), 3.4), layout="constrained")
    for index, depth in enumerate(depths):
        ax = figure.add_subplot(1, len(depths), index + 1)
        _lines_over_decay(ax, table.filter(pc.equal(table["depth"], depth)), "tcv_rel", "layer", quartiles=False)
        ax.set_yscale("log")
        ax.set_title(f"depth {depth}", fontsize=9)
        ax.set_ylabel("tcv_rel of the layer's input")
        ax.legend(fontsize=6)
    figure.suptitle("within-class variability entering each layer (final epoch, median over seeds)")
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
    figure = Figure(figsize=(3.2 * columns, 2.8 * rows), layout="constrained")
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
    figure.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=figure.axes, label="epoch", shrink=0.8)
    figure.suptitle(f"singular values over epochs: member {member_id} (depth {first['depth']}, λ = {first['weight_decay']:.3g}, seed {first['seed']})")
    return figure


def forecast_figure(comparison: pa.Table, setup: ForecastSetup) -> Figure:
    """Forecast s* against the measured mean top-k singular value of the middle layers (left, y = x
    drawn), and the relative error per (depth, λ) cell (right)."""
    figure = Figure(figsize=(12, 4.2), layout="constrained")
    left = figure.add_subplot(1, 2, 1)
    depth = np.asarray(comparison["depth"].to_pylist())
    s_star = np.asarray(comparison["s_star"].to_pylist(), dtype=float)
    measured = np.asarray(comparison["measured"].to_pylist(), dtype=float)
    for value in sorted(set(depth.tolist())):
        here = depth == value
        left.scatter(s_star[here], measured[here], s=18, label=f"depth {value}")
    finite = np.concatenate([s_star, measured])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        left.plot([0, finite.max()], [0, finite.max()], color="black", lw=1, label="y = x")
    left.set_xlabel(f"forecast s* (reconstructed; r = {setup.radius:.3g}, tail D = L − {setup.collapse_layer})")
    left.set_ylabel(f"measured mean of the top {comparison['k'][0].as_py() if comparison.num_rows else 'k'} σ, middle layers")
    left.legend(fontsize=8)
    right = figure.add_subplot(1, 2, 2)
    grid = _Grid(comparison, "weight_decay", "depth")
    _draw_heatmap(figure, right, grid, grid.values(_column(comparison, "rel_error")), cmap="magma",
                  label="|measured − s*| / s*  (hatched: s* = 0)")
    figure.suptitle("forecast against measurement (final epoch, median over seeds)")
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
    final_rows = sweep.sql(
        """SELECT count(*) AS n FROM metrics m JOIN members f ON m.sweep = f.sweep AND m.member_id = f.member_id
        WHERE f.status = 'complete' AND m.epoch = f.final_epoch"""
    )["n"][0].as_py()
    if final_rows:  # none when every final-epoch file is damaged or skipped: nothing to relate
        figures["relation_bound"] = bound_figure(sweep)
        figures["relation_rank"] = rank_figure(sweep)
        figures["relation_tcv"] = tcv_figure(sweep)
        figures["relation_spectra"] = spectra_figure(sweep, member_id)
        if setup is not None:
            figures["relation_forecast"] = forecast_figure(forecast_comparison(sweep, setup), setup)
    return figures
