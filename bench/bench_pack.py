"""Packing speed-up and metrics overhead on sklearn digits, measured side by side in one run.

    python bench/bench_pack.py [--members 32] [--epochs 20] [--alone 8] [--metric-epochs 200]

1. Per-member training time: a pack of G members (PackTrainer) versus the same members trained
   one by one as plain modules with torch.optim.SGD (timed on `--alone` of them, per member).
2. Metrics overhead: a `--metric-epochs` run of the pack with 10 evaluations (pack_metrics on
   the full training set plus test accuracy); metrics time as a fraction of training time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from nc_ray.data import load_dataset
from nc_ray.metrics import evaluate, pack_metrics
from nc_ray.models import Architecture, PackedNetwork, build_model
from nc_ray.train import PackTrainer
from plain_sgd import train_alone  # bench/ is the script's directory, first on sys.path

WIDTH, DEPTH, BATCH, LR, MOMENTUM = 64, 4, 128, 0.05, 0.9


def members(count: int) -> tuple[list[float], list[int]]:
    decays = np.geomspace(1e-4, 3e-2, max(1, count // 4)).tolist()
    grid = [(decay, seed) for seed in range(4) for decay in decays][:count]
    return [d for d, _ in grid], [s for _, s in grid]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--alone", type=int, default=8, help="members timed one by one (per-member time is their mean)")
    parser.add_argument("--metric-epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset("digits")
    x, y = data.x_train, data.y_train
    spec = Architecture("mlp", data.in_dim, WIDTH, DEPTH, data.n_classes)
    decays, seeds = members(args.members)
    print(f"digits: {len(x)} train samples, mlp width {WIDTH} depth {DEPTH}, batch {BATCH}, {args.threads} threads, device cpu")

    def pack_trainer() -> PackTrainer:
        return PackTrainer(
            PackedNetwork(spec, seeds), x, y, learning_rates=[LR] * len(seeds), weight_decays=decays,
            seeds=seeds, loss="ce", batch_size=BATCH, momentum=MOMENTUM, device="cpu",
        )

    trainer = pack_trainer()
    started = time.perf_counter()
    for _ in range(args.epochs):
        trainer.train_epoch()
    packed = (time.perf_counter() - started) / len(seeds)

    started = time.perf_counter()
    for index in range(args.alone):
        model = build_model(**vars(spec), seed=seeds[index])
        train_alone(model, x, y, lr=LR, momentum=MOMENTUM, weight_decay=decays[index], batch_size=BATCH,
                    epochs=args.epochs, seed=seeds[index], loss="ce")
    alone = (time.perf_counter() - started) / args.alone
    print(f"[1] {args.epochs} epochs per member: packed ({len(seeds)} members) {packed * 1e3:.1f} ms, "
          f"alone {alone * 1e3:.1f} ms -> speed-up per member {alone / packed:.2f}x")

    trainer = pack_trainer()
    evaluation_epochs = set(np.linspace(0, args.metric_epochs, 11).astype(int)[1:].tolist())
    train_time = metrics_time = 0.0
    for epoch in range(1, args.metric_epochs + 1):
        started = time.perf_counter()
        trainer.train_epoch()
        train_time += time.perf_counter() - started
        if epoch in evaluation_epochs:
            started = time.perf_counter()
            result = pack_metrics(trainer.model, x, y, weight_decays=decays, loss="ce", n_classes=data.n_classes)
            evaluate(trainer.model, data.x_test, data.y_test, "ce")
            metrics_time += time.perf_counter() - started
    assert result.layer["bound_ok"].all()
    print(f"[2] {args.metric_epochs} epochs with {len(evaluation_epochs)} evaluations: training {train_time:.2f} s, "
          f"metrics {metrics_time:.2f} s -> metrics overhead {metrics_time / train_time:.1%} of training time; "
          f"final train acc median {np.median(result.member['accuracy']):.3f}")


if __name__ == "__main__":
    main()
