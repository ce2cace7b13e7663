"""The tables' columns: every name and Arrow type of `members`, `metrics` and `spectra`.

A leaf of the read side (pyarrow and `nc_ray.config` only): the store, the query session, the
analysis and the spec take names from here. Column names are a public API: the metric names
are those of docs/science.md. Version 2 added columns (all nullable); files written by version 1
read with those columns null (pyarrow datasets and DuckDB's `union_by_name` fill them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from nc_ray.config import MemberConfig

SCHEMA_VERSION = 2
TABLES = ("members", "metrics", "spectra")
MEMBER_STATUSES = ("complete", "diverged", "failed")

# Per layer l = 1..L (the layer multiplies its input Z_{l-1}).
SPECTRUM_METRICS = (
    "sv_max", "weight_norm", "stable_rank", "effective_rank", "rank_rel_1e1", "rank_rel_1e2", "rank_rel_1e3",
    "dist_k", "dist_k_rel", "dist_km1",
)
COLLAPSE_METRICS = ("tcv", "tcv_sq", "tcv_rel", "tcv_perp_rel", "nc1")
CERTIFICATE_METRICS = (
    "grad_norm", "stationarity", "b0_grad", "b0_tcv", "b0", "b0_perp", "b1", "b2",
    "bound_ok", "bound_ratio", "bound_perp_ok", "bound_perp_ratio",
)
LAYER_METRICS = (*SPECTRUM_METRICS, *COLLAPSE_METRICS, *CERTIFICATE_METRICS, "balance_gap")
# Only on the row of layer L, whose input is the penultimate features.
PENULTIMATE_METRICS = ("nc2_equinorm", "nc2_equiangular", "nc3", "nc4")
# Per member and evaluation, repeated on each of its rows: F_λ on the metric set.
MEMBER_METRICS = ("objective",)
INTEGER_METRICS = ("rank_rel_1e1", "rank_rel_1e2", "rank_rel_1e3")
FLAG_METRICS = ("bound_ok", "bound_perp_ok")
# Metrics that are null on a numerically zero matrix (sv_max < ZERO_SV_MAX in nc_ray.metrics).
UNDEFINED_ON_ZERO_MATRIX = ("stable_rank", "effective_rank", "dist_k_rel", "bound_ratio", "bound_perp_ratio", "stationarity")

_ARROW_TYPES = {
    "str": pa.string(), "int": pa.int64(), "int | None": pa.int64(), "float": pa.float64(),
    "float | None": pa.float64(), "bool": pa.bool_(),
    "tuple[tuple[str, Any], ...]": pa.string(),  # dataset_params, as canonical JSON
    "tuple[int, ...] | None": pa.list_(pa.int64()), "str | None": pa.string(),
}


def _config_columns() -> list[tuple[str, pa.DataType]]:
    columns = []
    for field in dataclasses.fields(MemberConfig):
        if field.type not in _ARROW_TYPES:
            raise TypeError(f"MemberConfig.{field.name}: no column type for {field.type!r}; add it to nc_ray.schema")
        columns.append((field.name, _ARROW_TYPES[field.type]))
    return columns


# Every MemberConfig field, in its order: a config field cannot be missing from the tables.
CONFIG_COLUMNS = _config_columns()
CONFIG_NAMES = tuple(name for name, _ in CONFIG_COLUMNS)
KEY_CONFIG = ("dataset", "arch", "depth", "width", "loss", "weight_decay", "lr", "seed")
_KEY_COLUMNS = [(name, dtype) for name, dtype in CONFIG_COLUMNS if name in KEY_CONFIG]
_ID_COLUMNS = [("member_id", pa.string()), ("pack_id", pa.string())]
EVALUATION_COLUMNS = [
    ("train_loss", pa.float64()), ("train_acc", pa.float64()),
    ("test_loss", pa.float64()), ("test_acc", pa.float64()),
]


def _metric_type(name: str) -> pa.DataType:
    return pa.bool_() if name in FLAG_METRICS else pa.int64() if name in INTEGER_METRICS else pa.float64()


SCHEMAS = {
    "members": pa.schema(
        _ID_COLUMNS + CONFIG_COLUMNS + [
            ("status", pa.string()), ("error", pa.string()), ("diverged_epoch", pa.int64()),
            ("stopped_epoch", pa.int64()), ("epochs_run", pa.int64()), ("final_epoch", pa.int64()),
            *EVALUATION_COLUMNS, ("n_train", pa.int64()), ("n_metric", pa.int64()), ("wall_time_s", pa.float64()),
            ("device", pa.string()), ("nc_ray_version", pa.string()),
            ("finished_at", pa.timestamp("s", tz="UTC")),
        ]
    ),
    "metrics": pa.schema(
        _ID_COLUMNS + _KEY_COLUMNS + [("epoch", pa.int64()), ("layer", pa.int64())]
        + [(name, _metric_type(name)) for name in LAYER_METRICS]
        + [(name, pa.float64()) for name in PENULTIMATE_METRICS]
        + [(name, pa.float64()) for name in MEMBER_METRICS]
        + EVALUATION_COLUMNS
        + [("metric_set", pa.string()), ("n_metric", pa.int64())]
    ),
    "spectra": pa.schema(
        _ID_COLUMNS + _KEY_COLUMNS + [("epoch", pa.int64()), ("layer", pa.int64()), ("singular_values", pa.list_(pa.float64()))]
    ),
}
# What `planned` (the member records of the pack files) holds.
PLANNED_SCHEMA = pa.schema([SCHEMAS["members"].field(name) for name in ("member_id", "pack_id", *CONFIG_NAMES)])


def _clean(value: Any) -> Any:
    # Parquet nulls, not NaN, for undefined values (e.g. tcv_rel when all inputs coincide).
    return None if isinstance(value, float) and math.isnan(value) else value


def rows_to_table(name: str, rows: Sequence[dict]) -> pa.Table:
    """Rows (dicts keyed by column name; missing keys are null) as a table of the versioned schema.

    A key that is not a column of the table is an error, not silently dropped.
    """
    schema = SCHEMAS[name]
    unknown = sorted({key for row in rows for key in row} - set(schema.names))
    if unknown:
        raise ValueError(f"table {name!r} has no column(s) {', '.join(unknown)}")
    columns = {field.name: [_clean(row.get(field.name)) for row in rows] for field in schema}
    return pa.Table.from_pydict(columns, schema=schema).replace_schema_metadata(
        {b"nc_ray.schema_version": str(SCHEMA_VERSION).encode()}
    )
