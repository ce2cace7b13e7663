"""One local Ray instance per test session (real Ray: no mocks), shared by in-process sweeps and
by `nc-ray` subprocesses, which join it through --address."""

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_address():
    import ray

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # address="local": a Ray of this session's own, even where other Rays run on the machine (ray.init would join the latest)
    context = ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def job_file(tmp_path):
    """Write a variant of a job in jobs/ into tmp_path: job_file("smoke", name=..., **{"training.epochs": 9})."""

    def write(base: str, **changes) -> Path:
        data = yaml.safe_load((REPO / "jobs" / f"{base}.yaml").read_text())
        for dotted, value in changes.items():
            node = data
            *parents, last = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
        path = tmp_path / f"{data['name']}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write
