"""The read side starts without torch or Ray: `-X importtime` of each light command, run as a user
runs it, on a finished sweep (the version-1 fixture, read by this version)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HEAVY = ("torch", "ray")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return Path(shutil.copytree(FIXTURES / "sweep_v1", tmp_path_factory.mktemp("imports") / "sweep_v1"))


def imported_modules(*args: str) -> set[str]:
    """Top-level packages a `python -m nc_ray.cli ARGS` process imports (from -X importtime)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "nc_ray.cli", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines}


@pytest.mark.parametrize("command", ["--help", "status", "query", "doctor", "sweep --dry-run"])
def test_light_commands_import_neither_torch_nor_ray(sweep, command):
    args = {
        "--help": ["--help"],
        "status": ["status", str(sweep)],
        "query": ["query", str(sweep), "SELECT count(*) FROM metrics"],
        "doctor": ["doctor", str(sweep)],
        "sweep --dry-run": ["sweep", str(FIXTURES / "sweep_v1.yaml"), "--storage", str(sweep.parent), "--dry-run"],
    }[command]
    modules = imported_modules(*args)
    assert "nc_ray" in modules
    assert not set(HEAVY) & modules, f"{command} imports {set(HEAVY) & modules}"
