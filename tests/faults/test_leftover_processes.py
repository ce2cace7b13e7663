"""A driver SIGKILLed leaves nothing that goes on: the embedded Ray it started ends with it
(`nc_ray.reaper`), and no trial of it writes into the sweep once another driver holds the sweep
(the fence token of `SweepLock`)."""

import os
import pickle
import signal

import pytest

from nc_ray.reaper import descendants, processes
from nc_ray.store import SweepFencedError, SweepLock, SweepStore
from tests.sweep_checks import LONG, nc_ray_cli, wait_for_progress, wait_until


def gone(pid: int, started: int) -> bool:
    """Whether a process has ended (or is a zombie no one reaps): no longer running as itself."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return True
    fields = text[text.rindex(b")") + 2 :].split()
    return fields[0] == b"Z" or int(fields[19]) != started


def writes_since(sweep, moment: float) -> list[str]:
    return sorted(str(p) for p in sweep.rglob("*") if p.is_file() and p.stat().st_mtime > moment and p.name != "driver.json" and p.name != ".lock")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="the reaper reads /proc (Linux)")
def test_an_embedded_ray_ends_with_its_driver(tmp_path, job_file):
    spec_path = job_file("smoke", name="orphans", **LONG)
    sweep = tmp_path / "orphans"
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = nc_ray_cli("sweep", str(spec_path), "--storage", str(tmp_path), env=environment)  # no --address: embedded Ray
    try:
        wait_for_progress(sweep, 100, timeout=240)
        family = descendants(driver.pid, processes())
        assert len(family) >= 4, family  # GCS, raylet, agents, trial workers, the reaper
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=60)
    finally:
        driver.kill()

    def alive() -> list[int]:
        return sorted(pid for pid, started in family.items() if not gone(pid, started))

    wait_until(lambda: not alive(), "the embedded Ray's processes should end with their driver", timeout=20)


def test_a_trial_of_a_driver_that_lost_the_sweep_writes_nothing(tmp_path):
    store = SweepStore(str(tmp_path / "sweep"))
    lock = SweepLock(store)
    lock.__enter__()
    trial_store = pickle.loads(pickle.dumps(store))  # what a trial holds: the store with its driver's fence
    trial_store.write_table("metrics", "p-e000000", [{"member_id": "m", "pack_id": "p", "epoch": 0, "layer": 1}])
    lock._release()  # the driver is SIGKILLed: the kernel drops its lock, its trials go on
    with SweepLock(SweepStore(str(tmp_path / "sweep"))):  # the next driver takes the sweep
        for write in (
            lambda: trial_store.write_table("metrics", "p-e000003", [{"member_id": "m", "pack_id": "p", "epoch": 3, "layer": 1}]),
            lambda: trial_store.write_json("progress/p.json", {"epoch": 3}),
            lambda: trial_store.delete("tables/metrics/p-e000000.parquet"),
        ):
            with pytest.raises(SweepFencedError, match="taken over by another driver"):
                write()
    assert sorted(p.name for p in (tmp_path / "sweep").rglob("*") if p.is_file()) == [".lock", "driver.json", "p-e000000.parquet"]


def test_no_trial_of_a_killed_driver_writes_after_the_next_driver_takes_the_sweep(ray_address, tmp_path, job_file):
    """On a joined cluster the trials of a SIGKILLed driver run until the cluster notices; from the
    moment the next driver holds the sweep, none of their writes lands."""
    import time

    spec_path = job_file("smoke", name="fenced", **LONG)
    sweep = tmp_path / "fenced"
    driver = nc_ray_cli("sweep", str(spec_path), "--storage", str(tmp_path), "--address", ray_address)
    try:
        wait_for_progress(sweep, 200)
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=60)
    finally:
        driver.kill()
    with SweepLock(SweepStore(str(sweep))):
        taken = time.time()
        time.sleep(5)  # longer than the 2-4 s such trials were seen writing
        assert writes_since(sweep, taken) == []
