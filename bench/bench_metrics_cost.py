"""Metrics cost at the default cadence: the share of a trial's time spent on evaluations, on the quickstart job.

    python bench/bench_metrics_cost.py [--job jobs/quickstart.yaml] [--runs 3]

The job's packs are planned as `nc-ray sweep` plans them on this machine and run with `PackRun`,
as many at once as there are CPUs, each in its own process with one torch thread (how 1-CPU
trials run). Per pack, `PackRun.wall_time` is the time in training epochs and
`PackRun.metrics_time` the time in evaluations at the job's cadence (every metric, train and test
evaluation, the Parquet writes). Prints, per run and as the median, metrics / (training + metrics)
summed over the packs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from nc_ray.spec import load_spec
from nc_ray.config import PackPlan
from nc_ray.planning import plan_sweep
from nc_ray.store import SweepStore
from nc_ray.trial import PackRun


def time_pack(pack_json: str, storage: str) -> tuple[float, float]:
    """(training seconds, evaluation seconds) of one pack run from scratch."""
    torch.set_num_threads(1)
    run = PackRun(PackPlan.from_json(pack_json), SweepStore(storage))
    run.run()
    return run.wall_time, run.metrics_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=str(Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    spec = load_spec(args.job)
    members = spec.members()
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_metrics-plan-") as empty:  # a new sweep: nothing finished
        plan = plan_sweep(spec, SweepStore(empty), {"CPU": float(cpus)})
    packs = plan.packs
    first = members[0]
    print(f"{spec.name}: {len(members)} members in {len(packs)} packs of <= {plan.pack_size}, {first.epochs} epochs, "
          f"evaluations at epochs {first.evaluation_epochs()}; {cpus} packs at a time, 1 thread each")
    shares = []
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="bench_metrics-") as storage, ProcessPoolExecutor(cpus) as pool:
            times = list(pool.map(time_pack, [p.to_json() for p in packs], [storage] * len(packs)))
        training, metrics = sum(t for t, _ in times), sum(m for _, m in times)
        shares.append(metrics / (training + metrics))
        print(f"run {run}: training {training:.1f} s, metrics {metrics:.1f} s (pack-seconds): metrics share {shares[-1]:.1%}", flush=True)
    print(f"median metrics share of trial time over {args.runs} run(s): {statistics.median(shares):.1%} (target <= 10%)")


if __name__ == "__main__":
    main()
