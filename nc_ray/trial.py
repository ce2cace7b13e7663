"""One pack from start to finish: load data, train, evaluate on cadence, write rows and weights.

`run_pack` knows nothing of Ray: Tune's trainable (in `nc_ray.sweep`) wraps it with a callback
that saves the run's state, and benchmarks call it directly. Rows of evaluation epoch e are
published before the state of epoch e is handed over, so a restart from any saved state
rewrites, under the same names, exactly the files a crashed attempt may have left.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import functools
import io
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from nc_ray._version import __version__
from nc_ray.config import MemberConfig, PackPlan
from nc_ray.data import Dataset, load_dataset
from nc_ray.metrics import evaluate, pack_metrics
from nc_ray.models import Architecture, Network, PackedNetwork, build_model
from nc_ray.schema import KEY_CONFIG
from nc_ray.store import SweepStore
from nc_ray.train import PackTrainer, default_device

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

# (run state to save, small summary for the scheduler, the metric rows just published)
CheckpointCallback = Callable[[dict[str, Any], dict[str, float], list[dict]], None]


@dataclass(frozen=True)
class MemberData:
    """The exact tensors a member was trained on (train) and measured on (metric), plus its test set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_metric: torch.Tensor
    y_metric: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def metric_is_train(self) -> bool:
        return len(self.x_metric) == len(self.x_train)


def class_balanced_indices(y: torch.Tensor, per_class: int) -> torch.Tensor:
    """The first `per_class` indices of each class in order (all of a smaller class), ascending."""
    chosen = [torch.nonzero(y == c).flatten()[:per_class] for c in torch.unique(y)]
    return torch.sort(torch.cat(chosen)).values


@functools.lru_cache(maxsize=4)
def _cached_dataset(name: str, n_per_class: int | None, standardize: bool, params: tuple) -> Dataset:
    # One load per worker process: with actor reuse, later packs of a sweep skip the load.
    return load_dataset(name, n_per_class=n_per_class, standardize=standardize, **dict(params))


def member_data(config: MemberConfig) -> MemberData:
    """Rebuild the data a member trains and measures on (deterministic)."""
    dataset = _cached_dataset(config.dataset, config.n_per_class, config.standardize, config.dataset_params)
    x_metric, y_metric = dataset.x_train, dataset.y_train
    if config.metric_subset_per_class is not None:
        index = class_balanced_indices(dataset.y_train, config.metric_subset_per_class)
        x_metric, y_metric = x_metric[index], y_metric[index]
    return MemberData(dataset.x_train, dataset.y_train, x_metric, y_metric, dataset.x_test, dataset.y_test, dataset.n_classes)


def architecture(config: MemberConfig, data: MemberData) -> Architecture:
    return Architecture(
        config.arch, int(np.prod(data.x_train.shape[1:])), config.width, config.depth,
        data.n_classes, config.activation, config.bias, config.residual_init,
    )


def write_weights(store: SweepStore, pack_id: str, tensors: dict[str, torch.Tensor]) -> None:
    """A pack's final weights as safetensors (no pickle): keys "<member_id>/W<l>" and "/b<l>"."""
    store.write_bytes(f"weights/{pack_id}.safetensors", save_safetensors(tensors, metadata={"pack_id": pack_id}))


def read_weights(store: SweepStore, pack_id: str) -> dict[str, torch.Tensor]:
    return load_safetensors(store.read_bytes(f"weights/{pack_id}.safetensors"))


def write_state(store: SweepStore, pack_id: str, state: dict[str, Any]) -> None:
    """A running pack's training state (replaced atomically at every evaluation)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write_bytes(f"state/{pack_id}.pt", buffer.getvalue())


def read_state(store: SweepStore, pack_id: str) -> dict[str, Any] | None:
    """The latest saved training state of a pack, or None; tensors and plain data only."""
    if not store.exists(f"state/{pack_id}.pt"):
        return None
    return torch.load(io.BytesIO(store.read_bytes(f"state/{pack_id}.pt")), weights_only=True)


def meets_stop_rule(config: MemberConfig, stationarity: np.ndarray) -> bool:
    """The stop rule on one member's per-layer `stationarity` (NaN where undefined): max over the
    layers where it is defined <= config.stop_stationarity. With λ > 0 it is undefined only on
    zero matrices; a member whose every layer is zero sits at the zero function, a critical
    point, and is stopped. Never true without a stop rule or with λ = 0."""
    if config.stop_stationarity is None or config.weight_decay == 0:
        return False
    defined = stationarity[~np.isnan(stationarity)]
    return defined.size == 0 or float(defined.max()) <= config.stop_stationarity


@functools.cache
def keep_freed_memory() -> None:
    """Have this process's malloc (glibc's; elsewhere nothing changes) keep the memory it frees
    instead of handing it back to the OS.

    A pack allocates and frees tensors of the same few sizes at every step and evaluation. By
    default glibc unmaps or trims the freed ones, and the next allocation faults every page in
    again: 5-8% of a pack's time with two packs training side by side (BENCHMARKS.md). A worker
    process's footprint stays its largest pack's."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    for parameter in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD):
        mallopt(parameter, 1 << 30)


class PackRun:
    """The state of one pack's run; `run()` drives it to the end."""

    def __init__(self, pack: PackPlan, store: SweepStore, device: torch.device | str | None = None):
        keep_freed_memory()
        self.pack = pack
        self.store = store
        self.configs = pack.members
        first = pack.first
        self.data = member_data(first)
        self.device = torch.device(device) if device is not None else default_device()
        self.model = PackedNetwork(architecture(first, self.data), [c.seed for c in self.configs])
        self.trainer = PackTrainer(
            self.model, self.data.x_train, self.data.y_train,
            learning_rates=[c.lr for c in self.configs], weight_decays=[c.weight_decay for c in self.configs],
            seeds=[c.seed for c in self.configs], lr_factors=[c.lr_factor for c in self.configs],
            loss=first.loss, batch_size=first.batch_size, momentum=first.momentum, device=self.device,
        )
        self.x_metric, self.y_metric = self.data.x_metric.to(self.device), self.data.y_metric.to(self.device)
        self.x_test, self.y_test = self.data.x_test.to(self.device), self.data.y_test.to(self.device)
        self.wall_time = 0.0
        self.metrics_time = 0.0
        # Per member: the evaluation of its last finite state (what the members table reports).
        self.last_evaluation: list[dict | None] = [None] * len(self.configs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "trainer": self.trainer.state_dict(), "wall_time": self.wall_time,
            "metrics_time": self.metrics_time, "last_evaluation": json.dumps(self.last_evaluation),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        self.wall_time = float(state["wall_time"])
        self.metrics_time = float(state["metrics_time"])
        self.last_evaluation = json.loads(state["last_evaluation"])

    def run(self, on_checkpoint: CheckpointCallback | None = None) -> list[dict]:
        """Train until every member reached the final epoch, stopped or diverged, publishing rows
        at each evaluation; return the members rows."""
        first = self.pack.first
        if self.trainer.epoch == 0 and first.is_evaluation_epoch(0):
            self._evaluate_and_publish(on_checkpoint)
        while self.trainer.epoch < first.epochs and not self.trainer.done:
            started = time.perf_counter()
            self.trainer.train_epoch()
            self.wall_time += time.perf_counter() - started
            if first.is_evaluation_epoch(self.trainer.epoch):
                self._evaluate_and_publish(on_checkpoint)
        return self._finish()

    def _evaluate_and_publish(self, on_checkpoint: CheckpointCallback | None) -> None:
        started = time.perf_counter()
        epoch = self.trainer.epoch
        active = torch.nonzero(self.trainer.active.cpu()).flatten().tolist()
        metric_rows, spectra_rows, stopping = [], [], []
        if active:
            sub_pack = self.model.select(active)
            config_of = [self.configs[i] for i in active]
            result = pack_metrics(
                sub_pack, self.x_metric, self.y_metric, weight_decays=[c.weight_decay for c in config_of],
                loss=self.pack.first.loss, n_classes=self.data.n_classes,
            )
            train = result.member if self.data.metric_is_train else evaluate(sub_pack, self.trainer.x, self.trainer.y, self.pack.first.loss)
            test = evaluate(sub_pack, self.x_test, self.y_test, self.pack.first.loss)
            metric_set = "train" if self.data.metric_is_train else "train_subset"
            for position, index in enumerate(active):
                config = self.configs[index]
                evaluation = {
                    "train_loss": float(train["loss"][position]), "train_acc": float(train["accuracy"][position]),
                    "test_loss": float(test["loss"][position]), "test_acc": float(test["accuracy"][position]),
                }
                measured = [*evaluation.values(), *result.layer["grad_norm"][position], *result.layer["sv_max"][position]]
                if not np.isfinite(measured).all():
                    # Overflowed since the last steps' checks: diverged; its last finite rows stand.
                    self.trainer.mark_diverged([index])
                    continue
                self.last_evaluation[index] = {**evaluation, "epoch": epoch}
                keys = {"member_id": config.member_id, "pack_id": self.pack.pack_id, "epoch": epoch,
                        **{name: getattr(config, name) for name in KEY_CONFIG}}
                for row in result.rows(position):
                    spectra_rows.append({**keys, "layer": row["layer"], "singular_values": row.pop("singular_values")})
                    metric_rows.append({**keys, **row, **evaluation, "metric_set": metric_set, "n_metric": result.n_samples})
                if meets_stop_rule(config, result.layer["stationarity"][position]):
                    stopping.append(index)
        # Stopped after the rows of this epoch are made, before the state is handed over: a restart
        # from the previous state retrains to here and takes the same decision.
        self.trainer.stop(stopping)
        stem = f"{self.pack.pack_id}-e{epoch:06d}"
        self.store.write_table("metrics", stem, metric_rows)
        self.store.write_table("spectra", stem, spectra_rows)
        self.store.write_json(f"progress/{self.pack.pack_id}.json", {
            "epoch": epoch, "epochs": self.pack.first.epochs, "host": socket.gethostname(), "pid": os.getpid(),
        })
        self.metrics_time += time.perf_counter() - started
        if on_checkpoint is not None:
            accuracies = [e["train_acc"] for e in self.last_evaluation if e is not None]
            on_checkpoint(self.state_dict(), {
                "epoch": epoch, "members_active": int(self.trainer.active.sum()),
                "train_acc_median": float(np.median(accuracies)) if accuracies else float("nan"),
            }, metric_rows)

    def _finish(self) -> list[dict]:
        tensors, rows = {}, []
        diverged_epoch = self.trainer.diverged_epoch.tolist()
        stopped_epoch = self.trainer.stopped_epoch.tolist()
        finished_at = datetime.datetime.now(datetime.timezone.utc)
        for index, config in enumerate(self.configs):
            member = self.model.member(index)
            for layer, weight in enumerate(member.weight_matrices(), start=1):
                tensors[f"{config.member_id}/W{layer}"] = weight.detach().contiguous()
            for layer, bias in enumerate(member.bias_vectors() or [], start=1):
                tensors[f"{config.member_id}/b{layer}"] = bias.detach().contiguous()
            evaluation = self.last_evaluation[index] or {}
            diverged, stopped = diverged_epoch[index] >= 0, stopped_epoch[index] >= 0
            rows.append({
                **config.record(), "pack_id": self.pack.pack_id,
                "status": "diverged" if diverged else "complete",
                "diverged_epoch": diverged_epoch[index] if diverged else None,
                "stopped_epoch": stopped_epoch[index] if stopped else None,
                "epochs_run": diverged_epoch[index] if diverged else stopped_epoch[index] if stopped else self.trainer.epoch,
                "final_epoch": evaluation.get("epoch"),
                **{k: evaluation.get(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc")},
                "n_train": len(self.data.x_train), "n_metric": len(self.data.x_metric),
                "wall_time_s": self.wall_time + self.metrics_time, "device": str(self.device),
                "nc_ray_version": __version__, "finished_at": finished_at,
            })
        write_weights(self.store, self.pack.pack_id, tensors)
        self.store.write_table("members", self.pack.pack_id, rows)
        return rows


def run_pack(
    pack: PackPlan,
    store: SweepStore,
    *,
    state: dict[str, Any] | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    device: torch.device | str | None = None,
) -> list[dict]:
    """Train a pack (from `state` if given) and publish its rows; return its members rows."""
    run = PackRun(pack, store, device)
    if state is not None:
        run.load_state_dict(state)
    return run.run(on_checkpoint)


def load_member(sweep: str, member_id: str) -> tuple[Network, MemberData]:
    """One trained member of a sweep, ready to inspect or measure again.

    Args:
        sweep: the sweep directory (local path or storage URI).
        member_id: the member's id (the `member_id` column of the tables).

    Returns:
        ``(model, data)``: the member's final weights in a `build_model` network, and the exact
        tensors it was trained on (``data.x_train``, ``data.y_train``) and measured on
        (``data.x_metric``, ``data.y_metric``), plus its test set.

    Raises:
        KeyError: the sweep has no such member.

    Example::

        model, data = nc_ray.load_member("runs/quickstart", "f6eb97d3fb2c8748")
        rows = nc_ray.metrics.member_metrics(model, data.x_metric, data.y_metric,
                                             weight_decay=1e-3, loss="mse")
    """
    store = SweepStore(sweep)
    table = store.read_table("members").filter(pc.field("member_id") == member_id)
    if table.num_rows == 0:
        raise KeyError(f"{store.uri}: no member {member_id!r} in the members table")
    record = table.slice(0, 1).to_pylist()[0]
    config = MemberConfig.from_record(record)
    data = member_data(config)
    spec = architecture(config, data)
    model = build_model(**vars(spec))
    tensors = read_weights(store, record["pack_id"])
    with torch.no_grad():
        for layer, module in enumerate(model.layers, start=1):
            module.weight.copy_(tensors[f"{member_id}/W{layer}"])
            if spec.bias:
                module.bias.copy_(tensors[f"{member_id}/b{layer}"])
    return model, data
