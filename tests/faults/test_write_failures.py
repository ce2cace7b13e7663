"""A write failing mid-sweep (disk full, read-only directory): the trial errors with a message
naming the file, nothing partial is visible, and resume finishes the sweep once writes work."""

import errno

import pytest

from nc_ray.planning import sweep_status
from nc_ray.sweep import resume_sweep, run_sweep
from tests.faults.failing_fs import failing_filesystem
from tests.sweep_checks import assert_exactly_once, table_keys


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_a_failing_write_fails_the_trial_cleanly_and_resume_finishes(ray_address, tmp_path, job_file, error):
    spec_path = job_file("smoke", name="writefails", **{"resources.max_failures": 0})
    sweep = tmp_path / "writefails"
    # Evaluations at epochs 0, 3 and 6: the metrics files of epoch 3 cannot be written.
    broken = failing_filesystem(f"{sweep}/tables/metrics/.*-e000003.parquet.*", error)
    run_sweep(spec_path, str(tmp_path), show_progress=False, filesystem=broken)

    status = sweep_status(str(sweep))
    assert status.counts["failed"] == 8
    for message in status.errors.values():
        assert "cannot write" in message and "-e000003.parquet" in message and f"[Errno {error}]" in message
    assert {epoch for _, epoch, _ in table_keys(sweep, "metrics")} == {0}
    assert not list((sweep / "tables").rglob("*.tmp")), "a failed write left its temporary behind"
    assert not list((sweep / "tables").rglob("*-e000003.parquet"))

    resume_sweep(sweep, show_progress=False)
    assert sweep_status(str(sweep)).counts["complete"] == 8
    assert_exactly_once(sweep, spec_path)
