"""Tests for nc_ray.query and `nc-ray query`: views over synthetic sweep tables, read-only sessions,
errors, several sweeps at once. `build_sweep` (also used by tests/test_analysis.py) writes a small
sweep with known values straight through `SweepStore`, no training and no Ray."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nc_ray.cli import main
from nc_ray.query import QueryError, open_sweep
from nc_ray.config import MemberConfig, PackPlan
from nc_ray.schema import SCHEMAS
from nc_ray.store import SweepStore

K = 3
WIDTH = 4
DEPTHS = (2, 3)
DECAYS = (1e-3, 1e-2, 1e-1)
SEEDS = (0, 1, 2)
EPOCHS = (0, 10)
# Extra members beyond the full grid: not complete, so never part of any statistic.
DIVERGED = (1e-2, 3, 3)  # (weight_decay, depth, seed): rows at epoch 0 only, status diverged
FAILED = (1e-1, 2, 3)  # no metrics rows, status failed
UNFINISHED = (1e-3, 2, 3)  # planned, rows at epoch 0, no members row yet
EXPECTED_PHASES = {
    (1e-1, 3): "trivial",  # train accuracy 0.2 <= 1/3 + 0.05
    (1e-1, 2): "trivial",  # sigma_1 ~ 1e-5
    (1e-2, 2): "collapsed_low_rank",
    (1e-2, 3): "collapsed_low_rank",
    (1e-3, 2): "not_collapsed",
    (1e-3, 3): "not_collapsed",
}


def member(depth: int, decay: float, seed: int) -> MemberConfig:
    return MemberConfig(
        dataset="gaussian", dataset_params={"n_classes": K, "dim": 5}, n_per_class=None, standardize=True,
        arch="mlp", width=WIDTH, depth=depth, activation="relu", bias=False, loss="ce", lr=0.1,
        momentum=0.0, batch_size=8, epochs=EPOCHS[-1], weight_decay=decay, seed=seed,
        metric_every=10, metric_initial=True, metric_subset_per_class=None,
    )


FALSE_BOUND = (member(2, 1e-3, 0).member_id, 10, 1)  # (member_id, epoch, layer) of the one row with bound_ok false
KEYS = ("member_id", "pack_id", "dataset", "arch", "depth", "width", "loss", "weight_decay", "lr", "seed")


def _rows(record: dict, epoch: int, rng: np.random.Generator) -> tuple[list[dict], list[dict]]:
    """Metrics and spectra rows of one member at one epoch: random values, phase-deciding ones set per cell."""
    depth, cell = record["depth"], (record["weight_decay"], record["depth"])
    train_acc = {(1e-1, 3): 0.2, (1e-1, 2): 0.9}.get(cell, 1.0 - 0.001 * record["seed"])
    if (record["weight_decay"], depth, record["seed"]) == DIVERGED:
        train_acc = 0.0
    metrics, spectra = [], []
    objective = rng.uniform(0.1, 1)  # per member and epoch: the same on each of its rows
    for layer in range(1, depth + 1):
        hidden = layer < depth and (layer > 1 or depth <= 2)
        b0_grad, b0_tcv = rng.uniform(0.5, 1), rng.uniform(0.5, 1)
        collapsed = record["weight_decay"] == 1e-2
        row = {
            **{k: record[k] for k in KEYS}, "epoch": epoch, "layer": layer,
            "train_acc": train_acc, "test_acc": rng.uniform(0.3, 1), "train_loss": rng.uniform(0, 1), "test_loss": rng.uniform(0, 2),
            "sv_max": 1e-5 * rng.uniform(1, 2) if cell == (1e-1, 2) else rng.uniform(0.5, 2),
            "rank_rel_1e2": (int(rng.integers(1, K + 1)) if collapsed else int(rng.integers(10, 30))) if hidden else K,
            "tcv_rel": rng.uniform(0, 1e-3) if collapsed and layer == depth else rng.uniform(0.2, 0.6),
            "stable_rank": rng.uniform(1, 4), "dist_k_rel": rng.uniform(1e-6, 1), "nc1": rng.lognormal(0, 2),
            "dist_k": rng.uniform(0, 0.5), "b0_grad": b0_grad, "b0_tcv": b0_tcv, "b0": b0_grad + b0_tcv,
            "b0_perp": b0_grad + 0.5 * b0_tcv, "bound_ratio": rng.uniform(0, 0.5), "bound_perp_ratio": rng.uniform(0, 1),
            "stationarity": rng.lognormal(-2, 1), "weight_norm": rng.uniform(1, 3), "objective": objective,
            "bound_ok": (record["member_id"], epoch, layer) != FALSE_BOUND, "bound_perp_ok": True, "metric_set": "train", "n_metric": 30,
        }
        metrics.append(row)
        size = K if layer == depth else WIDTH
        spectra.append({**{k: record[k] for k in KEYS}, "epoch": epoch, "layer": layer, "singular_values": sorted(rng.uniform(0.1, 2, size), reverse=True)})
    return metrics, spectra


def build_sweep(directory: Path, seed: int = 0) -> Path:
    """A finished-looking sweep: the full DEPTHS x DECAYS x SEEDS grid complete, plus the DIVERGED,
    FAILED and UNFINISHED members; one pack file lists them all, one metrics/spectra file per epoch."""
    rng = np.random.default_rng(seed)
    store = SweepStore(str(directory))
    grid = [(d, w, s) for d in DEPTHS for w in DECAYS for s in SEEDS]
    extra = [(d, w, s) for w, d, s in (DIVERGED, FAILED, UNFINISHED)]
    configs = [member(d, w, s) for d, w, s in grid + extra]
    records = [m.record() for m in configs]
    store.write_pack(PackPlan("p0", tuple(configs)))
    status = {member(d, w, s).member_id: "complete" for d, w, s in grid}
    status[member(DIVERGED[1], DIVERGED[0], DIVERGED[2]).member_id] = "diverged"
    status[member(FAILED[1], FAILED[0], FAILED[2]).member_id] = "failed"
    last = {"complete": EPOCHS[-1], "diverged": 0, "failed": None, None: 0}
    for epoch in EPOCHS:
        metrics, spectra = [], []
        for record in records:
            reached = last[status.get(record["member_id"])]
            if reached is not None and epoch <= reached:
                m, s = _rows({**record, "pack_id": "p0"}, epoch, rng)
                metrics += m
                spectra += s
        store.write_table("metrics", f"p0-e{epoch:06d}", metrics)
        store.write_table("spectra", f"p0-e{epoch:06d}", spectra)
    members = [
        {**r, "pack_id": "p0", "status": status[r["member_id"]], "final_epoch": last[status[r["member_id"]]] or 0, "epochs_run": EPOCHS[-1]}
        for r in records if r["member_id"] in status
    ]
    store.write_table("members", "p0", members)
    return directory


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    return build_sweep(tmp_path_factory.mktemp("sweeps") / "alpha")


def _files(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*")}


def test_views_hold_the_tables_with_a_sweep_column(sweep_dir):
    with open_sweep(sweep_dir) as sweep:
        counts = sweep.sql("SELECT (SELECT count(*) FROM members) m, (SELECT count(*) FROM planned) p, (SELECT count(*) FROM metrics) r").to_pylist()[0]
        assert counts == {"m": 20, "p": 21, "r": pq.read_table(sweep_dir / "tables/metrics").num_rows}
        for view in ("members", "metrics", "spectra"):
            assert sweep.columns(view) == ["sweep", *SCHEMAS[view].names]
        assert set(sweep.sql("SELECT DISTINCT sweep FROM metrics")["sweep"].to_pylist()) == {"alpha"}
        frame = sweep.df("SELECT depth, count(*) AS n FROM members GROUP BY depth ORDER BY depth")
        assert frame["n"].tolist() == [10, 10]


def test_filters_select_rows_and_reject_unknown_columns(sweep_dir):
    with open_sweep(sweep_dir) as sweep:
        table = sweep.metrics(["member_id", "layer"], depth=3, layer=[1, 3], epoch=10)
        assert table.column_names == ["member_id", "layer"]
        assert table.num_rows == 9 * 2 and set(table["layer"].to_pylist()) == {1, 3}
        assert sweep.members(status="failed")["member_id"].to_pylist() == [member(FAILED[1], FAILED[0], FAILED[2]).member_id]
        assert sweep.members(error=None).num_rows == 20
        with pytest.raises(QueryError, match="no column"):
            sweep.metrics(nonsense=1)


def test_empty_sweep_has_views_with_the_schema_columns(tmp_path):
    (tmp_path / "empty").mkdir()
    with open_sweep(tmp_path / "empty") as sweep:
        for view in ("members", "metrics", "spectra"):
            table = sweep.sql(f"SELECT * FROM {view}")
            assert table.num_rows == 0 and table.column_names == ["sweep", *SCHEMAS[view].names]
        assert sweep.sql("SELECT count(*) AS n FROM planned")["n"][0].as_py() == 0


def test_files_with_other_schemas_and_hive_partitions_are_unioned_by_name(tmp_path):
    root = build_sweep(tmp_path / "mixed")
    (root / "tables/metrics/campaign=new").mkdir()
    for path in (root / "tables/metrics").glob("*.parquet"):
        path.rename(root / "tables/metrics/campaign=new" / path.name)
    old = pa.table({"member_id": ["old"], "epoch": [5], "layer": [1], "legacy": [1.5]})  # fewer columns, one unknown
    (root / "tables/metrics/campaign=old").mkdir()
    pq.write_table(old, root / "tables/metrics/campaign=old/old.parquet")
    with open_sweep(root) as sweep:
        row = sweep.sql("SELECT * FROM metrics WHERE member_id = 'old'").to_pylist()
        assert len(row) == 1 and row[0]["legacy"] == 1.5 and row[0]["campaign"] == "old" and row[0]["tcv_rel"] is None
        assert set(SCHEMAS["metrics"].names) <= set(sweep.columns("metrics"))


def test_sessions_are_read_only(sweep_dir, tmp_path):
    outside = tmp_path / "secret.csv"
    outside.write_text("a\n1\n")
    before = _files(sweep_dir)
    with open_sweep(sweep_dir) as sweep:
        for statement in (
            f"COPY (SELECT 1) TO '{sweep_dir}/x.csv'",
            f"COPY metrics TO '{sweep_dir}/tables/metrics/p0-e000000.parquet' (FORMAT parquet)",
            f"EXPORT DATABASE '{sweep_dir}/export'",
            f"ATTACH '{sweep_dir}/db.duckdb'",
            "CREATE TABLE t AS SELECT 1",
            "SET enable_external_access = true",
            "DROP VIEW metrics",
            f"SELECT * FROM query('COPY (SELECT 1) TO ''{sweep_dir}/y.csv''')",
            "SELECT 1; SELECT 2",
        ):
            with pytest.raises(QueryError):
                sweep.sql(statement)
        with pytest.raises(QueryError, match="Permission"):
            sweep.sql(f"SELECT * FROM read_csv('{outside}')")
        with pytest.raises(QueryError, match="Permission"):
            sweep.sql(f"SELECT * FROM read_csv('{sweep_dir}/../secret.csv')")
        assert sweep.sql("SELECT count(*) AS n FROM metrics")["n"][0].as_py() > 0  # still intact
    assert _files(sweep_dir) == before


def _keys(table: pa.Table) -> list[tuple]:
    return sorted(zip(*(table[c].to_pylist() for c in ("member_id", "epoch", "layer"))))


def test_corrupt_parquet_files_are_skipped_by_name_and_the_rest_is_queried(tmp_path, caplog, capsys):
    root = build_sweep(tmp_path / "broken")
    metrics = root / "tables/metrics"
    truncated, kept = metrics / "p0-e000010.parquet", metrics / "p0-e000000.parquet"
    expected = pq.read_table(metrics).num_rows - pq.read_table(truncated).num_rows
    kept_keys = _keys(pq.read_table(kept))
    truncated.write_bytes(truncated.read_bytes()[:100])
    garbage = metrics / "zz-garbage.parquet"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    damaged = sorted(str(p) for p in (truncated, garbage))
    with caplog.at_level(logging.WARNING, logger="nc_ray.query"), open_sweep(root) as sweep:
        assert sweep.sql("SELECT count(*) AS n FROM metrics")["n"][0].as_py() == expected
        assert _keys(sweep.metrics()) == kept_keys
        assert sweep.skipped == damaged
        assert sweep.members().num_rows == 20 and sweep.spectra().num_rows > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sorted(warnings) == [f"skipping unreadable Parquet file {path}" for path in damaged]  # in the order DuckDB meets them
    assert main(["query", str(root), "SELECT count(*) FROM metrics"]) == 0
    assert str(expected) in capsys.readouterr().out


def test_a_file_damaged_after_the_session_opened_is_skipped_at_the_next_query(tmp_path):
    root = build_sweep(tmp_path / "later")
    spectra = root / "tables/spectra/p0-e000000.parquet"
    with open_sweep(root) as sweep:
        before = sweep.sql("SELECT count(*) AS n FROM spectra")["n"][0].as_py()
        assert sweep.skipped == []
        lost = pq.read_table(spectra).num_rows
        spectra.write_bytes(spectra.read_bytes()[:100])
        assert sweep.sql("SELECT count(*) AS n FROM spectra")["n"][0].as_py() == before - lost
        assert sweep.skipped == [str(spectra)]
        assert sweep.columns("spectra") == ["sweep", *SCHEMAS["spectra"].names]


def test_the_members_view_goes_on_without_a_damaged_members_file(tmp_path):
    root = build_sweep(tmp_path / "members")
    members = root / "tables/members"
    shutil.copy(members / "p0.parquet", members / "p0-copy.parquet")  # a name outside the layout: read as it is
    (members / "p0.parquet").write_bytes(b"PAR1 not really parquet")
    with open_sweep(root) as sweep:
        assert sweep.members(status="complete").num_rows == 18
        assert sweep.skipped == [str(members / "p0.parquet")]
        assert sweep.sql("SELECT count(*) AS n FROM metrics")["n"][0].as_py() == pq.read_table(root / "tables/metrics").num_rows


def test_only_files_that_do_not_read_are_skipped(sweep_dir):
    readable = sweep_dir / "tables/metrics/p0-e000000.parquet"
    with open_sweep(sweep_dir) as sweep:
        with pytest.raises(QueryError, match="No magic bytes"):
            sweep.sql("SELECT error(?)", [f"No magic bytes found at end of file '{readable}'"])
        assert sweep.skipped == []


def test_cli_query_prints_a_table_and_writes_machine_formats(sweep_dir, tmp_path, capsys):
    query = "SELECT depth, count(*) AS n FROM members GROUP BY depth ORDER BY depth"
    assert main(["query", str(sweep_dir), query]) == 0
    printed = capsys.readouterr().out
    assert "depth" in printed and "│" in printed and "10" in printed
    for form in ("csv", "json", "parquet"):
        out = tmp_path / f"result.{form}"
        assert main(["query", str(sweep_dir), query, "--format", form, "--output", str(out)]) == 0
        if form == "csv":
            assert out.read_text().splitlines() == ['"depth","n"', "2,10", "3,10"]
        elif form == "json":
            assert json.loads(out.read_text()) == [{"depth": 2, "n": 10}, {"depth": 3, "n": 10}]
        else:
            assert pq.read_table(out).to_pylist() == [{"depth": 2, "n": 10}, {"depth": 3, "n": 10}]
    assert main(["query", str(sweep_dir)]) == 0  # no SQL: the views and their columns
    assert "metrics" in capsys.readouterr().out


def test_cli_bad_query_exits_2_with_the_database_message(sweep_dir, tmp_path, capsys):
    assert main(["query", str(sweep_dir), "SELECT no_such_column FROM metrics"]) == 2
    err = capsys.readouterr().err
    assert "no_such_column" in err and "Binder Error" in err and "Traceback" not in err
    assert main(["query", str(sweep_dir), f"COPY (SELECT 1) TO '{tmp_path}/x.csv'"]) == 2
    assert "read-only" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()
    assert main(["query", str(sweep_dir), "SELECT 1", "--format", "csv", "--output", str(sweep_dir / "out.csv")]) == 2
    assert not (sweep_dir / "out.csv").exists()
    assert main(["query", str(tmp_path / "missing"), "SELECT 1"]) == 2


def test_several_sweeps_by_option_or_glob(sweep_dir, tmp_path, capsys):
    other = tmp_path / "runs" / "beta"
    shutil.copytree(sweep_dir, other)
    shutil.copytree(sweep_dir, tmp_path / "runs" / "gamma")
    query = "SELECT sweep, count(*) AS n FROM members GROUP BY sweep ORDER BY sweep"
    assert main(["query", str(sweep_dir), query, "--sweep", str(other), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"sweep": "alpha", "n": 20}, {"sweep": "beta", "n": 20}]
    with open_sweep(str(tmp_path / "runs" / "*")) as sweep:
        assert sweep.names == ["beta", "gamma"]
        assert sweep.sql(query)["n"].to_pylist() == [20, 20]
        assert sweep.sql("SELECT count(*) AS n FROM planned")["n"][0].as_py() == 42
