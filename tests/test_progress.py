"""What a user watches while a sweep runs: the progress bar moves at every evaluation of every
pack (a real local Ray), Tune's trials carry readable names and short directory names, and
`nc-ray status --format json` gives scripts a stable object."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nc_ray.cli import main
from nc_ray.planning import pack_summary
from nc_ray.spec import load_spec
from nc_ray.store import SweepStore
from nc_ray.sweep import MemberProgress, run_sweep

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_the_bar_moves_at_every_evaluation_of_every_pack(ray_address, tmp_path, job_file, monkeypatch):
    spec_path = job_file("smoke", name="progress", **{"training.epochs": 6, "metrics.every": 2})
    spec = load_spec(spec_path)
    evaluations = spec.members()[0].evaluation_epochs()  # 0, 2, 4, 6
    seen: list[tuple[str, int, float]] = []  # (pack, epoch reported, bar position after it)
    on_result = MemberProgress.on_trial_result

    def recording(self, iteration, trials, trial, result, **info):
        on_result(self, iteration, trials, trial, result, **info)
        seen.append((trial.config["pack_id"], result["epoch"], self.bar.n))

    monkeypatch.setattr(MemberProgress, "on_trial_result", recording)
    store = run_sweep(spec_path, tmp_path, show_progress=True)

    packs = {pack_id: len(store.read_pack(pack_id).members) for pack_id in store.pack_ids()}
    assert len(packs) == 2
    for pack_id in packs:
        assert [epoch for pack, epoch, _ in seen if pack == pack_id] == evaluations
    positions = [n for _, _, n in seen]
    assert positions == sorted(positions)  # never backwards
    moved = [(pack, epoch) for (pack, epoch, n), before in zip(seen, [0.0, *positions]) if n > before]
    assert sorted(moved) == sorted((pack, epoch) for pack in packs for epoch in evaluations if epoch > 0)
    assert positions[-1] == pytest.approx(sum(packs.values()))


def test_the_bar_starts_where_a_resumed_sweep_stands(tmp_path):
    sweep = Path(shutil.copytree(FIXTURES / "interrupted_v1", tmp_path / "interrupted_v1"))
    progress = MemberProgress(SweepStore(str(sweep)), members_per_trial=4)
    progress.setup()
    # Two packs of 4 at epochs 600 and 400 of 4000, each with its saved state.
    assert progress.bar.n == pytest.approx(4 * 600 / 4000 + 4 * 400 / 4000)
    assert progress.bar.total == 8
    progress.on_experiment_end(trials=[])


def test_trials_are_named_by_their_packs(ray_address, tmp_path, job_file):
    spec_path = job_file("smoke", name="names", **{"training.epochs": 2, "metrics.every": 2})
    store = run_sweep(spec_path, tmp_path, show_progress=False)
    packs = [store.read_pack(pack_id) for pack_id in store.pack_ids()]
    experiment = tmp_path / "names" / "tune-000"
    assert sorted(p.name for p in experiment.iterdir() if p.is_dir()) == sorted(
        f"{p.pack_id}-d{p.first.depth}-w{p.first.width}-{p.first.loss}" for p in packs
    )
    state = "\n".join(p.read_text() for p in experiment.glob("experiment_state-*.json"))
    for pack in packs:
        assert json.dumps(pack_summary(pack))[1:-1] in state  # Tune's own record of the trial's name
        assert f"depth={pack.first.depth} width=8 loss=ce" in pack_summary(pack)


def status_json(sweep: Path, capsys) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["status", str(sweep), "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


def test_status_json_of_a_finished_sweep(tmp_path, capsys):
    sweep = Path(shutil.copytree(FIXTURES / "sweep_v1", tmp_path / "sweep_v1"))
    code, document = status_json(sweep, capsys)
    assert code == 0
    assert document == {
        "format": "nc-ray-status/1", "sweep": str(sweep),
        "counts": {"complete": 8, "running": 0, "pending": 0, "diverged": 0, "failed": 0}, "members": 8,
        "running_packs": [], "failed": [], "problems": [], "tables": f"{sweep}/tables",
    }


def test_status_json_of_an_interrupted_and_damaged_sweep(tmp_path, capsys):
    sweep = Path(shutil.copytree(FIXTURES / "interrupted_v1", tmp_path / "interrupted_v1"))
    code, document = status_json(sweep, capsys)
    assert code == 0
    assert document["counts"] == {"complete": 0, "running": 8, "pending": 0, "diverged": 0, "failed": 0}
    assert document["running_packs"] == [
        {"pack_id": "53ad1a2356460600", "epoch": 600, "epochs": 4000},
        {"pack_id": "b2f4fe7385395a5f", "epoch": 400, "epochs": 4000},
    ]
    damaged = sweep / "tables" / "metrics" / "53ad1a2356460600-e000200.parquet"
    damaged.write_bytes(damaged.read_bytes()[: len(damaged.read_bytes()) // 2])
    code, document = status_json(sweep, capsys)
    assert code == 1
    [problem] = document["problems"]
    assert problem["path"] == str(damaged) and problem["pack_id"] == "53ad1a2356460600"
    assert problem["repaired_by_resume"] is True and problem["kind"] and problem["detail"]
    assert document["counts"]["pending"] == 4 and document["counts"]["running"] == 4


def test_status_json_and_text_agree(tmp_path, capsys):
    sweep = Path(shutil.copytree(FIXTURES / "sweep_v1", tmp_path / "sweep_v1"))
    _, document = status_json(sweep, capsys)
    assert main(["status", str(sweep)]) == 0
    text = capsys.readouterr().out
    assert all(f"{n} {state}" in text for state, n in document["counts"].items())
    assert pq.read_table(f"{document['tables']}/members").num_rows == document["members"]
