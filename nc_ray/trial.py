"""One pack from start to finish: load data, train, evaluate on cadence, write rows and weights.

`run_pack` knows nothing of Ray: Tune's trainable (in `nc_ray.sweep`) wraps it with a callback
that saves the run's state, and benchmarks call it directly. Rows of evaluation epoch e are
published before the state of epoch e is handed over, so a restart from any saved state
rewrites, under the same names, exactly the files a crashed attempt may have left.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
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

import nc_ray
from nc_ray.data import Dataset, load_dataset
from nc_ray.metrics import evaluate, pack_metrics
from nc_ray.models import Architecture, Network, PackedNetwork, build_model
from nc_ray.spec import MemberConfig
from nc_ray.store import PackPlan, SweepStore
from nc_ray.train import PackTrainer, default_device

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
def _cached_dataset(name: str, n_per_class: int | None, standardize: bool, params: str) -> Dataset:
    # One load per worker process: with actor reuse, later packs of a sweep skip the load.
    return load_dataset(name, n_per_class=n_per_class, standardize=standardize, **json.loads(params))


def member_data(config: dict) -> MemberData:
    """Rebuild the data a member config trains and measures on (deterministic)."""
    dataset = _cached_dataset(config["dataset"], config["n_per_class"], config["standardize"], config["dataset_params"])
    x_metric, y_metric = dataset.x_train, dataset.y_train
    if config["metric_subset_per_class"] is not None:
        index = class_balanced_indices(dataset.y_train, config["metric_subset_per_class"])
        x_metric, y_metric = x_metric[index], y_metric[index]
    return MemberData(dataset.x_train, dataset.y_train, x_metric, y_metric, dataset.x_test, dataset.y_test, dataset.n_classes)


def architecture(config: dict, data: MemberData) -> Architecture:
    return Architecture(
        config["arch"], int(np.prod(data.x_train.shape[1:])), config["width"], config["depth"],
        data.n_classes, config["activation"], config["bias"],
    )


def member_config(record: dict) -> MemberConfig:
    """The `MemberConfig` of a stored member record (see `nc_ray.store.member_record`)."""
    fields = {f.name for f in dataclasses.fields(MemberConfig)}
    return MemberConfig.from_dict({
        **{key: value for key, value in record.items() if key in fields},
        "dataset_params": json.loads(record["dataset_params"]),
    })


class PackRun:
    """The state of one pack's run; `run()` drives it to the end."""

    def __init__(self, pack: PackPlan, store: SweepStore, device: torch.device | str | None = None):
        self.pack = pack
        self.store = store
        self.configs = pack.members
        first = self.configs[0]
        self.loss = first["loss"]
        self.data = member_data(first)
        self.device = torch.device(device) if device is not None else default_device()
        self.model = PackedNetwork(architecture(first, self.data), [c["seed"] for c in self.configs])
        self.trainer = PackTrainer(
            self.model, self.data.x_train, self.data.y_train,
            learning_rates=[c["lr"] for c in self.configs],
            weight_decays=[c["weight_decay"] for c in self.configs],
            seeds=[c["seed"] for c in self.configs],
            loss=first["loss"], batch_size=first["batch_size"], momentum=first["momentum"], device=self.device,
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
        """Train to the final epoch, publishing rows at each evaluation; return the members rows."""
        first = self.configs[0]
        epochs = member_config(first).evaluation_epochs()
        if self.trainer.epoch == 0 and 0 in epochs:
            self._evaluate_and_publish(on_checkpoint)
        while self.trainer.epoch < first["epochs"]:
            started = time.perf_counter()
            self.trainer.train_epoch()
            self.wall_time += time.perf_counter() - started
            if self.trainer.epoch in epochs:
                self._evaluate_and_publish(on_checkpoint)
        return self._finish()

    def _evaluate_and_publish(self, on_checkpoint: CheckpointCallback | None) -> None:
        started = time.perf_counter()
        epoch = self.trainer.epoch
        active = [index for index, diverged in enumerate(self.trainer.diverged) if not diverged]
        metric_rows, spectra_rows = [], []
        if active:
            sub_pack = self.model.select(active)
            config_of = [self.configs[i] for i in active]
            result = pack_metrics(
                sub_pack, self.x_metric, self.y_metric, weight_decays=[c["weight_decay"] for c in config_of],
                loss=self.loss, n_classes=self.data.n_classes,
            )
            train = result.member if self.data.metric_is_train else evaluate(sub_pack, self.trainer.x, self.trainer.y, self.loss)
            test = evaluate(sub_pack, self.x_test, self.y_test, self.loss)
            metric_set = "train" if self.data.metric_is_train else "train_subset"
            for position, index in enumerate(active):
                config = self.configs[index]
                evaluation = {
                    "train_loss": float(train["loss"][position]), "train_acc": float(train["accuracy"][position]),
                    "test_loss": float(test["loss"][position]), "test_acc": float(test["accuracy"][position]),
                }
                certificate = result.layer["b0"][position]
                if not (np.isfinite(list(evaluation.values())).all() and np.isfinite(certificate).all()):
                    # Overflowed since the last steps' checks: diverged; its last finite rows stand.
                    self.trainer.mark_diverged([index])
                    continue
                self.last_evaluation[index] = {**evaluation, "epoch": epoch}
                keys = {"member_id": config["member_id"], "pack_id": self.pack.pack_id, "epoch": epoch, **config}
                for row in result.rows(position):
                    spectra_rows.append({**keys, "layer": row["layer"], "singular_values": row.pop("singular_values")})
                    metric_rows.append({**keys, **row, **evaluation, "metric_set": metric_set, "n_metric": result.n_samples})
        stem = f"{self.pack.pack_id}-e{epoch:06d}"
        self.store.write_table("metrics", stem, metric_rows)
        self.store.write_table("spectra", stem, spectra_rows)
        self.store.write_json(f"progress/{self.pack.pack_id}.json", {
            "epoch": epoch, "epochs": self.configs[0]["epochs"], "host": socket.gethostname(), "pid": os.getpid(),
        })
        self.metrics_time += time.perf_counter() - started
        if on_checkpoint is not None:
            accuracies = [e["train_acc"] for e in self.last_evaluation if e is not None]
            on_checkpoint(self.state_dict(), {
                "epoch": epoch, "members_active": len(active),
                "train_acc_median": float(np.median(accuracies)) if accuracies else float("nan"),
            }, metric_rows)

    def _finish(self) -> list[dict]:
        tensors, rows = {}, []
        diverged_epoch = self.trainer.diverged_epoch.tolist()
        finished_at = datetime.datetime.now(datetime.timezone.utc)
        for index, config in enumerate(self.configs):
            member = self.model.member(index)
            for layer, weight in enumerate(member.weight_matrices(), start=1):
                tensors[f"{config['member_id']}/W{layer}"] = weight.detach().contiguous()
            for layer, bias in enumerate(member.bias_vectors() or [], start=1):
                tensors[f"{config['member_id']}/b{layer}"] = bias.detach().contiguous()
            evaluation = self.last_evaluation[index] or {}
            diverged = diverged_epoch[index] >= 0
            rows.append({
                **config, "pack_id": self.pack.pack_id,
                "status": "diverged" if diverged else "complete",
                "diverged_epoch": diverged_epoch[index] if diverged else None,
                "epochs_run": diverged_epoch[index] if diverged else self.trainer.epoch,
                "final_epoch": evaluation.get("epoch"),
                **{k: evaluation.get(k) for k in ("train_loss", "train_acc", "test_loss", "test_acc")},
                "n_train": len(self.data.x_train), "n_metric": len(self.data.x_metric),
                "wall_time_s": self.wall_time + self.metrics_time, "device": str(self.device),
                "nc_ray_version": nc_ray.__version__, "finished_at": finished_at,
            })
        self.store.write_weights(self.pack.pack_id, tensors, {"pack_id": self.pack.pack_id})
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
    """(model, data) of one member: its final weights in a `build_model` module, and the exact
    tensors it was trained (`x_train`, `y_train`) and measured (`x_metric`, `y_metric`) on."""
    store = SweepStore(sweep)
    table = store.read_table("members").filter(pc.field("member_id") == member_id)
    if table.num_rows == 0:
        raise KeyError(f"{store.uri}: no member {member_id!r} in the members table")
    config = table.slice(0, 1).to_pylist()[0]
    data = member_data(config)
    spec = architecture(config, data)
    model = build_model(**vars(spec))
    tensors = store.read_weights(config["pack_id"])
    with torch.no_grad():
        for layer, module in enumerate(model.layers, start=1):
            module.weight.copy_(tensors[f"{member_id}/W{layer}"])
            if spec.bias:
                module.bias.copy_(tensors[f"{member_id}/b{layer}"])
    return model, data
