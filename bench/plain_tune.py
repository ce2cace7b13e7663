"""The baseline a user would write without nc_ray: one Ray Tune trial per network.

    python bench/plain_tune.py JOB.yaml STORAGE [--reuse-actors] [--members N]

Starts Ray (a local instance of this script's own), then runs one Tune trial per member of the
job (the first N only, with --members: `bench_sweep.py` passes a spread subset), each trial
loading its data, training one network with `torch.optim.SGD` (`plain_sgd.train_alone`) and
measuring it once. Tune's defaults, or TuneConfig(reuse_actors=True). `bench_sweep.py` runs this
file as a fresh process (`--end-to-end`) and calls `run_plain_tune` in its own (in-process mode).
With $NC_RAY_TIMINGS set, it marks the events nc-ray's driver and trials mark (`nc_ray.timings`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from nc_ray import timings

timings.mark("main")

import ray  # noqa: E402 - after the first mark: imports are part of what a user waits for
import torch  # noqa: E402
from ray import tune  # noqa: E402

import plain_sgd  # noqa: E402 - bench/ is the script's directory, first on sys.path
from nc_ray.config import MemberConfig  # noqa: E402
from nc_ray.data import load_dataset  # noqa: E402
from nc_ray.metrics import member_metrics  # noqa: E402
from nc_ray.models import build_model  # noqa: E402
from nc_ray.spec import load_spec  # noqa: E402

# Ray workers cannot import from bench/: the trainable carries plain_sgd's code with it.
ray.cloudpickle.register_pickle_by_value(plain_sgd)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def plain_trainable(config: dict) -> None:
    """What a user's own script would run per trial: load the data, train one network, measure it once."""
    timings.mark("trial_start")
    torch.set_num_threads(1)
    member = config["member"]
    data = load_dataset(member["dataset"], n_per_class=member["n_per_class"], standardize=member["standardize"], **member["dataset_params"])
    x, y = data.x_train, data.y_train
    model = build_model(
        member["arch"], data.in_dim, member["width"], member["depth"], data.n_classes,
        member["activation"], member["bias"], seed=member["seed"],
    )
    timings.mark("train_start", members=1)
    started = time.perf_counter()
    plain_sgd.train_alone(
        model, x, y, lr=member["lr"], momentum=member["momentum"], weight_decay=member["weight_decay"],
        batch_size=member["batch_size"] or len(x), epochs=member["epochs"], seed=member["seed"], loss=member["loss"],
    )
    trained = time.perf_counter()
    layers = member_metrics(model, x, y, weight_decay=member["weight_decay"], loss=member["loss"])
    with torch.no_grad():
        test_acc = (model(data.x_test).argmax(-1) == data.y_test).double().mean().item()
    timings.mark("pack_end", train_s=trained - started, evaluation_s=time.perf_counter() - trained)
    penultimate = layers[-1]  # layer L: its input is the penultimate features
    tune.report({
        "train_loss": penultimate["loss"], "train_acc": penultimate["accuracy"], "test_acc": test_acc,
        "tcv_rel_penultimate": penultimate["tcv_rel"], "nc1_penultimate": penultimate["nc1"],
    })


def run_plain_tune(members: list[MemberConfig], storage: Path, reuse_actors: bool) -> float:
    """One Tune trial per member on the running Ray; returns the seconds of Tuner.fit()."""
    tuner = tune.Tuner(
        tune.with_resources(plain_trainable, {"cpu": 1}),
        param_space={"member": tune.grid_search([m.to_dict() for m in members])},
        tune_config=tune.TuneConfig(reuse_actors=reuse_actors),
        run_config=tune.RunConfig(storage_path=str(storage), verbose=0),
    )
    timings.mark("fit_start")
    started = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - started
    timings.mark("fit_end")
    if results.errors or len(results) != len(members):
        raise RuntimeError(f"plain Tune: {len(results.errors)} of {len(results)} trials failed, first: {results.errors[:1]}")
    return seconds


def spread(members: list[MemberConfig], count: int | None) -> list[MemberConfig]:
    """`count` members evenly spaced over the list (every depth in its share), or all of them."""
    return members[:: len(members) // count][:count] if count else members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec")
    parser.add_argument("storage")
    parser.add_argument("--reuse-actors", action="store_true", help="TuneConfig(reuse_actors=True); default: Tune's defaults")
    parser.add_argument("--members", type=int, default=None, help="train only N members, evenly spaced over the grid")
    args = parser.parse_args()
    members = spread(load_spec(args.spec).members(), args.members)
    timings.mark("ray_start")
    # address="local": this script's own Ray, as on a machine where no other runs (ray.init() would join one)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    timings.mark("ray_up")
    run_plain_tune(members, Path(args.storage).resolve(), args.reuse_actors)
    timings.mark("done")


if __name__ == "__main__":
    main()
