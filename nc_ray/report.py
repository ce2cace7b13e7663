"""One self-contained HTML page with a sweep's result: `nc-ray report SWEEP [--output FILE]`.

The page holds (images embedded as base64 PNG, no other file needed): the sweep's configuration
(each config column's distinct values) and member counts, the rows per table, the fraction of
metrics rows with `bound_ok`, the phase map over weight_decay x depth with the forecast boundary,
its thresholds and text grid, the key heatmaps and the relation plots of `nc_ray.plots`.
"""

from __future__ import annotations

import base64
import datetime
import html
from dataclasses import dataclass
from pathlib import Path

from nc_ray._version import __version__
from nc_ray.analysis import ForecastSetup, PhaseThresholds, aggregate, phase_grid_text, try_forecast_setup
from nc_ray.plots import png_bytes, standard_figures
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


@dataclass(frozen=True)
class SweepSummary:
    """Counts a report shows: members by status, planned but unfinished, rows per table, bound_ok."""

    members: dict[str, int]
    unfinished: int
    rows: dict[str, int]
    bound_ok: int
    bound_checked: int

    @property
    def bound_ok_fraction(self) -> float | None:
        """Fraction of metrics rows (with a bound_ok value) where dist_k <= b0 held."""
        return self.bound_ok / self.bound_checked if self.bound_checked else None


def summarize(sweep: Sweep) -> SweepSummary:
    statuses = {row["status"]: row["n"] for row in sweep.sql("SELECT status, count(*) AS n FROM members GROUP BY ALL").to_pylist()}
    unfinished = sweep.sql(
        "SELECT count(*) AS n FROM planned p ANTI JOIN members f ON p.sweep = f.sweep AND p.member_id = f.member_id"
    )["n"][0].as_py()
    rows = {table: sweep.sql(f"SELECT count(*) AS n FROM {table}")["n"][0].as_py() for table in TABLES}
    bound = sweep.sql("SELECT count(*) FILTER (WHERE bound_ok) AS ok, count(bound_ok) AS n FROM metrics").to_pylist()[0]
    return SweepSummary(
        members={status: statuses.get(status, 0) for status in MEMBER_STATUSES}, unfinished=unfinished,
        rows=rows, bound_ok=bound["ok"], bound_checked=bound["n"],
    )


def _configuration(sweep: Sweep) -> list[tuple[str, str]]:
    """(config column, its distinct values) over planned members, else finished ones."""
    source = "planned" if sweep.sql("SELECT count(*) AS n FROM planned")["n"][0].as_py() else "members"
    out = []
    for name in CONFIG_NAMES:
        values = sweep.sql(f'SELECT DISTINCT "{name}" AS v FROM {source} ORDER BY 1 NULLS FIRST')["v"].to_pylist()
        shown = ", ".join("null" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in values[:MAX_VALUES_SHOWN])
        out.append((name, shown + (f", … ({len(values)} values)" if len(values) > MAX_VALUES_SHOWN else "")))
    return out


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _image(name: str, png: bytes) -> str:
    return f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>'


def render_report(sweep: Sweep, setup: ForecastSetup | None, thresholds: PhaseThresholds = PhaseThresholds(), member_id: str | None = None) -> str:
    """The report page of a sweep session as HTML text (`setup` None: no forecast parts)."""
    summary = summarize(sweep)
    table = aggregate(sweep, thresholds=thresholds)
    figures = {name: png_bytes(figure) for name, figure in standard_figures(sweep, table, REPORT_HEATMAPS, setup, member_id).items()}
    fraction = summary.bound_ok_fraction
    counts = [*summary.members.items(), ("planned, not finished", summary.unfinished)]
    counts += [(f"rows in {name}", n) for name, n in summary.rows.items()]
    counts.append(("bound_ok fraction", "n/a" if fraction is None else f"{fraction:.6f} ({summary.bound_ok} of {summary.bound_checked} metrics rows)"))
    forecast = (
        [("K", setup.n_classes), ("loss", setup.loss), ("radius r", f"{setup.radius:.6g}"), ("r from", setup.radius_source),
         ("tail depth", f"D = L − {setup.collapse_layer}"), ("label", setup.label)]
        if setup else [("forecast", "not available for this sweep")]
    )
    phases = table.select(["phase"]).group_by("phase").aggregate([("phase", "count")]).to_pylist()
    title = f"nc_ray sweep report: {', '.join(sweep.names)}"
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by nc_ray {html.escape(__version__)} "
        f"from {html.escape(', '.join(str(d) for d in sweep.directories))}</p>",
        f'<p class="key">fraction of metrics rows with bound_ok: <b>{"n/a" if fraction is None else f"{fraction:.6f}"}</b></p>',
        "<h2>Members and rows</h2>", _table(counts),
        "<h2>Configuration</h2>", _table(_configuration(sweep)),
        "<h2>Phase map</h2>",
        _table([(f"cells {p['phase'] or 'without a complete member'}", p["phase_count"]) for p in phases]
               + [(f"threshold {k}", v) for k, v in thresholds.as_dict().items()]),
        f"<pre>{html.escape(phase_grid_text(table))}</pre>",
        "<h3>Forecast (reconstructed)</h3>", _table(forecast),
        *(_image(name, png) for name, png in figures.items() if name.startswith("phase_map")),
        "<h2>Heatmaps (final epoch, median over seeds)</h2>",
        *(_image(name, png) for name, png in figures.items() if name.startswith("heatmap_")),
        "<h2>The paper's relations</h2>",
        *(_image(name, png) for name, png in figures.items() if name.startswith("relation_")),
    ]
    style = ("body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}table{border-collapse:collapse;margin:.5em 0}"
             "th,td{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%}figure{margin:1em 0}"
             ".key{font-size:1.2em}pre{background:#f6f6f6;padding:.5em}")
    return f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>{style}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"


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
