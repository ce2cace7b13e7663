"""No credentials or environment values reach a sweep's tables, files or logs."""

import os
import secrets
import subprocess
import sys

import ray

from tests.sweep_checks import nc_ray_cli

CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS", "RAY_AUTH_TOKEN")


def files_containing(root, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_environment_credentials_stay_out_of_tables_files_and_logs(ray_address, tmp_path, job_file):
    token = "nc-ray-secret-" + secrets.token_hex(8)
    env = {**os.environ, **{name: f"{token}-{name}" for name in CREDENTIALS if name != "RAY_AUTH_TOKEN"}}
    spec_path = job_file("smoke", name="secrets")
    driver = nc_ray_cli("sweep", str(spec_path), "--storage", str(tmp_path / "store"), "--address", ray_address, env=env)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out
    assert token not in out
    assert files_containing(tmp_path / "store", token.encode()) == []
    logs = ray._private.worker._global_node.get_logs_dir_path()
    assert files_containing(type(tmp_path)(logs), token.encode()) == []


def test_a_storage_uri_with_credentials_is_refused_without_echoing_them(tmp_path, job_file):
    spec_path = job_file("smoke")
    secret = "wJalrXUtnFEMI" + secrets.token_hex(6)
    cli = subprocess.run(
        [sys.executable, "-m", "nc_ray.cli", "sweep", str(spec_path), "--storage", f"s3://AKIAEXAMPLE:{secret}@bucket/sweeps"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert cli.returncode == 2
    assert "credentials in the URI" in cli.stderr and "s3://***@bucket/sweeps" in cli.stderr
    assert secret not in cli.stdout + cli.stderr and "AKIAEXAMPLE" not in cli.stdout + cli.stderr
    assert list(tmp_path.iterdir()) == [spec_path]  # nothing written
