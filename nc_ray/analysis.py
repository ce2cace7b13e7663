"""Phase aggregation over two config axes, and the forecast next to what was measured.

`aggregate` turns the `metrics` table of a sweep session into one row per cell (x, y) of two config
axes (default x = weight_decay, y = depth), in a single DuckDB query:

1. Members: only `complete` members enter the statistics, at their final epoch (`members.final_epoch`;
   or a given epoch, or every epoch with epoch="all"). `diverged` and `failed` members are counted
   per cell (`n_diverged`, `n_failed`), never averaged in; `n_unfinished` counts planned members
   (`planned` view) with no members row yet.
2. Per member, each metric is the median over the selected layers (`layers`): "hidden" = layers
   2..L-1 (layer 1 when L = 2), "penultimate" = layer L (whose input is the penultimate features,
   the rows carrying nc2..nc4), "all", or a layer number.
3. Per cell: median, 25% and 75% quantiles over members (`<metric>_median`, `_q25`, `_q75`;
   continuous quantiles, as numpy's default), and the phase of docs/science.md from the medians
   over members of these per-member values, each with its own fixed layers whatever `layers` says:
     phase_train_acc  train accuracy
     phase_sv_max     sv_max, median over all layers: the reading of "sigma_1 -> 0"
     phase_tcv_rel    tcv_rel of layer L (penultimate features)
     phase_rank_rel   rank_rel_1e2, median over the hidden layers (as in 2.)
   Two properties: DNC1 = phase_train_acc >= collapsed_acc and phase_tcv_rel <= collapsed_tcv_rel;
   low rank = phase_rank_rel <= low_rank_per_class * K. The classes, first match wins:
   trivial             phase_train_acc <= 1/K + trivial_acc_margin or phase_sv_max < trivial_sv_max
   collapsed_low_rank  DNC1 and low rank (the paper's regime)
   collapsed           DNC1, not low rank
   low_rank            low rank without DNC1
   not_collapsed       every other cell with a complete member (null phase: no complete member)
   `rank_below_dnc` flags cells whose phase_rank_rel < K − 1: fewer directions than DNC needs.
K comes from each member's dataset and dataset_params (`nc_ray.data.n_classes_of`; the metrics
table has no class count). `n_configs` counts the distinct configs (all config columns but x, y
and seed) pooled in a cell: more than 1 means other axes are mixed in, select a slice first.

The thresholds are stored in the table: as constant `threshold_*` columns and, with the axes,
layers, epoch and metrics, as JSON in the Parquet key-value metadata (key `nc_ray.phase`).
`write_aggregate` publishes it as <sweep>/analysis/phase_<x>_<y>[...].parquet (outside tables/).

The forecast part (`forecast_setup`, `forecast_comparison`) puts `nc_ray.theory` next to the
measurements: lam_crit(depth - m) per depth for the phase map, and s* per cell against the
measured top-k singular values of the middle layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nc_ray.schema import CONFIG_NAMES
from nc_ray.store import SweepStore
from nc_ray.theory import LABEL, class_mean_radius, critical_weight_decay, forecast

if TYPE_CHECKING:  # duckdb is imported by the functions that query, keeping `nc-ray --help` light
    from nc_ray.query import Sweep

PHASES = ("trivial", "collapsed_low_rank", "collapsed", "low_rank", "not_collapsed")
DEFAULT_METRICS = (
    "train_acc", "test_acc", "sv_max", "rank_rel_1e2", "stable_rank", "dist_k_rel", "tcv_rel", "nc1", "bound_ratio",
)
LAYER_GROUPS = ("hidden", "penultimate", "all")
Layers = Literal["hidden", "penultimate", "all"] | int
Epoch = int | Literal["final", "all"]
METADATA_KEY = b"nc_ray.phase"
_HIDDEN = "(layer < depth AND (layer > 1 OR depth <= 2))"


@dataclass(frozen=True)
class PhaseThresholds:
    """The phase rules' thresholds (SCIENCE.md defaults; see the module doc for the rules)."""

    trivial_acc_margin: float = 0.05
    trivial_sv_max: float = 1e-3
    collapsed_acc: float = 0.99
    collapsed_tcv_rel: float = 1e-2
    low_rank_per_class: float = 1.0

    def __post_init__(self) -> None:
        for name, value in self.as_dict().items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"threshold {name} must be a finite number >= 0, got {value!r}")

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def layer_predicate(layers: Layers) -> str:
    """SQL condition on a metrics row (columns layer, depth) selecting `layers`."""
    if isinstance(layers, bool) or not isinstance(layers, (int, str)):
        raise ValueError(f"layers must be one of {LAYER_GROUPS} or a layer number, got {layers!r}")
    if isinstance(layers, int):
        if layers < 1:
            raise ValueError(f"layer numbers start at 1, got {layers}")
        return f"(layer = {layers})"
    if layers not in LAYER_GROUPS:
        raise ValueError(f"layers must be one of {LAYER_GROUPS} or a layer number, got {layers!r}")
    return {"hidden": _HIDDEN, "penultimate": "(layer = depth)", "all": "true"}[layers]


def table_name(x: str, y: str, layers: Layers, epoch: Epoch) -> str:
    """File stem of an aggregate under <sweep>/analysis/: phase_<x>_<y>[_<layers>][_e<epoch>]."""
    parts = ["phase", x, y]
    if layers != "hidden":
        parts.append(f"layer{layers}" if isinstance(layers, int) else layers)
    if epoch != "final":
        parts.append(f"e{epoch}")
    return "_".join(parts)


def class_counts(sweep: Sweep) -> list[tuple[str, str, int]]:
    """(dataset, dataset_params, K) for every dataset configuration in the sweep."""
    from nc_ray.data import n_classes_of

    pairs = sweep.sql(
        "SELECT DISTINCT dataset, dataset_params FROM (SELECT dataset, dataset_params FROM members "
        "UNION ALL SELECT dataset, dataset_params FROM planned) WHERE dataset IS NOT NULL"
    ).to_pylist()
    return [(p["dataset"], p["dataset_params"], n_classes_of(p["dataset"], **json.loads(p["dataset_params"] or "{}"))) for p in pairs]


def _check_names(sweep: Sweep, x: str, y: str, metrics: Sequence[str]) -> None:
    if x == y:
        raise ValueError(f"x and y must be different config columns, both are {x!r}")
    for axis in (x, y):
        if axis not in CONFIG_NAMES:
            raise ValueError(f"axis {axis!r} is not a config column; config columns: {', '.join(CONFIG_NAMES)}")
    numeric = {f.name for f in sweep.sql("SELECT * FROM metrics LIMIT 0").schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)}
    bad = [m for m in metrics if m not in numeric or m in ("epoch", "layer")]
    if bad or not metrics:
        raise ValueError(f"metrics must be numeric metric columns, got {list(metrics)!r}; numeric columns: {', '.join(sorted(numeric))}")


def aggregation_sql(
    x: str, y: str, metrics: Sequence[str], layers: Layers, epoch: Epoch, thresholds: PhaseThresholds,
    class_counts: Sequence[tuple[str, str, int]],
) -> tuple[str, list]:
    """The one query behind `aggregate` and its parameters (see the module doc for its contract)."""
    from nc_ray.query import quote_identifier

    qx, qy = quote_identifier(x), quote_identifier(y)
    selected = layer_predicate(layers)
    if epoch == "final":
        epoch_join, epoch_key = "AND m.epoch = c.final_epoch", ""
    elif epoch == "all":
        epoch_join, epoch_key = "", "epoch, "
    elif isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0:
        epoch_join, epoch_key = f"AND m.epoch = {epoch}", ""
    else:
        raise ValueError(f"epoch must be 'final', 'all' or an epoch number >= 0, got {epoch!r}")
    t = thresholds
    names = [quote_identifier(m) for m in metrics]
    k_rows = " UNION ALL ".join(["SELECT ?::VARCHAR, ?::VARCHAR, ?::BIGINT"] * len(class_counts)) or "SELECT NULL::VARCHAR, NULL::VARCHAR, NULL::BIGINT WHERE false"
    other_config = ", ".join(quote_identifier(c) for c in CONFIG_NAMES if c not in (x, y, "seed"))
    metric_values = ",\n        ".join(f"median({n}) FILTER (WHERE {selected}) AS {n}" for n in names)
    metric_quantiles = ",\n        ".join(f"quantile_cont({n}, [0.25, 0.5, 0.75]) AS {n}" for n in names)
    metric_columns = ",\n    ".join(
        f"s.{n}[{i}] AS {quote_identifier(f'{m}_{stat}')}" for m, n in zip(metrics, names) for i, stat in ((2, "median"), (1, "q25"), (3, "q75"))
    )
    sql = f"""
WITH k(dataset, dataset_params, n_classes) AS ({k_rows}),
finished AS (
    SELECT sweep, member_id, status, final_epoch, {qx} AS x, {qy} AS y, n_classes, row({other_config}) AS config
    FROM members LEFT JOIN k USING (dataset, dataset_params)
),
member_values AS (
    SELECT {epoch_key}c.x, c.y, any_value(c.n_classes) AS n_classes,
        {metric_values},
        median(m.train_acc) AS phase_train_acc,
        median(m.sv_max) AS phase_sv_max,
        median(m.tcv_rel) FILTER (WHERE layer = depth) AS phase_tcv_rel,
        median(m.rank_rel_1e2) FILTER (WHERE {_HIDDEN}) AS phase_rank_rel
    FROM metrics m JOIN finished c ON m.sweep = c.sweep AND m.member_id = c.member_id {epoch_join}
    WHERE c.status = 'complete'
    GROUP BY {epoch_key}c.x, c.y, c.sweep, c.member_id
),
cell_values AS (
    SELECT {epoch_key}x, y, any_value(n_classes) AS n_classes,
        {metric_quantiles},
        median(phase_train_acc) AS phase_train_acc, median(phase_sv_max) AS phase_sv_max,
        median(phase_tcv_rel) AS phase_tcv_rel, median(phase_rank_rel) AS phase_rank_rel
    FROM member_values GROUP BY ALL
),
cell_properties AS (
    SELECT *,
        coalesce(phase_train_acc >= {t.collapsed_acc!r} AND phase_tcv_rel <= {t.collapsed_tcv_rel!r}, false) AS dnc1,
        coalesce(phase_rank_rel <= {t.low_rank_per_class!r} * n_classes, false) AS low_rank
    FROM cell_values
),
counts AS (
    SELECT x, y,
        count(*) FILTER (WHERE status = 'complete') AS n_complete,
        count(*) FILTER (WHERE status = 'diverged') AS n_diverged,
        count(*) FILTER (WHERE status = 'failed') AS n_failed,
        count(DISTINCT config) AS n_configs
    FROM finished GROUP BY ALL
),
plan AS (
    SELECT p.{qx} AS x, p.{qy} AS y, count(*) AS n_unfinished FROM {UNFINISHED_PLANNED} GROUP BY ALL
)
SELECT {epoch_key}x AS {qx}, y AS {qy},
    coalesce(n_complete, 0) AS n_complete, coalesce(n_diverged, 0) AS n_diverged,
    coalesce(n_failed, 0) AS n_failed, coalesce(n_unfinished, 0) AS n_unfinished, coalesce(n_configs, 0) AS n_configs,
    s.n_classes,
    CASE
        WHEN s.n_classes IS NULL THEN NULL
        WHEN s.phase_train_acc <= 1.0 / s.n_classes + {t.trivial_acc_margin!r} OR s.phase_sv_max < {t.trivial_sv_max!r} THEN 'trivial'
        WHEN s.dnc1 AND s.low_rank THEN 'collapsed_low_rank'
        WHEN s.dnc1 THEN 'collapsed'
        WHEN s.low_rank THEN 'low_rank'
        ELSE 'not_collapsed'
    END AS phase,
    s.phase_rank_rel < s.n_classes - 1 AS rank_below_dnc,
    s.phase_train_acc, s.phase_sv_max, s.phase_tcv_rel, s.phase_rank_rel,
    {metric_columns}
FROM counts FULL JOIN plan USING (x, y) LEFT JOIN cell_properties s USING (x, y)
ORDER BY {qy}, {epoch_key}{qx}
"""
    params = [value for row in class_counts for value in row]
    return sql, params


def aggregate(
    sweep: Sweep,
    *,
    x: str = "weight_decay",
    y: str = "depth",
    metrics: Sequence[str] = DEFAULT_METRICS,
    layers: Layers = "hidden",
    epoch: Epoch = "final",
    thresholds: PhaseThresholds = PhaseThresholds(),
) -> pa.Table:
    """One row per cell (x, y) [and epoch when epoch="all"]: counts, the phase and the statistics
    of `metrics` over complete members (module doc). Thresholds and options are stored in the
    table (threshold_* columns, `layers` column, schema metadata `nc_ray.phase`)."""
    metrics = list(dict.fromkeys(metrics))
    _check_names(sweep, x, y, metrics)
    sql, params = aggregation_sql(x, y, metrics, layers, epoch, thresholds, class_counts(sweep))
    table = sweep.sql(sql, params)
    constants = {"layers": str(layers), **{f"threshold_{k}": v for k, v in thresholds.as_dict().items()}}
    for name, value in constants.items():
        table = table.append_column(name, pa.array([value] * table.num_rows, type=pa.string() if name == "layers" else pa.float64()))
    info = {"x": x, "y": y, "layers": layers, "epoch": epoch, "metrics": metrics, "thresholds": thresholds.as_dict(), "sweeps": sweep.names}
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(info).encode()})


def write_aggregate(directory: str, table: pa.Table) -> str:
    """Publish an `aggregate` table as <directory>/<table_name>.parquet (atomically); return its path.
    `nc-ray phase` writes into <sweep>/analysis, or its --out folder (so a read-only sweep works)."""
    info = json.loads(table.schema.metadata[METADATA_KEY])
    store = SweepStore(directory)
    relative = f"{table_name(info['x'], info['y'], info['layers'], info['epoch'])}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    store.write_bytes(relative, sink.getvalue().to_pybytes())
    return store.path(relative)


PHASE_LETTERS = {"trivial": "T", "collapsed_low_rank": "C+L", "collapsed": "C", "low_rank": "L", "not_collapsed": "N", None: "."}


def phase_grid_text(table: pa.Table) -> str:
    """An aggregate table's phases as a text grid (rows y, columns x; final-epoch style tables)."""
    info = json.loads(table.schema.metadata[METADATA_KEY])
    x, y = info["x"], info["y"]
    rows = table.select([x, y, "phase"]).to_pylist()
    xs = sorted({r[x] for r in rows if r[x] is not None})
    ys = sorted({r[y] for r in rows if r[y] is not None})
    phase = {(r[x], r[y]): r["phase"] for r in rows}
    labels = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in xs]
    width = max([len(f"{y} \\ {x}")] + [len(str(v)) for v in ys])
    lines = [
        "phase per cell: " + ", ".join(f"{letter} {name or 'no complete member'}" for name, letter in PHASE_LETTERS.items()),
        f"{y} \\ {x}".ljust(width) + " " + " ".join(label.rjust(8) for label in labels),
    ]
    for v in ys:
        lines.append(str(v).ljust(width) + " " + " ".join(PHASE_LETTERS[phase.get((u, v))].rjust(8) for u in xs))
    pooled = max(table["n_configs"].to_pylist(), default=0)
    if pooled > 1:
        lines.append(f"warning: some cells pool up to {pooled} configurations (other config columns vary): select a slice")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- forecast


@dataclass(frozen=True)
class ForecastSetup:
    """What the forecast of `nc_ray.theory` needs about a sweep (one dataset and loss).

    The tail is D = depth - collapse_layer layers: features are taken to collapse after layer m =
    collapse_layer (default 1, the first layer). `radius` is r, by default `class_mean_radius` of
    the (standardized) training inputs, centered for ce; `radius_source` says where it came from.
    """

    n_classes: int
    radius: float
    radius_source: str
    loss: str
    collapse_layer: int = 1
    label: str = LABEL

    def tail_depth(self, depth: np.ndarray) -> np.ndarray:
        return np.asarray(depth) - self.collapse_layer

    def critical_weight_decay(self, depths: Sequence[int]) -> dict[int, float]:
        """depth -> lam_crit(depth - collapse_layer) (inf when the tail has one layer); depths
        whose tail would be empty are left out."""
        usable = sorted({int(d) for d in depths if d - self.collapse_layer >= 1})
        if not usable:
            return {}
        values = critical_weight_decay(self.tail_depth(np.array(usable)), self.n_classes, self.radius, self.loss)
        return dict(zip(usable, values.tolist()))


def forecast_setup(sweep: Sweep, collapse_layer: int = 1, radius: float | None = None) -> ForecastSetup:
    """The sweep's K, loss and r (loading its training inputs unless `radius` is given).

    Raises ValueError when the sweep mixes datasets, dataset options or losses."""
    configs = sweep.sql(
        "SELECT DISTINCT dataset, dataset_params, n_per_class, standardize, loss FROM members"
    ).to_pylist() or sweep.sql("SELECT DISTINCT dataset, dataset_params, n_per_class, standardize, loss FROM planned").to_pylist()
    if len(configs) != 1:
        raise ValueError(f"the forecast needs one dataset configuration and loss per sweep, found {len(configs)}: {configs}")
    config = configs[0]
    from nc_ray.data import n_classes_of, prepared_arrays

    params = json.loads(config["dataset_params"] or "{}")
    if radius is None:
        data = prepared_arrays(config["dataset"], n_per_class=config["n_per_class"], standardize=config["standardize"], **params)
        centered = config["loss"] == "ce"
        radius = class_mean_radius(data.x_train, data.y_train, centered=centered)
        source = f"data: mean class-mean norm of the training inputs{' (centered)' if centered else ''}"
    else:
        source = "given"
    return ForecastSetup(
        n_classes=n_classes_of(config["dataset"], **params), radius=float(radius), radius_source=source,
        loss=config["loss"], collapse_layer=collapse_layer,
    )


def try_forecast_setup(sweep: Sweep, collapse_layer: int = 1, radius: float | None = None) -> tuple[ForecastSetup | None, str | None]:
    """`forecast_setup`, or (None, why) when the sweep mixes datasets/losses or its data cannot be loaded."""
    try:
        return forecast_setup(sweep, collapse_layer, radius), None
    except (ValueError, OSError) as error:
        return None, str(error)


# SQL FROM clause: the planned members `p` that have no members row yet (not finished).
UNFINISHED_PLANNED = "planned p ANTI JOIN members f ON p.sweep = f.sweep AND p.member_id = f.member_id"


def certificate_counts(sweep: Sweep) -> dict[str, int]:
    """Over every metrics row: {"ok", "n"} of bound_ok and {"perp_ok", "perp_n"} of bound_perp_ok
    (rows written before version 2 have no bound_perp_ok and count in n only)."""
    return sweep.sql(
        """SELECT count(*) FILTER (WHERE bound_ok) AS ok, count(bound_ok) AS n,
            count(*) FILTER (WHERE bound_perp_ok) AS perp_ok, count(bound_perp_ok) AS perp_n FROM metrics"""
    ).to_pylist()[0]


def complete_rows(view: str, epoch: int | Literal["final", "all"] = "final") -> str:
    """SQL FROM clause: the rows `r` of `view` (metrics or spectra) of complete members `f`, at
    each member's final epoch (`f.final_epoch`), at a given epoch, or at every epoch ("all")."""
    if epoch == "final":
        at = "AND r.epoch = f.final_epoch"
    elif epoch == "all":
        at = ""
    elif isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0:
        at = f"AND r.epoch = {epoch}"
    else:
        raise ValueError(f"epoch must be 'final', 'all' or an epoch number >= 0, got {epoch!r}")
    return f"{view} r JOIN members f ON r.sweep = f.sweep AND r.member_id = f.member_id AND f.status = 'complete' {at}"


# The middle layers' significant singular values (σ_i > 0.1 σ_1), what the forecast's k and s*
# are compared with; a zero matrix (σ_1 < ZERO_SV_MAX, as in nc_ray.metrics) has none.
_SIGNIFICANT = "list_filter(r.singular_values, lambda v: v > 0.1 * r.singular_values[1] AND r.singular_values[1] >= 1e-10)"


def forecast_comparison(sweep: Sweep, setup: ForecastSetup, epoch: int | Literal["final"] = "final") -> pa.Table:
    """Per (depth, weight_decay) cell, the forecast against the middle layers (collapse_layer+1 ..
    depth-1) of complete members, as docs/science.md prescribes:

    - `k` (forecast count) against `count`: the number of singular values above 0.1 σ_1
      (rank_rel_1e1; 0 on a zero matrix), per member the median over the middle layers;
    - `s_star` against `size`: the mean of those significant singular values only (never an
      average that includes near-zero ones), per member averaged over the middle layers (null on
      zero matrices); `rel_error` = |size − s*| / s* (null where s* = 0: the zero function).
    Cell values are medians over members, with `_q25`/`_q75` quartiles.
    """
    k = int(forecast(1.0, 2, setup.n_classes, setup.radius, setup.loss).k)
    table = sweep.sql(
        f"""
        WITH per_member AS (
            SELECT r.depth, r.weight_decay, r.sweep, r.member_id,
                median(len({_SIGNIFICANT})) AS count,
                avg(list_avg({_SIGNIFICANT})) AS size
            FROM {complete_rows("spectra", epoch)}
            WHERE r.layer > {setup.collapse_layer} AND r.layer < r.depth
            GROUP BY ALL
        )
        SELECT depth, weight_decay, count(*) AS n_members,
            median(count) AS count, quantile_cont(count, 0.25) AS count_q25, quantile_cont(count, 0.75) AS count_q75,
            median(size) AS size, quantile_cont(size, 0.25) AS size_q25, quantile_cont(size, 0.75) AS size_q75
        FROM per_member GROUP BY ALL ORDER BY depth, weight_decay
        """
    )
    depth = np.asarray(table["depth"].to_numpy(zero_copy_only=False), dtype=np.int64)
    decay = np.asarray(table["weight_decay"].to_numpy(zero_copy_only=False), dtype=float)
    s_star = forecast(decay, setup.tail_depth(depth), setup.n_classes, setup.radius, setup.loss).s_star if len(depth) else np.zeros(0)
    size = np.asarray(table["size"].to_numpy(zero_copy_only=False), dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        error = np.where(s_star > 0, np.abs(size - s_star) / s_star, np.nan)
    return (
        table.append_column("tail_depth", pa.array(setup.tail_depth(depth)))
        .append_column("k", pa.array(np.full(len(depth), k)))
        .append_column("s_star", pa.array(s_star))
        .append_column("rel_error", pa.array(error, from_pandas=True))
        .append_column("label", pa.array([setup.label] * len(depth)))
    )


def boundary_comparison(table: pa.Table, setup: ForecastSetup) -> pa.Table:
    """Per depth of a weight_decay x depth `aggregate` table: the forecast λ_crit(depth − m) against
    the measured trivial boundary, the smallest λ of the grid whose cell is `trivial` (null: none in
    range), with the largest λ below it that is not trivial (`last_non_trivial`) bracketing it."""
    info = json.loads(table.schema.metadata[METADATA_KEY])
    if (info["x"], info["y"]) != ("weight_decay", "depth"):
        raise ValueError(f"the boundary is compared on weight_decay x depth tables, not {info['x']} x {info['y']}")
    cells = [r for r in table.select(["weight_decay", "depth", "phase"]).to_pylist() if r["phase"] is not None]
    depths = sorted({r["depth"] for r in cells})
    forecast_crit = setup.critical_weight_decay(depths)
    rows = []
    for depth in depths:
        here = sorted((r["weight_decay"], r["phase"]) for r in cells if r["depth"] == depth)
        trivial = [w for w, phase in here if phase == "trivial"]
        boundary = trivial[0] if trivial else None
        below = [w for w, phase in here if phase != "trivial" and (boundary is None or w < boundary)]
        crit = forecast_crit.get(depth)
        rows.append({
            "depth": depth, "tail_depth": depth - setup.collapse_layer, "lambda_crit": crit,
            "measured_boundary": boundary, "last_non_trivial": below[-1] if below else None,
            "grid_low": here[0][0], "grid_high": here[-1][0],
            "ratio": boundary / crit if boundary is not None and crit and math.isfinite(crit) else None,
            "label": setup.label,
        })
    schema = pa.schema([("depth", pa.int64()), ("tail_depth", pa.int64()), ("lambda_crit", pa.float64()),
                        ("measured_boundary", pa.float64()), ("last_non_trivial", pa.float64()), ("grid_low", pa.float64()),
                        ("grid_high", pa.float64()), ("ratio", pa.float64()), ("label", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def boundary_text(boundaries: pa.Table) -> str:
    """The per-depth boundary table as text lines (what `nc-ray phase` prints beside the map)."""
    lines = ["depth  forecast λ_crit (reconstructed)  measured trivial boundary  (last non-trivial λ)"]
    for r in boundaries.to_pylist():
        crit = "inf" if r["lambda_crit"] is None or not math.isfinite(r["lambda_crit"]) else f"{r['lambda_crit']:.3g}"
        measured = f"{r['measured_boundary']:.3g}" if r["measured_boundary"] is not None else f"none in [{r['grid_low']:.3g}, {r['grid_high']:.3g}]"
        below = f"({r['last_non_trivial']:.3g})" if r["last_non_trivial"] is not None else "(-)"
        lines.append(f"{r['depth']:>5}  {crit:>30}  {measured:>25}  {below}")
    return "\n".join(lines)
