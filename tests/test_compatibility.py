"""Sweep directories written by nc_ray 0.1.0 (schema version 1) are still read, resumed and extended.

The fixtures under tests/fixtures/ were written by that version (commit 549f7f5) with the specs
beside them, Tune's own directories left out: `sweep_v1` finished, `interrupted_v1` with its
driver SIGKILLed mid-run (its packs' saved training states and some evaluations on disk).
"""

import json
import shutil
from pathlib import Path

import duckdb
import pytest

from nc_ray.config import PackPlan
from nc_ray.planning import plan_sweep, sweep_status
from nc_ray.query import open_sweep
from nc_ray.spec import load_spec
from nc_ray.store import SweepStore
from nc_ray.sweep import resume_sweep, run_sweep
from tests.sweep_checks import assert_exactly_once

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def copy_of(tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(FIXTURES / name, tmp_path / name))

    return copy


def test_version_1_member_ids_and_packs_are_read_unchanged():
    spec = load_spec(FIXTURES / "sweep_v1.yaml")
    store = SweepStore(str(FIXTURES / "sweep_v1"))
    packs = [store.read_pack(p) for p in store.pack_ids()]
    assert {m.member_id for p in packs for m in p.members} == {m.member_id for m in spec.members()}
    for pack in packs:
        stored = json.loads((FIXTURES / "sweep_v1" / "packs" / f"{pack.pack_id}.json").read_text())
        assert [r["member_id"] for r in stored["members"]] == [m.member_id for m in pack.members]
        assert PackPlan.of(pack.members).pack_id == pack.pack_id
    plan = plan_sweep(spec, store)
    assert (plan.n_members, plan.n_finished, plan.packs) == (8, 8, [])


def test_version_1_tables_are_queried_with_the_new_columns_null(copy_of):
    sweep = copy_of("sweep_v1")
    with open_sweep(sweep) as session:
        counts = session.sql("SELECT (SELECT count(*) FROM members) m, (SELECT count(*) FROM planned) p, "
                             "(SELECT count(*) FROM metrics) r").to_pylist()[0]
        assert counts == {"m": 8, "p": 8, "r": 60}
        nulls = session.sql("SELECT count(b0_perp) AS b, count(objective) AS o, count(lr_schedule) AS s FROM metrics, "
                            "(SELECT lr_schedule FROM members LIMIT 1)").to_pylist()[0]
        assert nulls == {"b": 0, "o": 0, "s": 0}
        assert session.sql("SELECT count(*) FROM metrics WHERE NOT bound_ok").column(0)[0].as_py() == 0
    assert sweep_status(str(sweep)).counts["complete"] == 8


def test_an_interrupted_version_1_sweep_is_resumed(ray_address, copy_of):
    sweep = copy_of("interrupted_v1")
    before = sweep_status(str(sweep))
    assert before.counts["running"] == 8
    resume_sweep(sweep, show_progress=False)
    assert sweep_status(str(sweep)).counts["complete"] == 8
    assert_exactly_once(sweep, FIXTURES / "interrupted_v1.yaml")
    # The version-1 rows stand; the rows written after the resume carry the version-2 columns.
    epochs_with_v2 = duckdb.connect().execute(
        f"SELECT min(epoch) FROM read_parquet('{sweep}/tables/metrics/*.parquet', union_by_name = true) WHERE b0_perp IS NOT NULL"
    ).fetchone()[0]
    assert 400 <= epochs_with_v2 <= 800


def test_a_finished_version_1_sweep_is_extended(ray_address, copy_of, tmp_path):
    sweep = copy_of("sweep_v1")
    spec = (FIXTURES / "sweep_v1.yaml").read_text().replace("seed: [0, 1]", "seed: [0, 1, 2]")
    extended = tmp_path / "sweep_v1.yaml"
    extended.write_text(spec)
    before = {p.name: p.stat().st_mtime_ns for p in (sweep / "tables").rglob("*.parquet")}
    run_sweep(extended, tmp_path, show_progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (sweep / "tables").rglob("*.parquet")}
    assert all(after[name] == mtime for name, mtime in before.items()), "version-1 members were retrained"
    assert sweep_status(str(sweep)).counts["complete"] == 12
    assert_exactly_once(sweep, extended)
