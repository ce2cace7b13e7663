"""Trial workers SIGKILLed again and again, and a worker node removed from a two-node local
cluster mid-sweep: Tune retries the packs from their saved state and every row lands once."""

import os
import signal

from tests.sweep_checks import LONG, assert_exactly_once, nc_ray_cli, running_packs, wait_until


def test_trial_workers_killed_repeatedly(ray_address, tmp_path, job_file):
    kills = 3
    spec_path = job_file("smoke", name="workerkills", **LONG, **{"resources.max_failures": kills + 1})
    sweep = tmp_path / "workerkills"
    driver = nc_ray_cli("sweep", str(spec_path), "--storage", str(tmp_path), "--address", ray_address)
    killed: set[int] = set()
    try:
        for _ in range(kills):
            # A pack that has published an evaluation from a process not killed yet.
            progress = wait_until(
                lambda: next((p for p in running_packs(sweep, 100).values() if p["pid"] not in killed), None),
                "no live trial worker to kill",
            )
            os.kill(progress["pid"], signal.SIGKILL)
            killed.add(progress["pid"])
        out, _ = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, out
    assert len(killed) == kills
    assert len(list((sweep / "tune-000").glob("*/error.txt"))) >= 1
    assert_exactly_once(sweep, spec_path)


def test_worker_node_removed_mid_sweep(tmp_path, job_file):
    from ray.cluster_utils import Cluster
    from ray.experimental import internal_kv

    # Cluster.shutdown() resets this process's internal-KV client, which a session's Ray connection
    # (the ray_address fixture) still needs, e.g. for the autoscaler requests of
    # nc_ray.sweep.check_cluster in later tests: it is put back.
    session_client = internal_kv.global_gcs_client
    spec_path = job_file("smoke", name="noderemoved", **LONG)
    sweep = tmp_path / "noderemoved"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker_node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        driver = nc_ray_cli("sweep", str(spec_path), "--storage", str(tmp_path), "--address", cluster.address)
        try:
            # One CPU per node and two packs: once both run, one of them runs on the worker node.
            wait_until(lambda: len(running_packs(sweep, 100)) == 2, "both packs should run, one per node")
            cluster.remove_node(worker_node, allow_graceful=False)
            out, _ = driver.communicate(timeout=600)
        finally:
            driver.kill()
    finally:
        cluster.shutdown()
        if session_client is not None:
            internal_kv._initialize_internal_kv(session_client)
    assert driver.returncode == 0, out
    assert len(list((sweep / "tune-000").glob("*/error.txt"))) == 1, "the removed node's trial should have failed once"
    assert_exactly_once(sweep, spec_path)
