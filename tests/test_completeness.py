"""The completeness invariant (`nc_ray.integrity`) checked and repaired: any damage to a finished
sweep's table files is named by `nc-ray status` and `nc-ray doctor`, and a plain `resume` brings
back exactly the rows of the untouched run.

One small finished sweep is made per module (packs that mix calm and diverging members); each test
damages a copy of it. The property-based test tries 8 damages per run, 60 with
NC_RAY_HEAVY_FAULTS=1. The check's own rules are also tested on synthetic sweeps, without Ray."""

import os
import re
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nc_ray.cli import main
from nc_ray.integrity import check_sweep
from nc_ray.planning import sweep_status
from nc_ray.schema import TABLES
from nc_ray.store import SweepStore, reads_whole
from nc_ray.sweep import resume_sweep, run_sweep
from tests.conftest import REPO
from tests.faults import damage
from tests.test_query import DIVERGED, build_sweep, member

N_MEMBERS = 16


@pytest.fixture(scope="module")
def finished(ray_address, tmp_path_factory) -> Path:
    """A finished smoke sweep of 16 members in 2 packs of 8, each pack half calm, half diverging (lr 1e4)."""
    job = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
    job.update(name="whole")
    job["grid"]["lr"] = [0.05, 1.0e4]
    job["resources"]["pack_size"] = 8
    directory = tmp_path_factory.mktemp("finished")
    (directory / "whole.yaml").write_text(yaml.safe_dump(job))
    run_sweep(directory / "whole.yaml", directory, show_progress=False)
    return directory / "whole"


def rows(sweep: Path, table: str) -> list[tuple]:
    """Every row of a table, every column, sorted."""
    return duckdb.connect().execute(f"SELECT * FROM read_parquet('{sweep}/tables/{table}/*.parquet') ORDER BY ALL").fetchall()


@pytest.fixture(scope="module")
def reference(finished) -> dict[str, list[tuple]]:
    assert check_sweep(SweepStore(str(finished))).problems == []
    assert sweep_status(str(finished)).counts == {"complete": 8, "diverged": 8, "failed": 0, "running": 0, "pending": 0}
    return {table: rows(finished, table) for table in ("metrics", "spectra")}


def copy_of(finished: Path, where: Path) -> Path:
    return Path(shutil.copytree(finished, where / "whole"))


def assert_restored(sweep: Path, reference: dict[str, list[tuple]]) -> None:
    """The rows of the untouched run, every key once, no problem left, every member finished."""
    for table, expected in reference.items():
        assert rows(sweep, table) == expected, table
    status = sweep_status(str(sweep))
    assert status.problems == [] and status.counts["complete"] + status.counts["diverged"] == N_MEMBERS, status


def table_of(path: Path) -> str:
    return path.parent.name


def table_file(sweep: Path, table: str, index: int) -> Path:
    return sorted((sweep / "tables" / table).glob("*.parquet"))[index]


DAMAGES = {
    "deleted metrics file": ("metrics", 1, damage.delete, "missing"),
    "deleted spectra file": ("spectra", 4, damage.delete, "missing"),
    "truncated metrics file": ("metrics", 2, damage.truncate, "unreadable"),
    "garbage spectra file": ("spectra", 0, damage.garbage, "unreadable"),
    "corrupt page, metrics": ("metrics", 5, lambda p: damage.corrupt_page(p, "tcv_rel"), "unreadable"),
    "corrupt page, members": ("members", 0, lambda p: damage.corrupt_page(p, "train_loss"), "unreadable"),
    "corrupt page, spectra": ("spectra", 2, lambda p: damage.corrupt_page(p, "singular_values"), "unreadable"),
    "foreign schema over a members file": ("members", 1, damage.foreign, "foreign"),
    "copied onto another epoch": ("metrics", 0, lambda p: damage.copy_onto(p.with_name(p.name.replace("-e000000", "-e000003")), p), "misplaced"),
    "copied onto another pack": ("members", 0, lambda p: damage.copy_onto(p.parent / sorted(p.parent.iterdir())[1].name, p), "misplaced"),
}


@pytest.mark.parametrize("case", DAMAGES, ids=list(DAMAGES))
def test_status_and_doctor_name_the_damage_and_a_plain_resume_repairs_it(case, finished, reference, tmp_path, capsys):
    table, index, harm, kind = DAMAGES[case]
    sweep = copy_of(finished, tmp_path)
    path = table_file(sweep, table, index)
    harm(path)
    assert main(["status", str(sweep)]) == 1
    out = capsys.readouterr().out
    assert f"{kind}: {path}" in out and "pending" in out, out
    assert f"{N_MEMBERS} complete" not in out and f"{N_MEMBERS // 2} complete" not in out, out
    assert main(["doctor", str(sweep)]) == 1
    assert f"{kind}: {path}" in capsys.readouterr().out

    resume_sweep(sweep, show_progress=False)  # no `doctor --quarantine` first
    assert_restored(sweep, reference)
    if kind != "missing":
        assert (sweep / "quarantine" / table / path.name).is_file(), "the damaged file is kept aside"
    assert main(["doctor", str(sweep)]) == 0


def test_files_no_pack_writes_are_moved_aside_by_resume(finished, reference, tmp_path, capsys):
    """A copy under a name no pack writes (its rows would count twice) and a foreign file under a
    name of its own: resume moves both into quarantine/ and retrains nothing."""
    sweep = copy_of(finished, tmp_path)
    source = table_file(sweep, "metrics", 0)
    copy = source.with_name(source.name.replace("-e000000", "-e000001"))  # epoch 1 is no evaluation epoch
    damage.copy_onto(source, copy)
    stranger = sweep / "tables" / "spectra" / "notes.parquet"
    damage.foreign(stranger)
    assert main(["status", str(sweep)]) == 1
    out = capsys.readouterr().out
    assert f"stray: {copy}" in out and f"foreign: {stranger}" in out and f"8 complete, 8 diverged" in out, out
    resume_sweep(sweep, show_progress=False)
    assert_restored(sweep, reference)
    assert {p.name for p in (sweep / "quarantine").rglob("*.parquet")} == {copy.name, stranger.name}
    assert len(list(sweep.glob("tune-*"))) == 1, "nothing was retrained"


# -------------------------------------------------------------------- the invariant, property-based

HARMS = ("delete", "truncate", "copy onto another name", "corrupt a page")


@settings(max_examples=60 if os.environ.get("NC_RAY_HEAVY_FAULTS") == "1" else 8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damage_to_any_table_file_is_found_and_resume_restores_the_rows(finished, reference, tmp_path_factory, data):
    sweep = copy_of(finished, tmp_path_factory.mktemp("damaged"))
    files = sorted(p for table in TABLES for p in (sweep / "tables" / table).glob("*.parquet"))
    path = data.draw(st.sampled_from(files), label="file")
    harm = data.draw(st.sampled_from(HARMS), label="harm")
    before = pq.read_table(path)
    if harm == "delete":
        damage.delete(path)
    elif harm == "truncate":
        damage.truncate(path, data.draw(st.floats(0.0, 0.99), label="kept"))
    elif harm == "copy onto another name":
        # Another file of the table, or the name of another epoch of the same pack: an evaluation epoch or not.
        other_epochs = {re.sub(r"-e\d{6}\.parquet$", f"-e{e:06d}.parquet", path.name) for e in (0, 2, 3, 6)} if table_of(path) != "members" else set()
        names = sorted(({f.name for f in path.parent.iterdir()} | other_epochs) - {path.name})
        target = path.parent / data.draw(st.sampled_from(names), label="onto")
        before = pq.read_table(target) if target.exists() else None
        damage.copy_onto(path, target)
        path = target
    else:
        column = data.draw(st.sampled_from(before.column_names), label="column")
        damage.corrupt_page(path, column, data.draw(st.floats(0.0, 1.0), label="at"))

    status = sweep_status(str(sweep))
    named = any(p.path == str(path) for p in status.problems)
    unfinished = status.counts["complete"] + status.counts["diverged"] < N_MEMBERS
    harmless = path.exists() and reads_whole(str(path)) is None and before is not None and pq.read_table(path).equals(before)
    assert named or unfinished or harmless, (harm, path, status)

    resume_sweep(sweep, show_progress=False)
    assert_restored(sweep, reference)


# ------------------------------------------------------------------ the check's rules, without Ray


def test_a_synthetic_sweep_passes_the_check(tmp_path):
    """Complete, diverged (rows at epoch 0 only), failed and unfinished members in one pack: no problem."""
    check = check_sweep(SweepStore(str(build_sweep(tmp_path / "s"))))
    assert check.problems == [] and len(check.statuses) == 20


def test_rows_after_a_members_stop_epoch_and_rows_it_lacks_are_found(tmp_path):
    root = build_sweep(tmp_path / "s")
    store = SweepStore(str(root))
    members = pq.read_table(root / "tables/members/p0.parquet")
    stopped = member(2, 1e-3, 0).member_id
    members = members.set_column(members.schema.get_field_index("stopped_epoch"), "stopped_epoch",
                                 pa.array([0 if m == stopped else None for m in members["member_id"].to_pylist()], pa.int64()))
    pq.write_table(members, root / "tables/members/p0.parquet")
    problems = check_sweep(store).problems
    assert [(p.kind, Path(p.path).name) for p in problems] == [("misplaced", "p0-e000010.parquet"), ("misplaced", "p0-e000010.parquet")]
    assert all("stopped or diverged before epoch 10" in p.detail and p.pack_id == "p0" for p in problems)

    diverged = member(DIVERGED[1], DIVERGED[0], DIVERGED[2]).member_id
    spectra = pq.read_table(root / "tables/spectra/p0-e000000.parquet")
    pq.write_table(spectra.filter(pa.compute.not_equal(spectra["member_id"], diverged)), root / "tables/spectra/p0-e000000.parquet")
    lacking = [p for p in check_sweep(store).problems if p.kind == "missing"]
    assert [(Path(p.path).name, p.detail) for p in lacking] == [("p0-e000000.parquet", f"it lacks {DIVERGED[1]} rows of finished members")]


def test_an_unfinished_pack_lacking_an_evaluated_epochs_file_is_damaged(tmp_path):
    """A pack with no members rows yet whose progress marker names epoch 10: its epoch-0 file must exist."""
    root = build_sweep(tmp_path / "s")
    store = SweepStore(str(root))
    (root / "tables/members/p0.parquet").unlink()
    assert check_sweep(store).problems == []  # no progress marker: nothing promised yet
    store.write_json("progress/p0.json", {"epoch": 10, "epochs": 10})
    assert check_sweep(store).problems == []
    (root / "tables/metrics/p0-e000000.parquet").unlink()
    [problem] = check_sweep(store).problems
    assert problem.kind == "missing" and problem.pack_id == "p0" and "which the pack has evaluated" in problem.detail
    status = sweep_status(store)
    assert status.counts["pending"] == 21 and status.running == {}  # a damaged pack is not reported as running
