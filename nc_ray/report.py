"""One self-contained HTML page with a sweep's result: `nc-ray report SWEEP [--output FILE]`.

The page works offline (images embedded as base64 PNG, no script, no other file): a table of
contents; the sweep's configuration and member counts; the phase grid as a coloured table whose
cells carry their medians, quartiles and member counts as hover titles, the phase map with the
forecast boundary and the forecast λ_crit against the measured trivial boundary per depth; the
forecast against the measured middle-layer spectra per cell; the certificate (how tight b0 and
b0_perp are, and which of their terms dominates); heatmaps; and the relation plots of
`nc_ray.plots`.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from nc_ray._version import __version__
from nc_ray.analysis import (
    PHASES,
    ForecastSetup,
    PhaseThresholds,
    UNFINISHED_PLANNED,
    aggregate,
    boundary_comparison,
    certificate_counts,
    complete_rows,
    forecast_comparison,
    try_forecast_setup,
)
from nc_ray.plots import PHASE_COLORS, collapse_objective_concordance, objective_table, render_pngs, standard_figures
from nc_ray.query import Sweep, open_sweep
from nc_ray.schema import CONFIG_NAMES, MEMBER_STATUSES, TABLES

# name -> (aggregate column, title) of the report's heatmaps
REPORT_HEATMAPS = {
    "train_acc": ("train_acc_median", "train accuracy"),
    "rank_rel_1e2_hidden": ("rank_rel_1e2_median", "rank_rel_1e2, hidden layers"),
    "dist_k_rel_hidden": ("dist_k_rel_median", "dist_k_rel, hidden layers"),
    "tcv_rel_penultimate": ("phase_tcv_rel", "tcv_rel of the penultimate features (layer L)"),
    "sv_max_all": ("phase_sv_max", "sv_max, median over all layers"),
}
MAX_VALUES_SHOWN = 12
# The hover title of a phase cell: its deciding medians and, for these metrics, median [q25, q75].
_HOVER_METRICS = ("train_acc", "rank_rel_1e2", "tcv_rel", "dist_k_rel")


@dataclass(frozen=True)
class SweepSummary:
    """Counts a report shows: members by status, planned but unfinished, rows per table, the certificates."""

    members: dict[str, int]
    unfinished: int
    rows: dict[str, int]
    bound_ok: int
    bound_checked: int
    bound_perp_ok: int
    bound_perp_checked: int

    @property
    def bound_ok_fraction(self) -> float | None:
        """Fraction of metrics rows (with a bound_ok value) where dist_k <= b0 held."""
        return self.bound_ok / self.bound_checked if self.bound_checked else None

    @property
    def bound_perp_ok_fraction(self) -> float | None:
        """Fraction of metrics rows (with a bound_perp_ok value) where dist_k <= b0_perp held."""
        return self.bound_perp_ok / self.bound_perp_checked if self.bound_perp_checked else None


def summarize(sweep: Sweep) -> SweepSummary:
    statuses = {row["status"]: row["n"] for row in sweep.sql("SELECT status, count(*) AS n FROM members GROUP BY ALL").to_pylist()}
    unfinished = sweep.sql(f"SELECT count(*) AS n FROM {UNFINISHED_PLANNED}")["n"][0].as_py()
    rows = {table: sweep.sql(f"SELECT count(*) AS n FROM {table}")["n"][0].as_py() for table in TABLES}
    bound = certificate_counts(sweep)
    return SweepSummary(
        members={status: statuses.get(status, 0) for status in MEMBER_STATUSES}, unfinished=unfinished, rows=rows,
        bound_ok=bound["ok"], bound_checked=bound["n"], bound_perp_ok=bound["perp_ok"], bound_perp_checked=bound["perp_n"],
    )


def certificate_table(sweep: Sweep) -> pa.Table:
    """Per depth, over the hidden layers of complete members at their final epoch (zero matrices
    left out): medians of stationarity, of b0's terms as shares of b0, and of the tightness of
    b0 and b0_perp. Far from a critical point b0_grad dominates; near one, b0_tcv does."""
    return sweep.sql(
        f"""SELECT r.depth, count(*) AS n_rows,
            median(r.stationarity) AS stationarity,
            median(r.b0_grad / r.b0) AS b0_grad_share, median(r.b0_tcv / r.b0) AS b0_tcv_share,
            median(r.b0_perp / r.b0) AS b0_perp_over_b0,
            median(r.bound_ratio) AS dist_k_over_b0, median(r.bound_perp_ratio) AS dist_k_over_b0_perp
        FROM {complete_rows("metrics")}
        WHERE r.layer < r.depth AND r.sv_max >= 1e-10 AND r.b0 > 0 AND r.b0 < 'inf'::DOUBLE
        GROUP BY ALL ORDER BY r.depth"""
    )


def _configuration(sweep: Sweep) -> list[tuple[str, str]]:
    """(config column, its distinct values) over planned members, else finished ones."""
    source = "planned" if sweep.sql("SELECT count(*) AS n FROM planned")["n"][0].as_py() else "members"
    out = []
    for name in CONFIG_NAMES:
        values = sweep.sql(f'SELECT DISTINCT "{name}" AS v FROM {source} ORDER BY 1 NULLS FIRST')["v"].to_pylist()
        shown = ", ".join(_text(v) for v in values[:MAX_VALUES_SHOWN])
        out.append((name, shown + (f", … ({len(values)} values)" if len(values) > MAX_VALUES_SHOWN else "")))
    return out


def _text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def _table(rows: Sequence[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _columns_table(table: pa.Table, columns: Sequence[tuple[str, str]]) -> str:
    """An Arrow table as an HTML table: (column, heading) pairs, numbers to 4 significant digits."""
    head = "".join(f"<th>{html.escape(heading)}</th>" for _, heading in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_text(row[name]))}</td>" for name, _ in columns) + "</tr>"
        for row in table.to_pylist()
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(name: str, png: bytes) -> str:
    return (f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            f"<figcaption>{html.escape(name)}</figcaption></figure>")


def phase_grid_html(table: pa.Table) -> str:
    """The phase of each (λ, depth) cell as a coloured table; each cell's hover title holds its
    deciding medians, median [q25, q75] of the main metrics and its member counts."""
    rows = table.to_pylist()
    decays = sorted({r["weight_decay"] for r in rows if r["weight_decay"] is not None})
    depths = sorted({r["depth"] for r in rows if r["depth"] is not None}, reverse=True)
    cells = {(r["weight_decay"], r["depth"]): r for r in rows}
    head = "<th>depth \\ λ</th>" + "".join(f"<th>{v:.3g}</th>" for v in decays)
    body = []
    for depth in depths:
        line = [f"<th>{depth}</th>"]
        for decay in decays:
            cell = cells.get((decay, depth))
            phase = cell["phase"] if cell else None
            if cell is None:
                line.append("<td></td>")
                continue
            lines = [f"λ = {decay:.4g}, depth {depth}: {phase or 'no complete member'}",
                     f"members: {cell['n_complete']} complete, {cell['n_diverged']} diverged, "
                     f"{cell['n_failed']} failed, {cell['n_unfinished']} unfinished"]
            lines += [f"{name} (phase rule): {_text(cell[f'phase_{name}'])}" for name in ("train_acc", "tcv_rel", "rank_rel", "sv_max")]
            lines += [f"{m}: {_text(cell.get(f'{m}_median'))} [{_text(cell.get(f'{m}_q25'))}, {_text(cell.get(f'{m}_q75'))}]"
                      for m in _HOVER_METRICS if f"{m}_median" in cell]
            style = f"background:{PHASE_COLORS[phase]}" if phase else "background:#eeeeee"
            label = {"collapsed_low_rank": "C+L", "collapsed": "C", "low_rank": "L", "not_collapsed": "N", "trivial": "T"}.get(phase, "·")
            mark = "*" if cell.get("rank_below_dnc") else ""
            line.append(f'<td class="phase" style="{style}" title="{html.escape(chr(10).join(lines))}">{label}{mark}</td>')
        body.append("<tr>" + "".join(line) + "</tr>")
    legend = " ".join(f'<span class="swatch" style="background:{PHASE_COLORS[p]}"></span>{p}' for p in PHASES)
    return (f'<table class="grid"><tr>{head}</tr>{"".join(body)}</table>'
            f'<p class="legend">{legend}; * hidden rank below K − 1. Hover a cell for its medians, quartiles and counts.</p>')


def render_report(sweep: Sweep, setup: ForecastSetup | None, thresholds: PhaseThresholds = PhaseThresholds(), member_id: str | None = None) -> str:
    """The report page of a sweep session as HTML text (`setup` None: no forecast parts)."""
    summary = summarize(sweep)
    table = aggregate(sweep, metrics=("train_acc", "test_acc", "sv_max", "rank_rel_1e2", "stable_rank", "dist_k_rel", "tcv_rel",
                                      "nc1", "bound_ratio", "bound_perp_ratio", "stationarity"), thresholds=thresholds)
    figures = render_pngs(standard_figures(sweep, table, REPORT_HEATMAPS, setup, member_id))

    def fraction(value: float | None, ok: int, n: int) -> str:
        return "n/a" if value is None else f"{value:.6f} ({ok} of {n} metrics rows)"

    counts = [*summary.members.items(), ("planned, not finished", summary.unfinished)]
    counts += [(f"rows in {name}", n) for name, n in summary.rows.items()]
    counts += [("bound_ok fraction", fraction(summary.bound_ok_fraction, summary.bound_ok, summary.bound_checked)),
               ("bound_perp_ok fraction", fraction(summary.bound_perp_ok_fraction, summary.bound_perp_ok, summary.bound_perp_checked))]
    phases = table.select(["phase"]).group_by("phase").aggregate([("phase", "count")]).to_pylist()
    title = f"nc_ray sweep report: {', '.join(sweep.names)}"
    sections: list[tuple[str, str, list[str]]] = [  # (anchor, heading, body)
        ("members", "Members and rows", [_table(counts)]),
        ("configuration", "Configuration", [_table(_configuration(sweep))]),
        ("phases", "Phases over weight decay × depth", [
            phase_grid_html(table) if table.num_rows else "<p>no member has finished yet</p>",
            _table([(f"cells {p['phase'] or 'without a complete member'}", p["phase_count"]) for p in phases]
                   + [(f"threshold {k}", v) for k, v in thresholds.as_dict().items()]),
            *(_image(name, png) for name, png in figures.items() if name.startswith("phase_map")),
        ]),
    ]
    if setup is not None and table.num_rows:
        boundaries = boundary_comparison(table, setup)
        cells = forecast_comparison(sweep, setup)
        sections.append(("forecast", f"Forecast ({setup.label}) against measurement", [
            _table([("K", setup.n_classes), ("loss", setup.loss), ("radius r", f"{setup.radius:.6g}"), ("r from", setup.radius_source),
                    ("tail depth", f"D = L − {setup.collapse_layer}"), ("label", setup.label)]),
            "<h3>Per depth: forecast λ_crit against the measured trivial boundary</h3>",
            "<p>measured boundary: the smallest λ of the grid whose cell is trivial (empty: none in range); "
            "last non-trivial: the largest λ below it that is not.</p>",
            _columns_table(boundaries, [("depth", "depth"), ("tail_depth", "tail D"), ("lambda_crit", "forecast λ_crit"),
                                        ("last_non_trivial", "last non-trivial λ"), ("measured_boundary", "measured boundary"),
                                        ("ratio", "measured / forecast")]),
            "<h3>Per cell: forecast k and s* against the middle layers' significant singular values (σ_i > 0.1 σ_1)</h3>",
            _columns_table(cells, [("depth", "depth"), ("weight_decay", "λ"), ("n_members", "members"), ("k", "forecast k"),
                                   ("count", "measured count"), ("s_star", "forecast s*"), ("size", "measured size"),
                                   ("size_q25", "size q25"), ("size_q75", "size q75"), ("rel_error", "|size − s*| / s*")]),
            *(_image(name, png) for name, png in figures.items() if name == "relation_forecast"),
        ]))
    agree, total = collapse_objective_concordance(objective_table(sweep))
    sections += [
        ("certificate", "The certificate: dist_k ≤ b0_perp ≤ b0", [
            "<p>Medians over the hidden layers of complete members at their final epoch (zero matrices left out). "
            "b0 = b0_grad + b0_tcv; stationarity = ||G||/(λ||W||) measures how far a run is from a critical point: "
            "far from one the gradient term b0_grad dominates and no split of the TCV term tightens the bound much.</p>",
            _columns_table(certificate_table(sweep), [
                ("depth", "depth"), ("n_rows", "rows"), ("stationarity", "stationarity"), ("b0_grad_share", "b0_grad / b0"),
                ("b0_tcv_share", "b0_tcv / b0"), ("b0_perp_over_b0", "b0_perp / b0"), ("dist_k_over_b0", "dist_k / b0"),
                ("dist_k_over_b0_perp", "dist_k / b0_perp")]),
            *(_image(name, png) for name, png in figures.items() if name == "relation_bound"),
        ]),
        ("heatmaps", "Heatmaps (final epoch, median over seeds)", [
            *(_image(name, png) for name, png in figures.items() if name.startswith("heatmap_")),
        ]),
        ("relations", "Trajectories and the paper's relations", [
            f"<p>Objective against collapse within each cell: the more collapsed member (lower penultimate tcv_rel) "
            f"has the lower F_λ in {agree} of {total} pairs of members of one cell.</p>" if total else "",
            *(_image(name, png) for name, png in figures.items()
              if name.startswith("relation_") and name not in ("relation_forecast", "relation_bound")),
        ]),
    ]
    contents = "".join(f'<li><a href="#{anchor}">{html.escape(heading)}</a></li>' for anchor, heading, _ in sections)
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by nc_ray {html.escape(__version__)} "
        f"from {html.escape(', '.join(str(d) for d in sweep.directories))}</p>",
        f'<p class="key">fraction of metrics rows with bound_ok: <b>{_text(summary.bound_ok_fraction) if summary.bound_ok_fraction is None else f"{summary.bound_ok_fraction:.6f}"}</b>'
        f'{"" if summary.bound_perp_ok_fraction is None else f", with bound_perp_ok: <b>{summary.bound_perp_ok_fraction:.6f}</b>"}</p>',
        f'<nav><h2>Contents</h2><ol>{contents}</ol></nav>',
        *(f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{"".join(parts)}</section>' for anchor, heading, parts in sections),
    ]
    style = ("body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}table{border-collapse:collapse;margin:.5em 0}"
             "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%}figure{margin:1em 0}"
             ".key{font-size:1.2em}pre{background:#f6f6f6;padding:.5em}td.phase{text-align:center;min-width:3em;cursor:help}"
             ".swatch{display:inline-block;width:1em;height:1em;margin:0 .3em 0 1em;vertical-align:middle;border:1px solid #999}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(
    sweep_dir: str, output: str | Path | None = None, *, thresholds: PhaseThresholds = PhaseThresholds(),
    radius: float | None = None, collapse_layer: int = 1, member_id: str | None = None,
) -> tuple[Path, str | None]:
    """Write the report of one sweep directory (default <sweep>/analysis/report.html); return its
    path and, when the forecast could not be set up, why (the page is then written without it)."""
    with open_sweep(sweep_dir) as sweep:
        setup, problem = try_forecast_setup(sweep, collapse_layer, radius)
        page = render_report(sweep, setup, thresholds, member_id)
        path = Path(output) if output else sweep.directories[0] / "analysis" / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path, problem
