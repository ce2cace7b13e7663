"""Packing speed-up, the matmul roofline and metrics overhead on sklearn digits, measured side by side in one run.

    python bench/bench_pack.py [--members 64] [--epochs 20] [--threads 1] [--repeats 3] [--alone 8] [--metric-epochs 200]

1. Per-member training time (mlp width 64, depth 4, batch 128, cross-entropy), the median of
   `--repeats` rounds, each round timing all three in turn so that a shared machine's load
   hits them alike; wall-clock and, less sensitive to other processes, this process's CPU time:
   - pack: G members trained as one pack (PackTrainer, its construction included);
   - alone: the same members trained one by one as plain modules with torch.optim.SGD (timed
     on `--alone` of them, per member);
   - roofline: the pack's matrix products alone, as bare torch.bmm/baddbmm calls on the same
     shapes for the same steps (per step and layer: Z Wᵀ forward, Dᵀ Z into the momentum, D W
     for the layers above the first), and the pack's achieved fraction of it.
2. Metrics overhead: a `--metric-epochs` run of the pack with 10 evaluations (pack_metrics on
   the full training set plus test accuracy); metrics time as a fraction of training time
   (skipped with `--metric-epochs 0`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

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


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds of run()."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def matmul_roofline(spec: Architecture, size: int, n: int, epochs: int) -> tuple[Callable[[], None], float]:
    """A run of the pack's forward and backward matrix products over `epochs` as bare calls on
    random tensors of the trainer's shapes (its batches of BATCH rows and the rest), and its FLOPs."""
    shapes = spec.layer_shapes()
    weights = [torch.randn(size, out_dim, in_dim) for out_dim, in_dim in shapes]
    momenta = [torch.zeros_like(w) for w in weights]
    batches = [min(BATCH, n - start) for start in range(0, n, BATCH)]
    operands = {  # layer inputs Z (G, b, in) and output gradients D (G, b, out) per batch size b
        b: [(torch.randn(size, b, in_dim), torch.randn(size, b, out_dim)) for out_dim, in_dim in shapes] for b in set(batches)
    }
    products_per_step = [(3 if layer > 0 else 2) for layer in range(len(shapes))]
    flops = epochs * sum(2 * size * b * out_dim * in_dim * calls for b in batches for (out_dim, in_dim), calls in zip(shapes, products_per_step))

    def run() -> None:
        for _ in range(epochs):
            for b in batches:
                for layer, (weight, momentum, (z, d)) in enumerate(zip(weights, momenta, operands[b])):
                    torch.bmm(z, weight.transpose(1, 2))
                    momentum.baddbmm_(d.transpose(1, 2), z, beta=MOMENTUM)
                    if layer > 0:
                        torch.bmm(d, weight)

    return run, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of [1]; the figures are their medians")
    parser.add_argument("--alone", type=int, default=8, help="members timed one by one (per-member time is their mean)")
    parser.add_argument("--metric-epochs", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset("digits")
    x, y = data.x_train, data.y_train
    spec = Architecture("mlp", data.in_dim, WIDTH, DEPTH, data.n_classes)
    decays, seeds = members(args.members)
    print(f"digits: {len(x)} train samples, mlp width {WIDTH} depth {DEPTH}, batch {BATCH}, {args.epochs} epochs, "
          f"{len(seeds)} members, {args.threads} threads, device cpu; medians of {args.repeats} rounds")

    def pack_trainer() -> PackTrainer:
        return PackTrainer(
            PackedNetwork(spec, seeds), x, y, learning_rates=[LR] * len(seeds), weight_decays=decays,
            seeds=seeds, loss="ce", batch_size=BATCH, momentum=MOMENTUM, device="cpu",
        )

    def train_pack() -> None:
        trainer = pack_trainer()
        for _ in range(args.epochs):
            trainer.train_epoch()

    def train_each_alone() -> None:
        for index in range(args.alone):
            model = build_model(**vars(spec), seed=seeds[index])
            train_alone(model, x, y, lr=LR, momentum=MOMENTUM, weight_decay=decays[index], batch_size=BATCH,
                        epochs=args.epochs, seed=seeds[index], loss="ce")

    # First calls pay one-time costs (lazy initialization in torch and autograd): one untimed epoch of each.
    pack_trainer().train_epoch()
    train_alone(build_model(**vars(spec), seed=seeds[0]), x, y, lr=LR, momentum=MOMENTUM, weight_decay=decays[0],
                batch_size=BATCH, epochs=1, seed=seeds[0], loss="ce")
    roofline, flops = matmul_roofline(spec, len(seeds), len(x), args.epochs)
    runs = {"pack": (train_pack, len(seeds)), "alone": (train_each_alone, args.alone), "roofline": (roofline, len(seeds))}
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (run, count) in runs.items():
            wall, cpu = timed(run)
            rounds[name].append((wall / count, cpu / count))
    gflop = flops / len(seeds) / 1e9  # per member
    print(f"[1] {args.epochs} epochs, per member ({gflop:.2f} GFLOP of matrix products), ms wall / ms CPU:")
    for clock, column in (("wall", 0), ("CPU", 1)):
        pack, alone, bare = (statistics.median(r[column] for r in rounds[name]) for name in runs)
        print(f"    {clock:4s}: pack {pack * 1e3:6.1f} ({gflop / pack:3.0f} GFLOP/s), alone {alone * 1e3:6.1f} "
              f"-> speed-up {alone / pack:.2f}x; bare bmm roofline {bare * 1e3:5.1f} ({gflop / bare:3.0f} GFLOP/s) "
              f"-> pack at {bare / pack:.0%} of it")
    for name, times in rounds.items():
        print(f"    rounds, {name}: " + ", ".join(f"{wall * 1e3:.1f} / {cpu * 1e3:.1f}" for wall, cpu in times))
    if args.metric_epochs == 0:
        return

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
