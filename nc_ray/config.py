"""What defines a trained network (`MemberConfig`) and a group of them trained together (`PackPlan`).

A leaf module (standard library only): the spec builds members, the trainer reads their
learning-rate schedules and evaluation epochs, the store writes them, and the read side derives
the tables' config columns from `MemberConfig`'s fields, all without importing torch or Ray.

A member's id is the first 16 hex digits of the sha256 of its canonical JSON. Fields added in
version 2 (the lr schedule and the stop rule) enter the canonical JSON only when they differ
from their defaults, so every member id written by version 1 is unchanged.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("mlp", "resmlp")
# How a resmlp's residual branches and output layer are scaled at initialization (see
# nc_ray.models.Architecture.init_std); null for an mlp, and for a resmlp of nc_ray 0.1 "sqrt_depth".
RESIDUAL_INITS = ("sqrt_depth", "depth")
ACTIVATIONS = ("relu", "leaky_relu", "tanh")
LOSSES = ("ce", "mse")
LR_SCHEDULES = ("constant", "step", "cosine")

# Version-2 fields with their defaults: left out of the member id at these values.
_V2_DEFAULTS: dict[str, Any] = {
    "lr_schedule": "constant", "lr_milestones": None, "lr_gamma": None, "lr_floor": None,
    "lr_warmup_epochs": 0, "stop_stationarity": None, "residual_init": None,
}
# The axes an optuna search or a pack varies: members differing only in these share a pack.
_PACKED = ("lr", "weight_decay", "seed")


@dataclass(frozen=True)
class MemberConfig:
    """Everything that defines one trained network; hashable, JSON round-trippable.

    The lr of epoch e (0-based) is `lr * lr_factor(e)` (see `lr_factor`). With
    `stop_stationarity` set, training of the member stops at the first evaluation where
    max over layers of `stationarity` <= stop_stationarity.
    """

    dataset: str
    dataset_params: tuple[tuple[str, Any], ...]
    n_per_class: int | None
    standardize: bool
    arch: str
    width: int
    depth: int
    activation: str
    bias: bool
    loss: str
    lr: float
    momentum: float
    batch_size: int | None
    epochs: int
    weight_decay: float
    seed: int
    metric_every: int
    metric_initial: bool
    metric_subset_per_class: int | None
    lr_schedule: str = "constant"
    lr_milestones: tuple[int, ...] | None = None
    lr_gamma: float | None = None
    lr_floor: float | None = None
    lr_warmup_epochs: int = 0
    stop_stationarity: float | None = None
    residual_init: str | None = None

    def __post_init__(self) -> None:
        # Canonical types, so equal configs have equal ids (0 and 0.0 are the same weight decay).
        params = self.dataset_params.items() if isinstance(self.dataset_params, dict) else self.dataset_params
        object.__setattr__(self, "dataset_params", tuple(sorted((str(k), v) for k, v in params)))
        for name in ("lr", "momentum", "weight_decay", "lr_gamma", "lr_floor", "stop_stationarity"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))
        if self.lr_milestones is not None:
            object.__setattr__(self, "lr_milestones", tuple(int(m) for m in self.lr_milestones))

    @functools.cached_property
    def member_id(self) -> str:
        """First 16 hex digits of the sha256 of the canonical JSON of `to_dict()` (version-2
        fields at their defaults left out)."""
        canonical = {k: v for k, v in self.to_dict().items() if k not in _V2_DEFAULTS or v != _V2_DEFAULTS[k]}
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def pack_key(self) -> tuple:
        """Every field but lr, weight_decay and seed: members with equal keys can share a pack."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _PACKED)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["dataset_params"] = dict(self.dataset_params)
        d["lr_milestones"] = list(self.lr_milestones) if self.lr_milestones is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemberConfig:
        """Inverse of `to_dict`. Version-2 keys may be missing or null (rows and packs written by
        version 1): they take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names and not (k in _V2_DEFAULTS and v is None)}
        params = values["dataset_params"]
        values["dataset_params"] = tuple(sorted(params.items())) if isinstance(params, dict) else params
        return cls(**values)

    def record(self) -> dict[str, Any]:
        """The flat form stored in tables and pack files: `to_dict()`, `member_id` added,
        dataset_params as canonical JSON."""
        return {**self.to_dict(), "member_id": self.member_id, "dataset_params": json.dumps(dict(self.dataset_params), sort_keys=True)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> MemberConfig:
        """Inverse of `record`; ValueError when the record's member_id is not its config's."""
        params = record["dataset_params"]
        config = cls.from_dict({**record, "dataset_params": json.loads(params) if isinstance(params, str) else params})
        if "member_id" in record and record["member_id"] != config.member_id:
            raise ValueError(f"member record {record['member_id']!r}: its config hashes to {config.member_id!r}")
        return config

    # ------------------------------------------------------------------ schedule and cadence

    def lr_factor(self, epoch: int) -> float:
        """The lr multiplier of epoch `epoch` (0-based, the epoch being trained).

        warm-up (w = lr_warmup_epochs > 0): (epoch + 1) / w for epoch < w, times
          constant: 1
          step:     lr_gamma ** #{milestones m : m <= epoch}   (as torch's MultiStepLR)
          cosine:   floor + (1 - floor) (1 + cos(pi t)) / 2, t = (epoch - w) / (epochs - w) clipped to [0, 1]
        """
        warmup = self.lr_warmup_epochs
        factor = min(1.0, (epoch + 1) / warmup) if warmup > 0 else 1.0
        if self.lr_schedule == "step":
            factor *= self.lr_gamma ** bisect.bisect_right(self.lr_milestones or (), epoch)
        elif self.lr_schedule == "cosine":
            progress = min(1.0, max(0.0, (epoch - warmup) / (self.epochs - warmup)))
            floor = self.lr_floor or 0.0
            factor *= floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return factor

    def is_evaluation_epoch(self, epoch: int) -> bool:
        """Epoch 0 if metric_initial, every multiple of metric_every up to epochs, and epochs."""
        if epoch == 0:
            return self.metric_initial
        return 0 < epoch <= self.epochs and (epoch % self.metric_every == 0 or epoch == self.epochs)

    def evaluation_epochs(self) -> list[int]:
        """Sorted list of the epochs where `is_evaluation_epoch` holds."""
        epochs = list(range(self.metric_every, self.epochs + 1, self.metric_every))
        if not epochs or epochs[-1] != self.epochs:
            epochs.append(self.epochs)
        return ([0] if self.metric_initial else []) + epochs

    def describe_schedule(self) -> str:
        """The lr schedule and stop rule in a few words, as `--dry-run` prints them."""
        if self.lr_schedule == "step":
            text = f"lr x{self.lr_gamma:g} at epochs {list(self.lr_milestones or ())}"
        elif self.lr_schedule == "cosine":
            text = f"cosine lr to {self.lr_floor or 0.0:g}x"
        else:
            text = "constant lr"
        if self.lr_warmup_epochs:
            text += f" after {self.lr_warmup_epochs} warm-up epochs"
        if self.stop_stationarity is not None:
            text += f", stop at stationarity <= {self.stop_stationarity:g}"
        return text


def pack_id_of(member_ids: Iterable[str]) -> str:
    """First 16 hex digits of the sha256 of the sorted member ids, one per line."""
    return hashlib.sha256("\n".join(sorted(member_ids)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PackPlan:
    """One Tune trial: members sharing a shape (`MemberConfig.pack_key`), trained together."""

    pack_id: str
    members: tuple[MemberConfig, ...]

    @classmethod
    def of(cls, members: Sequence[MemberConfig]) -> PackPlan:
        """The pack of these members, its id derived from theirs."""
        if not members:
            raise ValueError("a pack needs at least one member")
        if len({m.pack_key() for m in members}) != 1:
            raise ValueError("the members of a pack must share everything but lr, weight_decay and seed")
        return cls(pack_id_of(m.member_id for m in members), tuple(members))

    @property
    def first(self) -> MemberConfig:
        """The first member: what every member shares (shape, data, epochs, schedule kind) is read here."""
        return self.members[0]

    def to_json(self) -> str:
        return json.dumps({"pack_id": self.pack_id, "members": [m.record() for m in self.members]}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PackPlan:
        data = json.loads(text)
        return cls(pack_id=data["pack_id"], members=tuple(MemberConfig.from_record(r) for r in data["members"]))
