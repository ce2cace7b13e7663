"""Errors reach a user as one line that says what to do, never as a traceback: paths that cannot be
written, credentials in a storage URI (masked in every message), a sweep directory its driver left
before it recorded its job. A successful resume prints no shutdown noise."""

import os
import secrets
import shutil
import subprocess
import sys

import pytest

from nc_ray.cli import main
from tests.conftest import REPO
from tests.faults import damage
from tests.sweep_checks import nc_ray_cli

# root writes anywhere; without CAP_DAC_OVERRIDE it meets file modes like any other user.
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []


def run_unprivileged(*args: str) -> subprocess.CompletedProcess:
    if UNPRIVILEGED and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: nothing here is unwritable")
    return subprocess.run([*UNPRIVILEGED, sys.executable, "-m", "nc_ray.cli", *args], capture_output=True, text=True, timeout=300)


def read_only(path) -> None:
    for folder, _, files in os.walk(path):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)


def test_unwritable_paths_give_one_line_errors(ray_address, smoke_copy, tmp_path):
    sweep = smoke_copy()
    damage.delete(damage.pack_files(sweep, "metrics", 2)[0])
    damage.foreign(sweep / "tables" / "spectra" / "stranger.parquet")  # doctor --quarantine would move it
    read_only(sweep)
    storage = tmp_path / "storage"
    storage.mkdir(mode=0o555)
    cases = {
        ("sweep", str(sweep / "spec.yaml"), "--storage", str(storage), "--address", ray_address): f"{storage}/smoke",
        ("resume", str(sweep), "--address", ray_address): f"{sweep}/.lock",
        ("doctor", str(sweep), "--quarantine"): f"{sweep}/quarantine",
        ("phase", str(sweep)): f"{sweep}/analysis",
        ("report", str(sweep)): f"{sweep}/analysis",
    }
    figures = tmp_path / "figures"
    figures.mkdir(mode=0o777)
    figures.chmod(0o777)
    try:
        drawn = run_unprivileged("phase", str(sweep), "--out", str(figures))  # a read-only sweep is drawn elsewhere
        assert drawn.returncode == 0 and (figures / "phase_weight_decay_depth.parquet").exists(), drawn.stderr
        for argv, named in cases.items():
            result = run_unprivileged(*argv)
            assert result.returncode == 2, (argv, result.stdout, result.stderr)
            lines = [line for line in result.stderr.splitlines() if line.startswith("nc-ray:")]
            assert len(lines) == 1 and named in lines[0] and ("ermission denied" in lines[0] or "[Errno 13]" in lines[0]), (argv, result.stderr)
            assert "Traceback" not in result.stderr + result.stdout, (argv, result.stderr)
    finally:
        for folder, _, _ in os.walk(tmp_path):
            os.chmod(folder, 0o755)
    assert not (storage / "smoke").exists() and not (sweep / "quarantine").exists()


def test_credentials_in_a_storage_uri_are_masked_in_every_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    key, secret = "AKIA" + secrets.token_hex(6).upper(), secrets.token_hex(12)
    with_userinfo = f"s3://{key}:{secret}@bucket/sweeps/smoke"
    with_parameters = f"s3://bucket/sweeps?access_key={key}&secret_key={secret}"
    spec = tmp_path / "smoke.yaml"
    shutil.copy(REPO / "jobs" / "smoke.yaml", spec)
    for argv in (
        ["query", with_userinfo, "SELECT 1"], ["phase", with_userinfo], ["report", with_userinfo],
        ["status", with_userinfo], ["doctor", with_userinfo], ["resume", with_userinfo],
        ["status", with_parameters], ["resume", with_parameters],
        ["sweep", str(spec), "--storage", with_userinfo], ["sweep", str(spec), "--storage", with_parameters],
    ):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
        out = capsys.readouterr()
        assert status == 2, argv
        assert key not in out.out + out.err and secret not in out.out + out.err, (argv, out.err)
        assert "***" in out.err, (argv, out.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke.yaml"]  # nothing written


def test_a_sweep_directory_left_before_its_job_was_recorded_says_what_to_run(tmp_path, capsys):
    sweep = tmp_path / "runs" / "smoke"
    sweep.mkdir(parents=True)
    (sweep / ".lock").touch()  # all a driver killed before resolved_spec.json leaves
    for command in ("resume", "status", "doctor"):
        assert main([command, str(sweep)]) == 2
        err = capsys.readouterr().err
        assert "no resolved_spec.json" in err and f"nc-ray sweep JOB.yaml --storage {tmp_path / 'runs'}" in err, err
    (sweep / "spec.yaml").write_text("name: smoke\n")
    assert main(["resume", str(sweep)]) == 2
    assert f"a copy of it is {sweep}/spec.yaml" in capsys.readouterr().err


def test_a_successful_resume_prints_no_traceback(ray_address, smoke_copy):
    sweep = smoke_copy()
    damaged = damage.pack_files(sweep, "metrics", 3)[2]
    damage.truncate(damaged)
    resume = nc_ray_cli("resume", str(sweep), "--address", ray_address)
    out, _ = resume.communicate(timeout=300)
    assert resume.returncode == 0, out
    assert "8 complete, 0 diverged, 0 failed, 0 running, 0 pending" in out and f"moved {damaged}" in out, out
    assert "Traceback" not in out and "SystemExit" not in out and "Error" not in out, out
