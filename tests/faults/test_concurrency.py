"""A second driver on a running sweep is refused; queries running while a sweep writes see only
complete files."""

import time

from nc_ray.query import open_sweep
from tests.sweep_checks import LONG, assert_exactly_once, nc_ray_cli, wait_for_progress


def test_resume_refused_and_queries_see_complete_files_while_a_sweep_writes(ray_address, tmp_path, job_file):
    spec_path = job_file("smoke", name="busy", **{**LONG, "training.epochs": 900})
    sweep = tmp_path / "busy"
    driver = nc_ray_cli("sweep", str(spec_path), "--storage", str(tmp_path), "--address", ray_address)
    try:
        wait_for_progress(sweep, 100)
        second = nc_ray_cli("resume", str(sweep), "--address", ray_address)
        out, _ = second.communicate(timeout=120)
        assert second.returncode == 2 and "in use by another nc-ray" in out, out
        queries, seen = 0, set()
        while driver.poll() is None:
            with open_sweep(sweep) as session:
                # A file holds one evaluation of a pack: all layers of each member, or nothing.
                for table in ("metrics", "spectra"):
                    partial = session.sql(
                        f"SELECT member_id, epoch FROM {table} GROUP BY member_id, epoch HAVING count(*) <> any_value(depth)"
                    )
                    assert partial.num_rows == 0, partial.to_pylist()
                seen.update(session.sql("SELECT DISTINCT epoch FROM metrics").column(0).to_pylist())
                assert session.skipped == []
            queries += 1
            time.sleep(0.05)
        out, _ = driver.communicate()
    finally:
        driver.kill()
    assert driver.returncode == 0, out
    assert queries >= 10 and len(seen) >= 3, (queries, seen)
    assert_exactly_once(sweep, spec_path)
