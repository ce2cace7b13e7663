"""GPU throughput of nc-ray on an MNIST-sized MLP sweep: members/minute and GPU utilization per pack size.

    python bench/bench_gpu.py [--pack-sizes 32,128,512] [--gpu-per-trial 0.25] [--members 512] [--epochs 3]

Made to finish in under 5 minutes on one data-center GPU. Data of MNIST's shape, synthetic
(gaussian clusters: 10 classes, 784 dims, `--samples-per-class` 6,000 train and 1,000 test per
class); MLP width 256, depth 4, ReLU, cross-entropy, SGD lr 0.05 momentum 0.9, batch 128; the
members are weight decays x seeds; one evaluation at the last epoch, on 1,000 samples per class.

For each pack size, one `run_sweep` of `--members` members with resources {cpu: 1, gpu:
`--gpu-per-trial`} (so 1/g trials share a GPU), timed from its start to its end (Ray start-up
excluded): members/min. While it runs, `nvidia-smi` is sampled every 0.5 s: mean and 90th
percentile GPU utilization and peak memory used. Without a GPU it runs on the CPU (for checking the
script with small `--samples-per-class` and `--members`), and the GPU columns say n/a.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch
import yaml

from nc_ray.planning import sweep_status
from nc_ray.sweep import run_sweep


class GpuSampler:
    """Samples (utilization %, memory used MiB) of GPU 0 with nvidia-smi every `period` seconds."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples = period, []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stopped.wait(self.period):
            query = subprocess.run(
                ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, check=True,
            )
            utilization, memory = query.stdout.strip().split(", ")
            self.samples.append((float(utilization), float(memory)))

    def __enter__(self) -> GpuSampler:
        if torch.cuda.is_available():
            self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()

    def summary(self) -> str:
        if not self.samples:
            return "GPU util n/a"
        utilization = sorted(u for u, _ in self.samples)
        p90 = utilization[int(0.9 * (len(utilization) - 1))]
        return f"GPU util mean {statistics.mean(utilization):.0f}% p90 {p90:.0f}%, peak memory {max(m for _, m in self.samples):.0f} MiB"


def write_spec(directory: Path, args: argparse.Namespace, pack_size: int) -> Path:
    seeds = 8
    decays = max(1, args.members // seeds)
    spec = {
        "name": f"gpu-pack{pack_size}",
        "dataset": {"name": "gaussian", "params": {
            "n_classes": 10, "dim": 784, "samples_per_class": args.samples_per_class,
            "test_samples_per_class": max(1, args.samples_per_class // 6),
        }},
        "model": {"arch": "mlp", "width": 256, "depth": 4, "activation": "relu"},
        "loss": "ce",
        "training": {"lr": 0.05, "momentum": 0.9, "batch_size": 128, "epochs": args.epochs},
        "grid": {"weight_decay": {"log_range": [1e-5, 1e-2], "num": decays}, "seed": list(range(seeds))},
        "metrics": {"every": args.epochs, "initial": False, "subset_per_class": min(1000, args.samples_per_class)},
        "resources": {"cpu": 1, "gpu": args.gpu_per_trial if torch.cuda.is_available() else 0, "pack_size": pack_size},
    }
    path = directory / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack-sizes", default="32,128,512", help="comma-separated pack sizes to compare")
    parser.add_argument("--gpu-per-trial", type=float, default=0.25)
    parser.add_argument("--members", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples-per-class", type=int, default=6000)
    args = parser.parse_args()
    pack_sizes = [int(size) for size in args.pack_sizes.split(",")]

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU: CPU"
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    print(f"{device}; Ray started in {time.perf_counter() - started:.1f} s (excluded); {ray.cluster_resources()}")
    print(f"data: 10 classes x {args.samples_per_class} train samples, 784 dims; mlp 256 x depth 4; {args.epochs} epochs")
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as temporary:
        root = Path(temporary)
        for pack_size in pack_sizes:
            spec_path = write_spec(root, args, pack_size)
            with GpuSampler() as sampler:
                started = time.perf_counter()
                store = run_sweep(spec_path, root / "runs", show_progress=False)
                seconds = time.perf_counter() - started
            counts = sweep_status(store).counts
            done = counts["complete"] + counts["diverged"]
            print(f"pack size {pack_size:5d}: {done} members in {seconds:6.1f} s = {done / seconds * 60:8.1f} members/min; "
                  f"{sampler.summary()}; {counts}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
