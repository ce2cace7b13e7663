"""`nc-ray` as a driver that dies by SIGKILL at a chosen point (fault injection for the tests).

    python tests/faults/driver.py POINT RAY_ADDRESS nc-ray-args...

POINT is one of
    schedule:N    the driver kills itself as Tune schedules its N-th trial actor
    tune-state:N  the driver kills itself in its N-th save of Tune's experiment state, after a
                  torn (half) copy of the state file has reached the experiment directory
    parquet:N     a trial worker, halfway through writing the hidden temporary of its N-th table
                  file, kills the driver and then itself
The driver joins the running cluster at RAY_ADDRESS, so the only process that dies is the one
the point names (and, with the driver, its trials).
"""

import itertools
import os
import signal
import sys
from pathlib import Path


def die(pid: int | None = None) -> None:
    os.kill(pid or os.getpid(), signal.SIGKILL)


def kill_while_scheduling(n: int) -> None:
    from ray.tune.execution.tune_controller import TuneController

    original, calls = TuneController._schedule_trial_actor, itertools.count(1)

    def schedule(self, trial):
        if next(calls) == n:
            die()
        return original(self, trial)

    TuneController._schedule_trial_actor = schedule


def kill_while_saving_tune_state(n: int) -> None:
    from ray.tune.execution.tune_controller import TuneController

    original, calls = TuneController.save_to_dir, itertools.count(1)

    def save_to_dir(self):
        original(self)
        if next(calls) == n:
            storage = self._storage
            state = Path(storage.experiment_driver_staging_path, self.experiment_state_file_name).read_bytes()
            with storage.storage_filesystem.open_output_stream(f"{storage.experiment_fs_path}/{self.experiment_state_file_name}") as out:
                out.write(state[: len(state) // 2])
            die()

    TuneController.save_to_dir = save_to_dir


def kill_in_parquet_write(driver_pid: int, n: int):
    """A Ray worker setup hook: the worker's N-th table write tears, killing driver and worker."""

    def install() -> None:
        from nc_ray.store import SweepStore

        original, calls = SweepStore.write_bytes, itertools.count(1)

        def write_bytes(self, relative: str, data: bytes) -> None:
            if relative.startswith("tables/") and next(calls) == n:
                directory, _, name = self.path(relative).rpartition("/")
                self.fs.create_dir(directory, recursive=True)
                with self.fs.open_output_stream(f"{directory}/.{name}.torn.tmp") as out:
                    out.write(data[: len(data) // 2])
                die(driver_pid)
                die()
            original(self, relative, data)

        SweepStore.write_bytes = write_bytes

    return install


def main() -> int:
    point, address, *args = sys.argv[1:]
    kind, n = point.split(":")
    import ray

    runtime_env = {}
    if kind == "schedule":
        kill_while_scheduling(int(n))
    elif kind == "tune-state":
        kill_while_saving_tune_state(int(n))
    elif kind == "parquet":
        runtime_env["worker_process_setup_hook"] = kill_in_parquet_write(os.getpid(), int(n))
    else:
        raise SystemExit(f"unknown fault point {point!r}")
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    from nc_ray.cli import main as nc_ray_main

    return nc_ray_main(args)


if __name__ == "__main__":
    sys.exit(main())
