"""Sweep throughput on one fixed grid: plain Ray Tune, nc-ray and a no-Ray floor, side by side in one run.

    python bench/bench_sweep.py [--runs 3] [--variants a1,a2,b,c] [--members N] [--floor-threads T]
    python bench/bench_sweep.py --end-to-end [--runs 3] [--variants nc-ray,tune-reuse,tune-defaults] [--members 32]

The grid: digits, MLP width 64, depth {2, 3, 4, 6} x 16 log-spaced weight decays x 8 seeds = 512
members, SGD 20 epochs at batch 128, one evaluation at epoch 20 (every metric on the training set,
plus test accuracy). Every variant trains the members of the same generated job spec.

In-process mode (the default), inside this one process:

  a1  plain Ray Tune, one network per trial: `plain_tune.py`'s trainable, Tune's defaults
  a2  the same with TuneConfig(reuse_actors=True)
  b   nc-ray: `run_sweep(spec)` with its defaults (packs of members as Tune trials)
  c   the floor: the packs b would plan, trained one after another in this process by
      `run_pack` (same Parquet files written), no Ray, `--floor-threads` torch threads

Each variant is timed from just before its Tuner.fit() / run_sweep() / pack loop to its end. Ray
is started once beforehand; its start-up is excluded (and printed). Throughput = members trained
per minute of that time. The runs are interleaved (a1, a2, b, c, a1, ...) so that a change in the
machine's load hits every variant alike. With `--members N`, a1 and a2 train only N members
spread evenly over the grid (every depth) (every a1 trial starts a new worker process: seconds per member); their
members/min are measured on that subset, nothing is scaled. Prints each run, the medians and the
ratios b/a1, b/a2, b/c.

End-to-end mode (`--end-to-end`): each variant as a user runs and times it, a fresh process from
launch to exit, its own Ray start included:

  nc-ray         `nc-ray sweep JOB --storage DIR` (checked: every member complete)
  tune-reuse     `python bench/plain_tune.py JOB DIR --reuse-actors`: one trial per member
  tune-defaults  `python bench/plain_tune.py JOB DIR --members N`: Tune's defaults, on a subset of
                 N members (default 32) spread over the grid, its members/min not scaled

Runs interleaved; prints each run, the medians of wall time, members/min and start-up (launch to
the first training step), the ratios nc-ray / tune-reuse and nc-ray / tune-defaults in members/min,
and where each variant's time goes, from the events the processes mark with $NC_RAY_TIMINGS
(`nc_ray.timings`, `phases`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from nc_ray import timings
from nc_ray.config import PackPlan
from nc_ray.planning import FINISHED, plan_sweep
from nc_ray.spec import load_spec
from nc_ray.store import SweepStore
from nc_ray.sweep import run_sweep
from nc_ray.trial import run_pack

from plain_tune import run_plain_tune, spread  # bench/ is the script's directory, first on sys.path

VARIANTS = ("a1", "a2", "b", "c")
SPEC_NAME = "bench_sweep"
SPEC = f"""\
name: {SPEC_NAME}
dataset:
  name: digits
model:
  arch: mlp
  width: 64
  activation: relu
loss: ce
training:
  lr: 0.05
  momentum: 0.9
  batch_size: 128
  epochs: 20
grid:
  depth: [2, 3, 4, 6]
  weight_decay: {{log_range: [1.0e-4, 1.0e-1], num: 16}}
  seed: [0, 1, 2, 3, 4, 5, 6, 7]
metrics:
  every: 20           # = epochs: the only evaluation is the final one
  initial: false
resources:
  cpu: 1
  pack_size: auto
"""


def write_spec(directory: Path) -> Path:
    path = directory / f"{SPEC_NAME}.yaml"
    path.write_text(SPEC)
    return path


def run_nc_ray(spec_path: Path, storage: Path, n_members: int) -> float:
    """b: `run_sweep` with its defaults on a fresh storage; returns its seconds."""
    started = time.perf_counter()
    store = run_sweep(spec_path, storage=storage, show_progress=False)
    seconds = time.perf_counter() - started
    finished = sum(status in FINISHED for status in store.member_statuses().values())
    if finished != n_members:
        raise RuntimeError(f"nc-ray: {finished} of {n_members} members finished")
    return seconds


def run_floor(packs: list[PackPlan], storage: Path, threads: int) -> float:
    """c: the packs nc-ray plans, trained in this process one after another; returns the loop's seconds."""
    torch.set_num_threads(threads)
    members = [member for pack in packs for member in pack.members]
    store = SweepStore(str(storage / SPEC_NAME))
    started = time.perf_counter()
    rows = [row for pack in packs for row in run_pack(pack, store)]
    seconds = time.perf_counter() - started
    if len(rows) != len(members):
        raise RuntimeError(f"floor: {len(rows)} of {len(members)} members trained")
    return seconds


def in_process(args: argparse.Namespace, variants: list[str], parser: argparse.ArgumentParser) -> None:
    """a1, a2, b, c in this process, on one Ray started beforehand (the module doc)."""
    with tempfile.TemporaryDirectory(prefix="bench_sweep-") as temporary:
        root = Path(temporary)
        spec_path = write_spec(root)
        spec = load_spec(spec_path)
        members = spec.members()
        if args.members is not None and not 1 <= args.members <= len(members):
            parser.error(f"--members must be between 1 and {len(members)}")
        plain_members = spread(members, args.members)
        cpus = os.cpu_count() or 1
        # What b plans on the embedded Ray started below (num_cpus = this machine's CPUs), on a new sweep.
        plan = plan_sweep(spec, SweepStore(str(root / "plan")), {"CPU": float(cpus)})
        print(f"grid: {len(members)} members (digits, mlp width 64, depth 2/3/4/6 x 16 weight decays x 8 seeds), "
              f"20 epochs, batch 128, one evaluation at epoch 20; {cpus} CPUs")
        print(f"b and c: packs of <= {plan.pack_size} members ({len(plan.packs)} packs); "
              f"c: {args.floor_threads} torch threads in one process")
        if len(plain_members) < len(members) and {"a1", "a2"} & set(variants):
            depths = sorted({m.depth for m in plain_members})
            print(f"NOTE: a1 and a2 are measured on a SUBSET: {len(plain_members)} of {len(members)} members, evenly spaced "
                  f"(depths {depths}); their members/min are not scaled")
        if {"a1", "a2", "b"} & set(variants):
            started = time.perf_counter()
            ray.init(address="local", num_cpus=cpus, include_dashboard=False)
            print(f"Ray started in {time.perf_counter() - started:.1f} s (excluded from every time below)")

        measured: dict[str, list[float]] = {v: [] for v in variants}
        counts = {"a1": len(plain_members), "a2": len(plain_members), "b": len(members), "c": len(members)}
        print(f"\n{'variant':8} {'run':>3} {'members':>8} {'seconds':>9} {'members/min':>12}")
        for run in range(1, args.runs + 1):
            for variant in variants:
                storage = root / f"{variant}-run{run}"
                if variant == "a1":
                    seconds = run_plain_tune(plain_members, storage, reuse_actors=False)
                elif variant == "a2":
                    seconds = run_plain_tune(plain_members, storage, reuse_actors=True)
                elif variant == "b":
                    seconds = run_nc_ray(spec_path, storage, len(members))
                else:
                    seconds = run_floor(plan.packs, storage, args.floor_threads)
                rate = counts[variant] / (seconds / 60)
                measured[variant].append(rate)
                print(f"{variant:8} {run:>3} {counts[variant]:>8} {seconds:>9.1f} {rate:>12.1f}", flush=True)

        print(f"\nmedian members/min over {args.runs} run(s):")
        for variant in variants:
            subset = " (subset)" if counts[variant] < len(members) else ""
            print(f"  {variant:3} {statistics.median(measured[variant]):10.1f}{subset}")
        for other in ("a1", "a2", "c"):
            if "b" in measured and other in measured:
                per_run = ", ".join(f"{b / o:.2f}" for b, o in zip(measured["b"], measured[other]))
                ratio = statistics.median(measured["b"]) / statistics.median(measured[other])
                print(f"b/{other} = {ratio:.2f}x  (ratio of the medians; per run: {per_run})")
        if {"a1", "a2"} & set(measured) and len(plain_members) < len(members):
            print(f"(a1/a2 on {len(plain_members)} evenly spaced members only)")
        ray.shutdown()



# ------------------------------------------------------------------ end to end, as a user times it

E2E_VARIANTS = ("nc-ray", "tune-reuse", "tune-defaults")
BENCH = Path(__file__).resolve().parent


def e2e_command(variant: str, spec_path: Path, storage: Path, defaults_members: int) -> list[str]:
    """The command a user would type for each variant, run as a fresh process."""
    if variant == "nc-ray":
        script = Path(sys.executable).with_name("nc-ray")  # the console script pip installed beside this Python
        cli = [str(script)] if script.exists() else [sys.executable, "-m", "nc_ray.cli"]
        return [*cli, "sweep", str(spec_path), "--storage", str(storage)]
    plain = [sys.executable, str(BENCH / "plain_tune.py"), str(spec_path), str(storage)]
    return [*plain, "--reuse-actors"] if variant == "tune-reuse" else [*plain, "--members", str(defaults_members)]


def run_e2e(command: list[str], events_path: Path, log_path: Path) -> tuple[float, list[dict]]:
    """Run `command` with $NC_RAY_TIMINGS set; (seconds from launch to exit, its events with t
    relative to the launch). Its output goes to `log_path`."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}  # each variant starts its own Ray
    env[timings.VARIABLE] = str(events_path)
    with open(log_path, "wb") as log:
        launched = time.time()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        exited = time.time()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited {code}; its output: {log_path}")
    return exited - launched, [{**event, "t": event["t"] - launched} for event in timings.read(events_path)]


def phases(events: list[dict], wall: float) -> dict[str, float]:
    """Where one run's time went (seconds; NaN where the variant has no such event). Spans on the
    way to the first training step, then per-slot sums over the trials ("slot-s": seconds of one
    trial slot, summed over slots), then the end."""
    def first(name: str) -> float:
        return min((e["t"] for e in events if e["event"] == name), default=math.nan)

    def last(name: str) -> float:
        return max((e["t"] for e in events if e["event"] == name), default=math.nan)

    setup = writes = between = 0.0
    for pid in {e["pid"] for e in events if e["event"] == "trial_start"}:
        trial_events = [e for e in events if e["pid"] == pid and e["event"] in ("trial_start", "train_start", "pack_end")]
        for before, after in zip(trial_events, trial_events[1:]):
            if (before["event"], after["event"]) == ("trial_start", "train_start"):
                setup += after["t"] - before["t"]
            elif (before["event"], after["event"]) == ("train_start", "pack_end"):
                writes += after["t"] - before["t"] - after["train_s"] - after["evaluation_s"]
            elif (before["event"], after["event"]) == ("pack_end", "trial_start"):
                between += after["t"] - before["t"]
    ends = [e for e in events if e["event"] == "pack_end"]
    later = []  # the fixed cost of each pack a worker trains after its first: the switch, its set-up, its files
    for pid in {e["pid"] for e in ends}:
        trial_events = [e for e in events if e["pid"] == pid and e["event"] in ("trial_start", "train_start", "pack_end")]
        for previous_end, start, train, end in zip(trial_events[2::3], trial_events[3::3], trial_events[4::3], trial_events[5::3]):
            later.append(end["t"] - previous_end["t"] - end["train_s"] - end["evaluation_s"])
    return {
        "launch to main (Python, imports)": first("main"),
        "main to Ray start (spec, checks, imports)": first("ray_start") - first("main"),
        "Ray start": first("ray_up") - first("ray_start"),
        "planning, pack files (beside Ray start)": first("planned") - first("plan_start"),
        "fit() to first trial running": first("trial_start") - first("fit_start"),
        "first trial: torch, data, pack": first("train_start") - first("trial_start"),
        "START-UP: launch to first training": first("train_start"),
        "in Tune: fit()": last("fit_end") - first("fit_start"),
        "training (slot-s)": sum(e["train_s"] for e in ends) if ends else math.nan,
        "evaluation, metrics files (slot-s)": sum(e["evaluation_s"] for e in ends) if ends else math.nan,
        "trial set-up: data, pack (slot-s)": setup,
        "state, weights, members files (slot-s)": writes if ends else math.nan,
        "between trials, in Tune (slot-s)": between,
        "fixed cost per later pack on a worker (median s)": statistics.median(later) if later else math.nan,
        "after fit(): status, shutdown, exit": wall - last("fit_end"),
        "WALL: launch to exit": wall,
    }


def end_to_end(args: argparse.Namespace, variants: list[str]) -> None:
    """Each variant as a fresh process, Ray start included, timed from launch to exit; the runs
    interleaved; medians, nc-ray's breakdown (`phases`) and the ratios of members/min."""
    with tempfile.TemporaryDirectory(prefix="bench_sweep-e2e-") as temporary:
        root = Path(temporary)
        spec_path = write_spec(root)
        n_members = len(load_spec(spec_path).members())
        counts = {"nc-ray": n_members, "tune-reuse": n_members, "tune-defaults": args.members}
        print(f"end to end: {n_members} members (digits, mlp width 64, depth 2/3/4/6 x 16 weight decays x 8 seeds, 20 epochs, "
              f"batch 128, one evaluation at epoch 20), each variant a fresh process from launch to exit, its own Ray on "
              f"{os.cpu_count()} CPUs; runs interleaved")
        if "tune-defaults" in variants:
            print(f"NOTE: tune-defaults runs a SUBSET of {args.members} evenly spaced members (a new worker process per trial: "
                  f"seconds each); its members/min is that subset's own rate, not scaled")
        measured: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        print(f"\n{'variant':14} {'run':>3} {'members':>8} {'seconds':>8} {'members/min':>12} {'start-up s':>11}")
        for run in range(1, args.runs + 1):
            for variant in variants:
                storage = root / f"{variant}-run{run}"
                storage.mkdir()
                command = e2e_command(variant, spec_path, storage, args.members)
                wall, events = run_e2e(command, root / f"{variant}-run{run}.jsonl", root / f"{variant}-run{run}.log")
                if variant == "nc-ray":
                    check_all_finished(storage / SPEC_NAME, n_members)
                measured[variant].append(phases(events, wall))
                print(f"{variant:14} {run:>3} {counts[variant]:>8} {wall:>8.1f} {counts[variant] / wall * 60:>12.1f} "
                      f"{measured[variant][-1]['START-UP: launch to first training']:>11.2f}", flush=True)

        def median(variant: str, phase: str) -> float:
            return statistics.median(m[phase] for m in measured[variant])

        rate = {v: counts[v] / median(v, "WALL: launch to exit") * 60 for v in variants}
        print(f"\nmedians of {args.runs} run(s):")
        print(f"{'variant':14} {'members':>8} {'wall s':>8} {'members/min':>12} {'start-up s':>11}")
        for variant in variants:
            print(f"{variant:14} {counts[variant]:>8} {median(variant, 'WALL: launch to exit'):>8.1f} {rate[variant]:>12.1f} "
                  f"{median(variant, 'START-UP: launch to first training'):>11.2f}")
        for other in ("tune-reuse", "tune-defaults"):
            if "nc-ray" in measured and other in measured:
                per_run = ", ".join(f"{counts['nc-ray'] / n['WALL: launch to exit'] / (counts[other] / o['WALL: launch to exit']):.2f}"
                                    for n, o in zip(measured["nc-ray"], measured[other]))
                print(f"nc-ray / {other} = {rate['nc-ray'] / rate[other]:.2f}x in members/min (ratio of the medians; per run: {per_run})")
        for variant in variants:
            print(f"\nwhere {variant}'s time goes (median over runs; n/a: no such step):")
            for phase in measured[variant][0]:
                value = median(variant, phase)
                print(f"  {phase:42s} {'n/a' if math.isnan(value) else f'{value:7.2f}'}")


def check_all_finished(sweep: Path, n_members: int) -> None:
    """RuntimeError unless `nc-ray status --format json` counts every member complete."""
    status = subprocess.run([sys.executable, "-m", "nc_ray.cli", "status", str(sweep), "--format", "json"], capture_output=True, text=True)
    counts = json.loads(status.stdout)["counts"] if status.stdout else {}
    if counts.get("complete") != n_members:
        raise RuntimeError(f"nc-ray: {counts} of {n_members} members; {status.stderr[-2000:]}")


# ------------------------------------------------------------------ the auto pack size's constants

# Member shapes the rule must serve: this bench's grid, the quickstart's, and bench_scale's tiny ones.
RULE_SHAPES = {
    "bench grid: digits mlp w64 d4 ce": {"dataset": {"name": "digits"}, "model": {"arch": "mlp", "width": 64, "depth": 4},
                                          "loss": "ce", "training": {"batch_size": 128}},
    "quickstart: digits mlp w32 d6 mse": {"dataset": {"name": "digits"}, "model": {"arch": "mlp", "width": 32, "depth": 6},
                                          "loss": "mse", "training": {"batch_size": 128}},
    "bench_scale: gaussian mlp w8 d3": {"dataset": {"name": "gaussian", "params": {"n_classes": 3, "dim": 8, "samples_per_class": 30,
                                                                                   "test_samples_per_class": 10}},
                                        "model": {"arch": "mlp", "width": 8, "depth": 3}, "loss": "ce", "training": {"batch_size": 32}},
}


def pack_rule(args: argparse.Namespace) -> None:
    """Seconds per member-epoch of packs of each size at one thread, for each of RULE_SHAPES, and
    the constants of `planning.auto_pack_size` fitted to them: t(g) = a / g + b per member-epoch,
    a = steps per epoch x STEP_OVERHEAD_S, b = MACs per epoch x SECONDS_PER_MAC."""
    from nc_ray import planning
    from nc_ray.limits import dataset_shape
    from nc_ray.spec import parse_spec
    from nc_ray.trial import PackRun

    torch.set_num_threads(1)
    sizes = [int(size) for size in args.pack_sizes.split(",")]
    print(f"seconds per member-epoch of a pack of g members, 1 thread, median of {args.runs} timings of {args.rule_epochs} epochs "
          f"(training only); the planning constants: STEP_OVERHEAD_S {planning.STEP_OVERHEAD_S * 1e3:.2f} ms, "
          f"SECONDS_PER_MAC {planning.SECONDS_PER_MAC * 1e9:.3f} ns")
    with tempfile.TemporaryDirectory(prefix="bench_sweep-rule-") as temporary:
        store = SweepStore(temporary)
        for label, shape in RULE_SHAPES.items():
            spec = parse_spec({"name": "rule", **shape, "training": {**shape["training"], "epochs": 100},
                               "grid": {"weight_decay": {"log_range": [1e-4, 1e-1], "num": 16}, "seed": list(range(max(sizes) // 16 + 1))}},
                              source=label)
            members = spec.members()
            first = members[0]
            n_train = dataset_shape(first)[0]
            steps = math.ceil(n_train / min(first.batch_size or n_train, n_train))
            macs = planning.member_cost(first) / first.epochs
            per_member = {}
            for size in sizes:
                run = PackRun(PackPlan.of(members[:size]), store)
                run.trainer.train_epoch()  # first-call warm-ups
                timed = []
                for _ in range(args.runs):
                    started = time.perf_counter()
                    for _ in range(args.rule_epochs):
                        run.trainer.train_epoch()
                    timed.append((time.perf_counter() - started) / args.rule_epochs / size)
                per_member[size] = statistics.median(timed)
            # Least squares of t = a / g + b over the sizes up to 16 (beyond, cache effects, not overhead, move it).
            fitted = [(1 / g, per_member[g]) for g in sizes if g <= 16]
            mean_x, mean_y = statistics.mean(x for x, _ in fitted), statistics.mean(y for _, y in fitted)
            a = sum((x - mean_x) * (y - mean_y) for x, y in fitted) / sum((x - mean_x) ** 2 for x, _ in fitted)
            b = mean_y - a * mean_x
            print(f"\n{label}: {steps} steps per epoch, {macs / 1e6:.2f} M multiply-adds per member-epoch")
            print("  " + "  ".join(f"g={g}: {t * 1e3:.3f} ms" for g, t in per_member.items()))
            print(f"  fit t = a/g + b: a = {a * 1e3:.2f} ms ({a / steps * 1e3:.3f} ms per step), b = {b * 1e3:.3f} ms "
                  f"({b / macs * 1e9:.3f} ns per multiply-add); best g: {min(per_member, key=per_member.get)}")
            chosen = {slots: planning.auto_pack_size(members, slots) for slots in (2, 16)}
            print(f"  auto_pack_size of these {len(members)} members ({first.epochs} epochs) on 2 / 16 slots: {chosen[2]} / {chosen[16]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--end-to-end", action="store_true", help="each variant a fresh process, Ray start included (see above)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant, interleaved (default 3)")
    parser.add_argument("--variants", default=None, help="comma-separated subset of a1,a2,b,c (with --end-to-end: nc-ray,tune-reuse,tune-defaults); default all")
    parser.add_argument("--members", type=int, default=None,
                        help="a1 and a2 (with --end-to-end: tune-defaults; default 32) train only N members, spread evenly over the grid")
    parser.add_argument("--floor-threads", type=int, default=os.cpu_count(), help="torch threads of c (default: every CPU)")
    parser.add_argument("--pack-rule", action="store_true", help="measure the auto pack size's constants instead (see pack_rule)")
    parser.add_argument("--pack-sizes", default="1,2,4,8,16,32,64", help="with --pack-rule: the pack sizes timed")
    parser.add_argument("--rule-epochs", type=int, default=5, help="with --pack-rule: epochs per timing")
    args = parser.parse_args()
    if args.pack_rule:
        pack_rule(args)
        return
    known = E2E_VARIANTS if args.end_to_end else VARIANTS
    variants = [v.strip() for v in (args.variants or ",".join(known)).split(",")]
    unknown = sorted(set(variants) - set(known))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.end_to_end:
        args.members = args.members or 32
        end_to_end(args, variants)
    else:
        in_process(args, variants, parser)


if __name__ == "__main__":
    main()
