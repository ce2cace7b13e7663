"""nc-ray at 10,000 members on this machine: sweep wall time, driver memory, files written, resume latency.

    python bench/bench_scale.py [--members-scale full|small] [--redo-packs 10] [--storage DIR]

The job (generated): tiny networks on gaussian clusters (3 classes, dim 8, 30 train samples per
class), MLP width 8, depth {2, 3} x 50 log-spaced weight decays x 100 seeds = 10,000 members
(`--members-scale small`: 10 seeds, 1,000 members), 2 epochs, one evaluation at the end, pack_size auto.

1. Sweep: `python -m nc_ray.cli sweep SPEC --storage DIR` in a subprocess. Wall time from launch to
   exit (Ray start-up included) and members/min over it; the driver process's own peak RSS: the
   kernel's high-water mark VmHWM of /proc/<pid>/status, read every 20 ms while it runs (Ray's
   raylet, GCS and workers are other processes and not counted); files under the sweep directory.
2. Resume: the members files (`tables/members/<pack_id>.parquet`) of `--redo-packs` packs are
   deleted, so those packs count as unfinished, then `python -m nc_ray.cli resume DIR` runs.
   Resume -> first trial: from launch until the first file of a deleted pack (its metrics,
   spectra, progress, state, weights or members file) is published again. A trial writes nothing
   before its first evaluation, which here is the end of its 2 epochs: so this is an upper bound
   on when the trial started, by the pack's own training and evaluation time (printed, from
   its members rows' wall_time_s).

Milestones in both runs, seconds from launch: sweep.json written (Ray is up and the packs are
planned), the Tune experiment directory tune-<n>/ created (Tune has started).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

SPEC_NAME = "bench_scale"
SEEDS = {"full": 100, "small": 10}
DEPTHS, DECAYS = 2, 50
POLL_S = 0.02


def spec_text(seeds: int) -> str:
    return f"""\
name: {SPEC_NAME}
dataset:
  name: gaussian
  params: {{n_classes: 3, dim: 8, samples_per_class: 30, test_samples_per_class: 10}}
model:
  arch: mlp
  width: 8
loss: ce
training:
  lr: 0.05
  momentum: 0.9
  batch_size: 32
  epochs: 2
grid:
  depth: [2, 3]
  weight_decay: {{log_range: [1.0e-4, 1.0e-1], num: {DECAYS}}}
  seed: {{count: {seeds}}}
metrics:
  every: 2            # = epochs: the only evaluation is the final one
  initial: false
resources:
  cpu: 1
  pack_size: auto
"""


def driver_peak_kib(pid: int) -> int | None:
    """VmHWM (peak resident set size, KiB) of a live process; None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None  # a zombie: its memory is gone


@dataclass(frozen=True)
class CliRun:
    seconds: float
    driver_peak_mib: float | None
    milestones: dict[str, float]  # label -> seconds from launch when it was first seen
    output: str


def run_cli(arguments: list[str], milestones: dict[str, Callable[[], bool]], log: Path) -> CliRun:
    """Run `python -m nc_ray.cli ARGUMENTS`, polling its peak RSS and the milestones until it exits."""
    seen: dict[str, float] = {}
    peak = None
    with log.open("w") as sink:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "nc_ray.cli", *arguments], stdout=sink, stderr=subprocess.STDOUT)
        while True:
            # Read before poll(): once poll() has reaped the driver its /proc entry is gone.
            peak = driver_peak_kib(process.pid) or peak
            for label, reached in milestones.items():
                if label not in seen and reached():
                    seen[label] = time.perf_counter() - started
            if process.poll() is not None:
                break
            time.sleep(POLL_S)
        seconds = time.perf_counter() - started
    output = log.read_text()
    if process.returncode != 0:
        raise RuntimeError(f"nc-ray {' '.join(arguments)} exited {process.returncode}:\n{output[-3000:]}")
    return CliRun(seconds, peak / 1024 if peak else None, seen, output)


def files_by_folder(sweep: Path) -> Counter:
    """Files under the sweep directory, by folder (tables/<table>, tune-<n>, packs, ...)."""
    counts: Counter = Counter()
    for path in sweep.rglob("*"):
        if path.is_file():
            parts = path.relative_to(sweep).parts
            folder = "/".join(parts[:2]) if parts[0] == "tables" else parts[0] if len(parts) > 1 else "."
            counts[folder] += 1
    return counts


def tune_run_started(sweep: Path, number: int) -> Callable[[], bool]:
    return lambda: (sweep / f"tune-{number:03d}").is_dir()


def tune_run_recorded(sweep: Path, number: int) -> Callable[[], bool]:
    def recorded() -> bool:
        try:
            return f"tune-{number:03d}" in json.loads((sweep / "sweep.json").read_text())["tune_runs"]
        except (OSError, ValueError):  # not there yet (it is published by rename, so never half-written)
            return False
    return recorded


def pack_files(sweep: Path, pack_id: str) -> list[Path]:
    """Every file a pack's trial publishes (metrics and spectra: one per evaluation epoch)."""
    tables = sweep / "tables"
    return [
        *sorted((tables / "metrics").glob(f"{pack_id}-e*.parquet")), *sorted((tables / "spectra").glob(f"{pack_id}-e*.parquet")),
        sweep / "progress" / f"{pack_id}.json", sweep / "state" / f"{pack_id}.pt",
        sweep / "weights" / f"{pack_id}.safetensors", tables / "members" / f"{pack_id}.parquet",
    ]


def signature(path: Path) -> tuple[int, int] | None:
    # Files are published by rename: a rewrite gives a new inode as well as a new mtime.
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


class FirstRepublished:
    """Remembers the files of some packs; called, says whether any has been published again since."""

    def __init__(self, sweep: Path, pack_ids: list[str]):
        self.before = {path: signature(path) for pack_id in pack_ids for path in pack_files(sweep, pack_id)}
        self.pack_of = {path: pack_id for pack_id in pack_ids for path in pack_files(sweep, pack_id)}
        self.first_pack: str | None = None

    def __call__(self) -> bool:
        for path, before in self.before.items():
            if signature(path) != before:
                self.first_pack = self.pack_of[path]
                return True
        return False


def status_line(run: CliRun, sweep: Path) -> str:
    """nc-ray's closing summary line: members complete / running / pending / diverged / failed."""
    return next((line for line in run.output.splitlines() if line.startswith(f"{sweep}: ")), "(no status line)")


def print_milestones(run: CliRun) -> None:
    for label, seconds in sorted(run.milestones.items(), key=lambda item: item[1]):
        print(f"  {seconds:7.1f} s  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members-scale", choices=sorted(SEEDS), default="full",
                        help=f"full: {SEEDS['full']} seeds, {DEPTHS * DECAYS * SEEDS['full']:,} members; small: {SEEDS['small']} seeds")
    parser.add_argument("--redo-packs", type=int, default=10, help="packs whose members files are deleted before the resume (default 10)")
    parser.add_argument("--storage", default=None, help="where the sweep goes (default: a temporary directory, removed at the end)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_scale-") as temporary:
        storage = Path(args.storage or temporary).resolve()
        storage.mkdir(parents=True, exist_ok=True)
        sweep = storage / SPEC_NAME
        if sweep.exists():
            parser.error(f"{sweep} exists: give an empty --storage")
        spec_path = Path(temporary) / f"{SPEC_NAME}.yaml"
        seeds = SEEDS[args.members_scale]
        spec_path.write_text(spec_text(seeds))
        n_members = DEPTHS * DECAYS * seeds
        print(f"job: {n_members:,} members (gaussian 3 classes dim 8, mlp width 8, depth 2/3 x {DECAYS} weight decays x "
              f"{seeds} seeds), 2 epochs, one evaluation; {os.cpu_count()} CPUs; sweep directory {sweep}")

        sweep_run = run_cli(
            ["sweep", str(spec_path), "--storage", str(storage)],
            {"sweep.json written (Ray up, packs planned)": tune_run_recorded(sweep, 0),
             "tune-000/ created (Tune started)": tune_run_started(sweep, 0)},
            Path(temporary) / "sweep.log",
        )
        files = files_by_folder(sweep)
        pack_ids = sorted(p.stem for p in (sweep / "packs").glob("*.json"))
        print(f"\n[1] sweep: {len(pack_ids)} packs")
        print_milestones(sweep_run)
        print(f"  members            {n_members:,}")
        print(f"  wall time          {sweep_run.seconds:.1f} s (launch to exit, Ray start-up included)")
        print(f"  members/min        {n_members / (sweep_run.seconds / 60):,.0f}")
        print(f"  driver peak RSS    {sweep_run.driver_peak_mib:.0f} MiB (VmHWM of the driver process alone)"
              if sweep_run.driver_peak_mib else "  driver peak RSS    n/a (no /proc/<pid>/status)")
        print(f"  files written      {sum(files.values()):,} ({', '.join(f'{k} {v}' for k, v in sorted(files.items()))})")
        print(f"  nc-ray says        {status_line(sweep_run, sweep)}")

        if not 0 < args.redo_packs < len(pack_ids):
            parser.error(f"--redo-packs must be between 1 and {len(pack_ids) - 1}")
        redo = pack_ids[: args.redo_packs]
        for pack_id in redo:
            (sweep / "tables" / "members" / f"{pack_id}.parquet").unlink()
        unfinished = sum(len(json.loads((sweep / "packs" / f"{p}.json").read_text())["members"]) for p in redo)
        republished = FirstRepublished(sweep, redo)
        resume_run = run_cli(
            ["resume", str(sweep)],
            {"sweep.json names tune-001 (Ray up, packs planned)": tune_run_recorded(sweep, 1),
             "tune-001/ created (Tune started)": tune_run_started(sweep, 1),
             "a redone pack published a file (first trial ran)": republished},
            Path(temporary) / "resume.log",
        )
        print(f"\n[2] resume: {n_members - unfinished:,} members finished, {unfinished} unfinished in {len(redo)} packs")
        print_milestones(resume_run)
        first = resume_run.milestones.get("a redone pack published a file (first trial ran)")
        if first is None or republished.first_pack is None:
            raise RuntimeError("the resume exited without rewriting any file of the redone packs")
        trial_work = max(pq.read_table(sweep / "tables" / "members" / f"{republished.first_pack}.parquet", columns=["wall_time_s"])["wall_time_s"].to_pylist())
        print(f"  resume -> first trial  {first:.1f} s (an upper bound: {trial_work:.2f} s of it is that pack's own training and evaluation)")
        print(f"  resume wall time       {resume_run.seconds:.1f} s")
        print(f"  driver peak RSS        {resume_run.driver_peak_mib:.0f} MiB" if resume_run.driver_peak_mib else "  driver peak RSS        n/a")
        print(f"  nc-ray says            {status_line(resume_run, sweep)}")


if __name__ == "__main__":
    main()
