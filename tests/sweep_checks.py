"""Checks shared by the sweep and fault-injection tests: the exact expected row keys of a spec,
and `nc-ray` run as a subprocess."""

import json
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from nc_ray.spec import load_spec

LONG = {"training.epochs": 1500, "metrics.every": 100}  # long enough to be killed mid-run


def expected_keys(spec_path, last_epoch: dict[str, int] | None = None) -> set[tuple[str, int, int]]:
    """Every (member, evaluation epoch, layer) row of the spec's members; a member in `last_epoch`
    (stopped by its stop rule) has rows up to that epoch only."""
    return {
        (m.member_id, epoch, layer)
        for m in load_spec(spec_path).members()
        for epoch in m.evaluation_epochs()
        if epoch <= (last_epoch or {}).get(m.member_id, epoch)
        for layer in range(1, m.depth + 1)
    }


def table_keys(sweep: Path, table: str) -> list[tuple[str, int, int]]:
    rows = duckdb.connect().execute(
        f"SELECT member_id, epoch, layer FROM read_parquet('{sweep}/tables/{table}/*.parquet', union_by_name = true)"
    ).fetchall()
    return [tuple(r) for r in rows]


def assert_exactly_once(sweep: Path, spec_path) -> None:
    """Every expected row exactly once, all members complete, and on every metrics row the
    certificate's invariant dist_k <= b0_perp <= b0."""
    con = duckdb.connect()
    stopped = dict(con.execute(
        f"SELECT member_id, stopped_epoch FROM read_parquet('{sweep}/tables/members/*.parquet', union_by_name = true) "
        "WHERE stopped_epoch IS NOT NULL").fetchall())
    expected = expected_keys(spec_path, stopped)
    for table in ("metrics", "spectra"):
        keys = table_keys(sweep, table)
        assert len(keys) == len(set(keys)), f"duplicated rows in {table}"
        assert set(keys) == expected, f"{table}: missing {len(expected - set(keys))}, extra {len(set(keys) - expected)}"
    violations = con.execute(
        f"SELECT count(*) FROM read_parquet('{sweep}/tables/metrics/*.parquet', union_by_name = true) "  # v1 rows: no b0_perp
        "WHERE NOT bound_ok OR NOT coalesce(bound_perp_ok AND b0_perp <= b0 * (1 + 1e-12), true)").fetchone()[0]
    assert violations == 0, f"{violations} metrics rows break dist_k <= b0_perp <= b0"
    statuses = duckdb.connect().execute(
        f"SELECT member_id, status FROM read_parquet('{sweep}/tables/members/*.parquet')"
    ).fetchall()
    assert sorted(m for m, _ in statuses) == sorted(m.member_id for m in load_spec(spec_path).members())
    assert {s for _, s in statuses} == {"complete"}


def running_packs(sweep: Path, min_epoch: int = 0) -> dict[str, dict]:
    """pack_id -> its progress record, for the packs past `min_epoch` and not finished."""
    found = {}
    for path in (sweep / "progress").glob("*.json"):
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if min_epoch <= progress["epoch"] < progress["epochs"]:
            found[path.stem] = progress
    return found


def wait_until(condition, what: str, timeout: float = 180):
    """The first true value of `condition()`, polled; TimeoutError naming `what` after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise TimeoutError(what)


def wait_for_progress(sweep: Path, epoch: int, timeout: float = 120) -> dict:
    """The progress record of a pack of `sweep` that has reached `epoch` and is not finished."""
    return wait_until(
        lambda: next(iter(running_packs(sweep, epoch).values()), None), f"no pack of {sweep} reached epoch {epoch}", timeout
    )


def nc_ray_cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nc_ray.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
