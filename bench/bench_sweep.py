"""Sweep throughput on one fixed grid: plain Ray Tune, nc-ray and a no-Ray floor, side by side in one run.

    python bench/bench_sweep.py [--runs 3] [--variants a1,a2,b,c] [--members N] [--floor-threads T]

The grid: digits, MLP width 64, depth {2, 3, 4, 6} x 16 log-spaced weight decays x 8 seeds = 512
members, SGD 20 epochs at batch 128, one evaluation at epoch 20 (every metric on the training set,
plus test accuracy). All four variants train the members of the same generated job spec:

  a1  plain Ray Tune, one network per trial: a minimal trainable written here, Tune's defaults
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
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune

from nc_ray.data import load_dataset
from nc_ray.metrics import member_metrics
from nc_ray.models import build_model
from nc_ray.config import MemberConfig, PackPlan
from nc_ray.planning import FINISHED, plan_sweep
from nc_ray.spec import load_spec
from nc_ray.store import SweepStore
from nc_ray.sweep import run_sweep
from nc_ray.trial import run_pack

import plain_sgd  # bench/ is the script's directory, first on sys.path
from plain_sgd import train_alone

# Ray workers cannot import from bench/: the trainable carries plain_sgd's code with it.
ray.cloudpickle.register_pickle_by_value(plain_sgd)

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


def plain_trainable(config: dict) -> None:
    """What a user's own script would run per trial: load the data, train one network, measure it once."""
    torch.set_num_threads(1)
    member = config["member"]
    data = load_dataset(member["dataset"], n_per_class=member["n_per_class"], standardize=member["standardize"], **member["dataset_params"])
    x, y = data.x_train, data.y_train
    model = build_model(
        member["arch"], data.in_dim, member["width"], member["depth"], data.n_classes,
        member["activation"], member["bias"], seed=member["seed"],
    )
    train_alone(
        model, x, y, lr=member["lr"], momentum=member["momentum"], weight_decay=member["weight_decay"],
        batch_size=member["batch_size"] or len(x), epochs=member["epochs"], seed=member["seed"], loss=member["loss"],
    )
    layers = member_metrics(model, x, y, weight_decay=member["weight_decay"], loss=member["loss"])
    with torch.no_grad():
        test_acc = (model(data.x_test).argmax(-1) == data.y_test).double().mean().item()
    penultimate = layers[-1]  # layer L: its input is the penultimate features
    tune.report({
        "train_loss": penultimate["loss"], "train_acc": penultimate["accuracy"], "test_acc": test_acc,
        "tcv_rel_penultimate": penultimate["tcv_rel"], "nc1_penultimate": penultimate["nc1"],
    })


def run_plain_tune(members: list[MemberConfig], storage: Path, reuse_actors: bool) -> float:
    """a1 / a2: one Tune trial per member; returns the seconds of Tuner.fit()."""
    tuner = tune.Tuner(
        tune.with_resources(plain_trainable, {"cpu": 1}),
        param_space={"member": tune.grid_search([m.to_dict() for m in members])},
        tune_config=tune.TuneConfig(reuse_actors=reuse_actors),
        run_config=tune.RunConfig(storage_path=str(storage), verbose=0),
    )
    started = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - started
    if results.errors or len(results) != len(members):
        raise RuntimeError(f"plain Tune: {len(results.errors)} of {len(results)} trials failed, first: {results.errors[:1]}")
    return seconds


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant, interleaved (default 3)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of a1,a2,b,c (default all)")
    parser.add_argument("--members", type=int, default=None, help="a1 and a2 train only N members, spread evenly over the grid")
    parser.add_argument("--floor-threads", type=int, default=os.cpu_count(), help="torch threads of c (default: every CPU)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    with tempfile.TemporaryDirectory(prefix="bench_sweep-") as temporary:
        root = Path(temporary)
        spec_path = write_spec(root)
        spec = load_spec(spec_path)
        members = spec.members()
        if args.members is not None and not 1 <= args.members <= len(members):
            parser.error(f"--members must be between 1 and {len(members)}")
        # Evenly spaced, so that every depth is in the subset in its share.
        plain_members = members[:: len(members) // args.members][: args.members] if args.members else members
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
            ray.init(num_cpus=cpus, include_dashboard=False)
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


if __name__ == "__main__":
    main()
