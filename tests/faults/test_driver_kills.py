"""The driver SIGKILLed at chosen points (scheduling, Tune's state save, a Parquet write, mid-trial)
and, with NC_RAY_HEAVY_FAULTS=1, at random times; each time `nc-ray resume` finishes the sweep
with every (member_id, epoch, layer) row exactly once."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nc_ray.planning import sweep_status
from tests.sweep_checks import LONG, assert_exactly_once, nc_ray_cli, wait_for_progress

DRIVER = Path(__file__).with_name("driver.py")


def killed_at(point: str, ray_address: str, *args: str) -> None:
    """Run `nc-ray ARGS` as a driver that dies at POINT; fail unless it died by SIGKILL."""
    driver = subprocess.run(
        [sys.executable, str(DRIVER), point, ray_address, *args],
        capture_output=True, text=True, timeout=300,
    )
    assert driver.returncode == -signal.SIGKILL, f"the driver did not die at {point}:\n{driver.stdout}\n{driver.stderr}"


def resume_to_the_end(sweep: Path, ray_address: str) -> str:
    resume = nc_ray_cli("resume", str(sweep), "--address", ray_address)
    out, _ = resume.communicate(timeout=600)
    assert resume.returncode == 0, out
    return out


def test_driver_killed_at_each_point_then_resumed(ray_address, tmp_path, job_file):
    spec_path = job_file("smoke", name="driverkills", **LONG)
    sweep = tmp_path / "driverkills"
    killed_at("schedule:2", ray_address, "sweep", str(spec_path), "--storage", str(tmp_path))
    killed_at("parquet:3", ray_address, "resume", str(sweep))
    torn = list(sweep.glob("tables/*/.*.torn.tmp"))
    assert torn, "the worker should have left a torn temporary"
    assert sweep_status(str(sweep)).unreadable == []  # readers never see temporaries
    driver = nc_ray_cli("resume", str(sweep), "--address", ray_address)
    try:
        wait_for_progress(sweep, 600)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=60)
    assert driver.returncode == -signal.SIGKILL
    # Tune saves its state first as the experiment starts: the later saves' timing depends on load.
    killed_at("tune-state:1", ray_address, "resume", str(sweep))
    assert sweep_status(str(sweep)).counts["complete"] < 8
    assert "8 complete" in resume_to_the_end(sweep, ray_address)
    assert_exactly_once(sweep, spec_path)


@pytest.mark.skipif(os.environ.get("NC_RAY_HEAVY_FAULTS") != "1", reason="heavy variant: set NC_RAY_HEAVY_FAULTS=1")
def test_driver_killed_at_random_times_then_resumed(ray_address, tmp_path, job_file):
    spec_path = job_file("smoke", name="randomkills", **{**LONG, "grid.seed": [0, 1, 2, 3]})
    sweep = tmp_path / "randomkills"
    rng = random.Random(int(os.environ.get("NC_RAY_FAULT_SEED", "0")))
    command = ["sweep", str(spec_path), "--storage", str(tmp_path)]
    kills = 0
    for _ in range(int(os.environ.get("NC_RAY_DRIVER_KILLS", "10"))):
        driver = nc_ray_cli(*command, "--address", ray_address)
        time.sleep(rng.uniform(0.5, 8.0))
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=60)
        kills += driver.returncode == -signal.SIGKILL
        command = ["resume", str(sweep)]
    print(f"driver kills survived: {kills}")
    assert "16 complete" in resume_to_the_end(sweep, ray_address)
    assert_exactly_once(sweep, spec_path)
