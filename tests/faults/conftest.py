"""Fixtures of the fault tests: one finished smoke sweep per session, which tests copy and damage."""

import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture(scope="session")
def finished_smoke(ray_address, tmp_path_factory) -> Path:
    """A finished jobs/smoke.yaml sweep (8 members: a depth-2 and a depth-3 pack); copy it before damaging it."""
    from nc_ray.sweep import run_sweep

    directory = tmp_path_factory.mktemp("finished_smoke")
    job = yaml.safe_load((REPO / "jobs" / "smoke.yaml").read_text())
    (directory / "smoke.yaml").write_text(yaml.safe_dump(job))
    run_sweep(directory / "smoke.yaml", directory, show_progress=False)
    return directory / "smoke"


@pytest.fixture
def smoke_copy(finished_smoke, tmp_path):
    """copy(where="smoke") -> a fresh copy of the finished smoke sweep at tmp_path / where."""

    def copy(where: str = "smoke") -> Path:
        return Path(shutil.copytree(finished_smoke, tmp_path / where))

    return copy

