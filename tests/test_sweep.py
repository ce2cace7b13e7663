"""The sweep service on a real local Ray: rows exactly once through kills, resume and extension."""

import json
import os
import signal
from pathlib import Path

import duckdb
import numpy as np
import pytest

import nc_ray
from nc_ray.metrics import member_metrics
from nc_ray.spec import load_spec
from nc_ray.store import SweepBusyError, SweepLock, SweepStore
from nc_ray.planning import sweep_status
from nc_ray.sweep import resume_sweep, run_sweep
from tests.sweep_checks import (
    LONG,
    assert_exactly_once,
    expected_keys,
    nc_ray_cli,
    table_keys,
    wait_for_progress,
)


def sweep_killing_one_trial(spec_path: Path, sweep: Path, ray_address: str) -> tuple[int, str]:
    """`nc-ray sweep` with one trial's worker process SIGKILLed mid-run: (exit code, output)."""
    driver = nc_ray_cli("sweep", str(spec_path), "--storage", str(sweep.parent), "--address", ray_address)
    try:
        progress = wait_for_progress(sweep, 300)
        os.kill(progress["pid"], signal.SIGKILL)
        out, _ = driver.communicate(timeout=300)
    finally:
        driver.kill()
    return driver.returncode, out


def test_smoke_sweep_tables(ray_address, tmp_path, job_file):
    spec_path = job_file("smoke")
    store = run_sweep(spec_path, tmp_path, show_progress=False)
    sweep = tmp_path / "smoke"
    assert store.uri == str(sweep)
    assert_exactly_once(sweep, spec_path)
    members = load_spec(spec_path).members()
    n_rows = sum(len(m.evaluation_epochs()) * m.depth for m in members)
    assert n_rows == 60
    con = duckdb.connect()
    metrics = con.sql(f"SELECT * FROM read_parquet('{sweep}/tables/metrics/*.parquet')").to_arrow_table()
    assert metrics.num_rows == n_rows
    assert all(metrics["bound_ok"].to_pylist())
    for column in ("dataset", "arch", "depth", "width", "loss", "weight_decay", "lr", "seed", "tcv_rel", "nc1", "b0", "dist_k", "rank_rel_1e2"):
        assert column in metrics.column_names
    members_table = con.sql(f"SELECT * FROM read_parquet('{sweep}/tables/members/*.parquet')").to_arrow_table()
    assert members_table.num_rows == 8
    assert set(members_table["device"].to_pylist()) == {"cpu"}
    assert all(v == nc_ray.__version__ for v in members_table["nc_ray_version"].to_pylist())
    assert min(members_table["train_acc"].to_pylist()) > 0.5
    status = sweep_status(str(sweep))
    assert status.counts == {"complete": 8, "diverged": 0, "failed": 0, "running": 0, "pending": 0}


def test_load_member_reproduces_its_rows(ray_address, tmp_path, job_file):
    spec_path = job_file("smoke", **{"grid.seed": [0]})
    run_sweep(spec_path, tmp_path, show_progress=False)
    sweep = tmp_path / "smoke"
    member = load_spec(spec_path).members()[-1]
    model, data = nc_ray.load_member(str(sweep), member.member_id)
    assert data.x_metric.shape == data.x_train.shape
    recomputed = member_metrics(model, data.x_metric, data.y_metric, weight_decay=member.weight_decay, loss=member.loss)
    con = duckdb.connect()
    stored = con.execute(
        f"SELECT * FROM read_parquet('{sweep}/tables/metrics/*.parquet') WHERE member_id = ? AND epoch = ? ORDER BY layer",
        [member.member_id, member.epochs],
    ).fetchall()
    stored = [dict(zip([d[0] for d in con.description], row)) for row in stored]
    assert len(stored) == len(recomputed) == member.depth
    for row, again in zip(stored, recomputed):
        for name in ("dist_k", "tcv", "tcv_rel", "nc1", "grad_norm", "b0", "stable_rank"):
            assert row[name] == pytest.approx(again[name], rel=1e-9, abs=1e-12), name
        assert row["train_loss"] == pytest.approx(again["loss"], rel=1e-6)


def test_extending_a_finished_sweep_trains_only_new_members(ray_address, tmp_path, job_file):
    first = job_file("smoke", **{"grid.seed": [0, 1]})
    run_sweep(first, tmp_path, show_progress=False)
    sweep = tmp_path / "smoke"
    before = {p.name: p.stat().st_mtime_ns for p in (sweep / "tables").rglob("*.parquet")}
    extended = job_file("smoke", **{"grid.seed": [0, 1, 2]})
    dry = nc_ray_cli("sweep", str(extended), "--storage", str(tmp_path), "--dry-run")
    out, _ = dry.communicate(timeout=120)
    assert dry.returncode == 0, out
    assert "12 members, 8 already finished, 2 packs" in out
    run_sweep(extended, tmp_path, show_progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in (sweep / "tables").rglob("*.parquet")}
    assert all(after[name] == mtime for name, mtime in before.items()), "finished members were rewritten"
    new_files = set(after) - set(before)
    new_members = {m.member_id for m in load_spec(extended).members()} - {m.member_id for m in load_spec(first).members()}
    trained = {k[0] for k in table_keys(sweep, "metrics")} - {k[0] for k in expected_keys(first)}
    assert trained == new_members and len(new_members) == 4
    packs = [json.loads(p.read_text()) for p in (sweep / "packs").glob("*.json")]
    new_packs = {p["pack_id"] for p in packs if {m["member_id"] for m in p["members"]} <= new_members}
    assert len(new_packs) == 2 and {name[:16] for name in new_files} == new_packs
    assert (sweep / "spec.yaml").read_bytes() == extended.read_bytes()  # the spec of the latest run, as run
    assert_exactly_once(sweep, extended)


def test_killed_trial_is_retried_and_rows_land_once(ray_address, tmp_path, job_file):
    spec_path = job_file("smoke", name="trialkill", **LONG)
    sweep = tmp_path / "trialkill"
    returncode, out = sweep_killing_one_trial(spec_path, sweep, ray_address)
    assert returncode == 0, out
    assert_exactly_once(sweep, spec_path)
    tune_dirs = list((sweep / "tune-000").glob("*/error.txt"))
    assert tune_dirs, "the killed trial should have left Tune's error record before its retry"


def kill_driver_then_resume(spec_path: Path, sweep: Path, ray_address: str) -> str:
    """`nc-ray sweep` SIGKILLed once a pack has reached epoch 500, then `nc-ray resume`; its output."""
    driver = nc_ray_cli("sweep", str(spec_path), "--storage", str(sweep.parent), "--address", ray_address)
    try:
        wait_for_progress(sweep, 500)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=60)
    assert sweep_status(str(sweep)).counts["complete"] < 8
    resume = nc_ray_cli("resume", str(sweep), "--address", ray_address)
    out, _ = resume.communicate(timeout=300)
    assert resume.returncode == 0, out
    return out


def test_driver_sigkill_then_resume(ray_address, tmp_path, job_file):
    spec_path = job_file("smoke", name="driverkill", **LONG)
    sweep = tmp_path / "driverkill"
    out = kill_driver_then_resume(spec_path, sweep, ray_address)
    assert "8 complete" in out
    # nc-ray's summary, not Tune's console output (its experiment box, results path, write log)
    for tune_output in ("Configuration for experiment", "View detailed results", "Wrote the latest version"):
        assert tune_output not in out, out
    assert_exactly_once(sweep, spec_path)


def test_second_driver_on_the_same_directory_is_refused(ray_address, tmp_path, job_file):
    spec_path = job_file("smoke")
    store = SweepStore(str(tmp_path / "smoke"))
    with SweepLock(store):
        with pytest.raises(SweepBusyError, match="in use by another nc-ray"):
            run_sweep(spec_path, tmp_path, show_progress=False)
        cli = nc_ray_cli("sweep", str(spec_path), "--storage", str(tmp_path))
        out, _ = cli.communicate(timeout=120)
    assert cli.returncode == 2 and "in use by another nc-ray" in out
    assert not (tmp_path / "smoke" / "tables").exists()


def test_invalid_spec_fails_before_anything_is_written(tmp_path, job_file):
    spec_path = job_file("smoke", **{"model.depth": 1})
    cli = nc_ray_cli("sweep", str(spec_path), "--storage", str(tmp_path / "store"))
    out, _ = cli.communicate(timeout=120)
    assert cli.returncode == 2
    assert str(spec_path) in out and "model.depth" in out and "1" in out
    assert not (tmp_path / "store").exists()


def test_optuna_mode_concentrates_trials_and_keeps_its_study(ray_address, tmp_path, job_file):
    spec_path = job_file(
        "smoke", name="optuna",
        **{"grid.weight_decay": None, "grid.depth": [2, 3], "training.epochs": 4, "metrics.every": 4,
           "search": {"mode": "optuna", "num_samples": 3, "weight_decay": {"low": 1e-4, "high": 1e-1},
                      "objective": {"metric": "tcv_rel", "layer": "penultimate", "target": 0.01}}},
    )
    run_sweep(spec_path, tmp_path, show_progress=False)
    sweep = tmp_path / "optuna"
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="optuna", storage=JournalStorage(JournalFileBackend(str(sweep / "optuna.journal"))))
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 3
    assert all(np.isfinite(t.value) for t in finished)
    members = duckdb.connect().execute(f"SELECT depth, weight_decay, seed FROM read_parquet('{sweep}/tables/members/*.parquet')").fetchall()
    assert len(members) == 6  # 3 trials x 2 seeds
    assert {round(t.params["weight_decay"], 12) for t in finished} == {round(w, 12) for _, w, _ in members}


SEARCH = {"grid.weight_decay": None, "grid.depth": [2], "training.epochs": 4, "metrics.every": 2,
          "search": {"mode": "optuna", "num_samples": 2, "weight_decay": {"low": 1e-4, "high": 1e-1},
                     "objective": {"metric": "tcv_rel", "layer": "penultimate", "target": 0.01}}}


def test_optuna_resume_trains_damaged_packs_again_without_new_trials(ray_address, tmp_path, job_file):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from nc_ray.integrity import check_sweep

    spec_path = job_file("smoke", name="optuna_damage", **SEARCH)
    run_sweep(spec_path, tmp_path, show_progress=False)
    sweep = tmp_path / "optuna_damage"
    store = SweepStore(str(sweep))
    packs = [store.read_pack(pack_id) for pack_id in store.pack_ids()]
    expected = {(m.member_id, e, layer) for p in packs for m in p.members for e in m.evaluation_epochs() for layer in (1, 2)}
    assert len(packs) == 2 and set(table_keys(sweep, "metrics")) == expected
    damaged = sorted((sweep / "tables" / "metrics").glob("*.parquet"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])  # a torn file
    assert check_sweep(store).damaged_packs == {damaged.name[:16]}
    dry = nc_ray_cli("sweep", str(spec_path), "--storage", str(tmp_path), "--dry-run")
    out, _ = dry.communicate(timeout=120)
    assert dry.returncode == 0 and "2 complete in the sweep's study, 0 to run" in out and "damaged packs to train again: 1" in out, out

    resume = nc_ray_cli("resume", str(sweep), "--address", ray_address)
    out, _ = resume.communicate(timeout=300)
    assert resume.returncode == 0, out
    check = check_sweep(store)
    assert not check.problems and set(check.statuses.values()) == {"complete"}
    for table in ("metrics", "spectra"):
        keys = table_keys(sweep, table)
        assert len(keys) == len(set(keys)) and set(keys) == expected, table
    assert any(path.name.startswith(damaged.stem) for path in (sweep / "quarantine").rglob("*"))
    study = optuna.load_study(study_name="optuna_damage",
                              storage=JournalStorage(JournalFileBackend(str(sweep / "optuna.journal"))))
    assert len(study.trials) == 2  # the search was not run again: only the damaged pack trained
    assert json.loads((sweep / "sweep.json").read_text())["tune_runs"] == ["tune-000", "tune-001"]

    # `sweep` run again: the study has its trials, so no search; the damaged pack trains again.
    damaged.write_bytes(b"not parquet")
    run_sweep(spec_path, tmp_path, show_progress=False)
    check = check_sweep(store)
    assert not check.problems and set(check.statuses.values()) == {"complete"} and len(check.statuses) == 4
    assert len(study.trials) == 2 and len(store.pack_ids()) == 2
    assert json.loads((sweep / "sweep.json").read_text())["tune_runs"] == ["tune-000", "tune-001", "tune-002"]

    # More trials asked for: the search runs the missing ones, at new points.
    more = job_file("smoke", name="optuna_damage", **{**SEARCH, "search": {**SEARCH["search"], "num_samples": 4}})
    run_sweep(more, tmp_path, show_progress=False)
    check = check_sweep(store)
    assert not check.problems and set(check.statuses.values()) == {"complete"} and len(check.statuses) == 8
    assert len(study.trials) == 4 and len(store.pack_ids()) == 4
    assert len({round(t.params["weight_decay"], 12) for t in study.trials}) == 4


def test_trial_failing_past_max_failures_is_reported_then_resumed(ray_address, tmp_path, job_file):
    spec_path = job_file("smoke", name="failkill", **LONG, **{"resources.max_failures": 0})
    sweep = tmp_path / "failkill"
    returncode, out = sweep_killing_one_trial(spec_path, sweep, ray_address)
    assert returncode == 1, out  # nc-ray exits non-zero while members have failed
    status = sweep_status(str(sweep))
    assert status.counts["failed"] == 4 and status.counts["complete"] == 4
    assert all("Error" in message for message in status.errors.values())
    assert "4 failed" in out
    resume = nc_ray_cli("resume", str(sweep), "--address", ray_address)
    out, _ = resume.communicate(timeout=300)
    assert resume.returncode == 0, out
    assert sweep_status(str(sweep)).counts == {"complete": 8, "diverged": 0, "failed": 0, "running": 0, "pending": 0}
    assert_exactly_once(sweep, spec_path)


def test_a_damaged_members_file_is_reported_and_healed_by_resume(ray_address, tmp_path, job_file):
    spec_path = job_file("smoke")
    run_sweep(spec_path, tmp_path, show_progress=False)
    sweep = tmp_path / "smoke"
    damaged = sorted((sweep / "tables" / "members").glob("*.parquet"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated after publication
    status = sweep_status(str(sweep))
    assert status.unreadable == [str(damaged)]
    assert status.counts["complete"] == 4 and status.counts["pending"] == 4  # a damaged pack is retrained: pending
    cli = nc_ray_cli("status", str(sweep))
    out, _ = cli.communicate(timeout=120)
    assert str(damaged) in out and "4 complete" in out
    resume_sweep(sweep, show_progress=False)  # retrains that pack only, rewriting its files
    assert sweep_status(str(sweep)).unreadable == []
    assert json.loads((sweep / "sweep.json").read_text())["tune_runs"] == ["tune-000", "tune-001"]
    assert_exactly_once(sweep, spec_path)


def test_schedule_and_stop_rule_killed_and_resumed_give_the_rows_of_an_uninterrupted_run(ray_address, tmp_path, job_file):
    """A cosine schedule with warm-up and a stop rule that stops some members early (λ = 1e-2 ones
    reach stationarity 0.45 at different evaluations; λ = 1e-3 ones never do): the driver killed
    mid-run, then `nc-ray resume`, ends with exactly the rows of a run never interrupted."""
    changes = {**LONG, "training.schedule": {"kind": "cosine", "warmup_epochs": 10}, "training.stop": {"stationarity": 0.45}}
    straight = job_file("smoke", name="straight", **changes)
    run_sweep(straight, tmp_path, show_progress=False)
    killed = job_file("smoke", name="killed", **changes)
    sweep = tmp_path / "killed"
    kill_driver_then_resume(killed, sweep, ray_address)

    def rows(name: str, table: str) -> list[tuple]:
        con = duckdb.connect()
        result = con.execute(f"SELECT * EXCLUDE (pack_id) FROM read_parquet('{tmp_path / name}/tables/{table}/*.parquet') ORDER BY ALL")
        return result.fetchall()

    for table in ("metrics", "spectra"):
        assert rows("killed", table) == rows("straight", table), table
    members = duckdb.connect().execute(
        f"SELECT member_id, weight_decay, stopped_epoch, final_epoch, epochs_run FROM read_parquet('{sweep}/tables/members/*.parquet')"
    ).fetchall()
    stopped = [m for m in members if m[2] is not None]
    assert stopped and all(m[1] == 1e-2 and m[2] == m[3] == m[4] < 1500 for m in stopped)
    assert all(m[3] == 1500 for m in members if m[1] == 1e-3)
    last_epochs = dict(duckdb.connect().execute(
        f"SELECT member_id, max(epoch) FROM read_parquet('{sweep}/tables/metrics/*.parquet') GROUP BY ALL").fetchall())
    assert all(last_epochs[m[0]] == m[3] for m in members)  # no rows after a member stopped
    assert_exactly_once(sweep, killed)
