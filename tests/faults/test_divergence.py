"""A member diverging in a sweep (a huge learning rate) is flagged `diverged` with its last finite
evaluation, gets no rows after that, and its pack-mates' rows equal those of a sweep without it."""

import duckdb
import pytest

from nc_ray.spec import load_spec
from nc_ray.sweep import run_sweep


def rows(sweep, table: str, columns: str) -> dict:
    result = duckdb.connect().execute(f"SELECT {columns} FROM read_parquet('{sweep}/tables/{table}/*.parquet')")
    names = [d[0] for d in result.description]
    return {(row[0], *row[1:3]): dict(zip(names, row)) for row in result.fetchall()}


def test_diverging_members_are_flagged_and_leave_pack_mates_alone(ray_address, tmp_path, job_file):
    calm = job_file("smoke", name="calm", **{"grid.lr": [0.05], "resources.pack_size": 8})
    wild = job_file("smoke", name="wild", **{"grid.lr": [0.05, 1.0e4], "resources.pack_size": 8})
    run_sweep(calm, tmp_path, show_progress=False)
    run_sweep(wild, tmp_path, show_progress=False)

    members = rows(tmp_path / "wild", "members", "member_id, lr, pack_id, status, diverged_epoch, final_epoch, train_loss")
    diverged = {key[0] for key, m in members.items() if m["status"] == "diverged"}
    huge_lr = {m.member_id for m in load_spec(wild).members() if m.lr == 1.0e4}
    assert diverged == huge_lr and len(diverged) == 8
    assert len({members[key]["pack_id"] for key in members}) == 2, "each pack mixes calm and diverging members"
    for key, member in members.items():
        if key[0] in diverged:
            assert member["diverged_epoch"] >= 1 and member["final_epoch"] == 0  # the initial evaluation was finite
            assert member["train_loss"] is not None and member["train_loss"] < 10

    columns = "member_id, epoch, layer, train_loss, tcv_rel, dist_k, b0, grad_norm, sv_max"
    wild_metrics, calm_metrics = rows(tmp_path / "wild", "metrics", columns), rows(tmp_path / "calm", "metrics", columns)
    assert {key[1] for key in wild_metrics if key[0] in diverged} == {0}, "no rows after divergence"
    mates = {key: row for key, row in wild_metrics.items() if key[0] not in diverged}
    assert mates.keys() == calm_metrics.keys()
    for key, row in mates.items():
        for name in ("train_loss", "tcv_rel", "dist_k", "b0", "grad_norm", "sv_max"):
            assert row[name] == pytest.approx(calm_metrics[key][name], rel=1e-6, abs=1e-9), (key, name)
