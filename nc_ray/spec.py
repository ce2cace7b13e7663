"""A sweep's job spec: a YAML file parsed and fully validated before anything runs.

Format (only `name` and `dataset.name` are required; the values shown are the defaults)::

    name: quickstart            # [A-Za-z0-9][A-Za-z0-9_.-]*, becomes a directory name
    dataset:
      name: digits              # one of nc_ray.data.dataset_names()
      n_per_class: null         # class-balanced train subsample (int >= 1) or null
      standardize: true
      params: {}                # dataset keyword params, checked against dataset_params(name)
    model: {arch: mlp, width: 64, depth: 4, activation: relu, bias: false, residual_init: depth}
      # residual_init: how a resmlp's branches and output layer are scaled at initialization
      # (depth, or sqrt_depth as in nc_ray 0.1; see nc_ray.models.Architecture.init_std)
    loss: ce                    # ce | mse
    training: {lr: 0.05, momentum: 0.9, batch_size: 128, epochs: 100, weight_decay: 1.0e-3, seed: 0}
      schedule: {kind: constant, warmup_epochs: 0}
        # kind: constant | step (milestones: [e1, e2, ...] required, gamma: 0.1)
        #       | cosine (floor: 0.0, the last lr as a fraction of lr); see MemberConfig.lr_factor
      stop: null                # or {stationarity: 1.0e-2}: stop a member at the first evaluation
                                # where max over layers of stationarity <= this value
    grid: {}                    # axes: dataset arch loss width depth lr weight_decay seed
      # an axis is a non-empty list of distinct values; lr and weight_decay also take
      # {log_range: [low, high], num: N} (numpy.geomspace; exact endpoints, the values between
      # rounded to 12 significant digits; num 1 = [low]), seed also takes {count: N} = [0 .. N-1].
      # Dataset options and params are shared by every dataset on the dataset axis. In optuna
      # mode the searched parameters may not be axes; `grid_points()` lists the other axes' points.
    metrics: {every: null, initial: true, subset_per_class: null}
      # every: null = max(1, epochs // 10); the final epoch is always evaluated
    resources: {cpu: 1, gpu: 0, pack_size: auto, max_failures: 3}
    search:
      mode: grid                # grid | optuna; the next keys are required in optuna mode only
      num_samples: 40           # number of Optuna trials
      weight_decay: {low: 1.0e-5, high: 1.0e-1}    # log-uniform
      lr: {low: 0.01, high: 0.1}                    # optional, log-uniform
      objective: {metric: tcv_rel, layer: penultimate, target: 1.0e-2}
    limits:                     # this job's limits; unset: $NC_RAY_MAX_<KEY> or the default (nc_ray.limits)
      members: 100000           # grid members (the product of the axis lengths), or optuna trials x seeds
      evaluations: 10000        # evaluations per member
      epochs: 1000000
      depth: 1000
      pack_memory_gib: null     # null: half of the memory of the node a trial runs on

Members of the grid are the cartesian product of the axes in the order of `AXES` (the last
axis varies fastest), each axis in its listed order. The base values (model, training,
dataset.name) are members' defaults and are validated even where an axis overrides them.
Unknown keys are errors everywhere; numbers are never parsed from strings; ints are accepted
where floats are expected, bools are not numbers; integers fit int64. YAML `1e-3` (no dot)
reads as a float, and a key repeated within one mapping is an error. A spec file is read only
within the limits of nc_ray.limits (its size, nesting depth and size with aliases expanded).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import reprlib
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from nc_ray.config import ACTIVATIONS, ARCHITECTURES, LOSSES, LR_SCHEDULES, RESIDUAL_INITS, MemberConfig
from nc_ray.data import ParamError, dataset_names, dataset_params, n_classes_of, resolve_params
from nc_ray.limits import DEPTH, EPOCHS, EVALUATIONS, INT64_MAX, MEMBERS, SPEC_BYTES, SPEC_DEPTH, SPEC_NODES, Limit, LimitError, evaluation_count
from nc_ray.schema import FLAG_METRICS, LAYER_METRICS, MEMBER_METRICS

AXES = ("dataset", "arch", "loss", "width", "depth", "lr", "weight_decay", "seed")
OBJECTIVE_METRICS = tuple(m for m in (*LAYER_METRICS, *MEMBER_METRICS) if m not in FLAG_METRICS)  # flags are not quantities
MAX_AXIS_LENGTH = 100_000
MAX_PROBLEM_LINES = 50  # a list of 100,000 bad values is one mistake, not 100,000 lines to read
_SIGNIFICANT_DIGITS = 12
_TAGS = {"<list>", "<map>", "<str>", "<int>", "[key]"}  # pydantic loc parts that are not spec keys

Loc = tuple[Union[str, int], ...]
Problem = tuple[Loc, Any, str]


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


class SpecError(ValueError):
    """An invalid spec: one line "<file>: <key.path>: <repr(value)>: <problem>" per problem."""


def _fail(problems: list[Problem]) -> None:
    """Raise the problems (relative key path, bad value, message) as one pydantic error."""
    if problems:
        summary = "; ".join(f"{_path(loc)}: {msg}" for loc, _, msg in problems)
        raise PydanticCustomError("spec", "{summary}", {"summary": summary, "problems": problems})


def _path(loc: Loc) -> str:
    text = ""
    for part in loc:
        if part in _TAGS:
            continue
        plain = isinstance(part, str) and re.fullmatch(r"[A-Za-z0-9_-]+", part)
        text += f".{part}" if plain else f"[{part}]" if _is_int(part) else f"[{part!r}]"
    return text.lstrip(".") or "<top level>"


# Bounded reprs: a value in an error message may be a list of 100,000 items or a long string.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 4, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 120, 60, 120


def _short(value: Any, limit: int = 120) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format(error: ValidationError, source: str) -> str:
    """One line per problem of a pydantic ValidationError (the first MAX_PROBLEM_LINES, then a count)."""
    lines = []
    for e in error.errors(include_url=False):
        if e["type"] == "spec":
            items = [(e["loc"] + tuple(loc), value, msg) for loc, value, msg in e["ctx"]["problems"]]
        elif e["type"] == "missing":
            items = [(e["loc"], _MISSING, "required key is missing")]
        else:
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            items = [(e["loc"], e["input"], msg)]
        lines += [f"{source}: {_path(loc)}: {_short(value)}: {msg}" for loc, value, msg in items]
    if len(lines) > MAX_PROBLEM_LINES:
        lines[MAX_PROBLEM_LINES:] = [f"{source}: ...: {len(lines) - MAX_PROBLEM_LINES} more problems not shown"]
    return "\n".join(lines)


# ---------------------------------------------------------------- field types


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _either(expected: str, **forms: tuple[Any, Callable[[Any], bool]]) -> Any:
    """A union chosen by the input's shape (so errors come from one form only)."""

    def pick(value: Any) -> str | None:
        return next((f"<{tag}>" for tag, (_, test) in forms.items() if test(value)), None)

    members = tuple(Annotated[kind, Tag(f"<{tag}>")] for tag, (kind, _) in forms.items())
    pick_form = Discriminator(pick, custom_error_type="form", custom_error_message=f"must be {expected}")
    return Annotated[Union[members], pick_form]


def _distinct(values: list[Any]) -> list[Any]:
    first: dict[Any, int] = {}
    _fail([((i,), v, f"duplicate value (also at index {first[v]})")
           for i, v in enumerate(values) if first.setdefault(v, i) != i])
    return values


def _known_dataset(name: str) -> str:
    if name not in dataset_names():
        _fail([((), name, f"unknown dataset; known datasets: {', '.join(dataset_names())}")])
    return name


# Every integer is bounded to int64: members are rows of int64 columns. Larger but finite limits
# (depth, epochs) are checked by SweepSpec against nc_ray.limits.
PosInt = Annotated[int, Field(ge=1, le=INT64_MAX)]
NonNegInt = Annotated[int, Field(ge=0, le=INT64_MAX)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Depth = Annotated[int, Field(ge=2, le=INT64_MAX)]
AxisLength = Annotated[int, Field(ge=1, le=MAX_AXIS_LENGTH)]
DatasetName = Annotated[str, AfterValidator(_known_dataset)]
Arch = Literal[ARCHITECTURES]
Activation = Literal[ACTIVATIONS]
Loss = Literal[LOSSES]
PackSize = _either("'auto' or an integer >= 1", str=(Literal["auto"], _is_str), int=(PosInt, _is_int))
Layer = _either("'penultimate', 'hidden' or an integer >= 1",
                str=(Literal["penultimate", "hidden"], _is_str), int=(PosInt, _is_int))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class LogRange(_Model):
    """`num` log-spaced values from `low` to `high`: numpy.geomspace with exact endpoints and the
    values between rounded to 12 significant digits, so member ids do not depend on numpy's last bit."""

    log_range: Annotated[list[PosFloat], Field(min_length=2, max_length=2)]
    num: AxisLength

    def values(self) -> list[float]:
        low, high = self.log_range
        with np.errstate(all="ignore"):
            inner = [float(f"{v:.{_SIGNIFICANT_DIGITS}g}") for v in np.geomspace(low, high, self.num)[1:-1]]
        return [low] if self.num == 1 else [low, *inner, high]

    @model_validator(mode="after")
    def _check(self) -> LogRange:
        if self.num > 1 and not self.log_range[0] < self.log_range[1]:
            _fail([(("log_range",), self.log_range, "must be [low, high] with low < high")])
        elif not all(0 < v < math.inf for v in self.values()):
            _fail([(("log_range",), self.log_range, "too wide: values overflow")])
        elif len(set(self.values())) < self.num:
            _fail([(("num",), self.num, "too many values for this range: some coincide")])
        return self


class Count(_Model):
    """Seeds 0 .. count-1."""

    count: AxisLength

    def values(self) -> list[int]:
        return list(range(self.count))


def _axis(item: Any, mapping: Any = None) -> Any:
    """A grid axis: a non-empty list of distinct `item`s, or (if given) the `mapping` form."""
    listed = Annotated[list[item], Field(min_length=1, max_length=MAX_AXIS_LENGTH), AfterValidator(_distinct)]
    if mapping is None:
        return Union[listed, None]
    return Union[_either(f"a list or a {{{next(iter(mapping.model_fields))}: ...}} mapping",
                         list=(listed, lambda v: isinstance(v, list)),
                         map=(mapping, lambda v: isinstance(v, (dict, mapping)))), None]


# ---------------------------------------------------------------- spec sections


class DatasetSpec(_Model):
    """`params` are checked, values too, by `nc_ray.data.resolve_params` without loading data (but
    `arrays` reads its file whole). With one dataset in play, `SweepSpec` adds the values the
    dataset pins (`arrays`: its file's absolute path, sha256 and K; `mnist1d`: every generator
    argument). A relative `path` is relative to the current directory."""

    name: DatasetName
    n_per_class: PosInt | None = None
    standardize: bool = True
    params: dict[str, Any] = {}


class ModelSpec(_Model):
    arch: Arch = "mlp"
    width: PosInt = 64
    depth: Depth = 4
    activation: Activation = "relu"
    bias: bool = False
    residual_init: Literal[RESIDUAL_INITS] = "depth"  # resmlp only: see nc_ray.models.Architecture.init_std


class ScheduleSpec(_Model):
    """The lr schedule, a multiplier of each member's lr per epoch (`MemberConfig.lr_factor`)."""

    kind: Literal[LR_SCHEDULES] = "constant"
    milestones: Annotated[list[PosInt], Field(min_length=1, max_length=1000)] | None = None
    gamma: PosFloat | None = None
    floor: Annotated[float, Field(ge=0, le=1)] | None = None
    warmup_epochs: NonNegInt = 0

    @model_validator(mode="after")
    def _check(self) -> ScheduleSpec:
        owners = {"milestones": "step", "gamma": "step", "floor": "cosine"}
        problems = [((key,), getattr(self, key), f"only allowed with kind: {kind}")
                    for key, kind in owners.items() if getattr(self, key) is not None and self.kind != kind]
        if self.kind == "step" and self.milestones is None:
            problems.append((("milestones",), _MISSING, "required with kind: step"))
        milestones = self.milestones or []
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            problems.append((("milestones",), milestones, "must be strictly increasing"))
        _fail(problems)
        return self


class StopSpec(_Model):
    """Stop a member at the first evaluation where max over layers of `stationarity` <= this."""

    stationarity: PosFloat


class TrainingSpec(_Model):
    lr: PosFloat = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    batch_size: PosInt | None = 128
    epochs: PosInt = 100
    weight_decay: NonNegFloat = 1e-3
    seed: NonNegInt = 0
    schedule: ScheduleSpec = ScheduleSpec()
    stop: StopSpec | None = None


class GridSpec(_Model):
    dataset: _axis(DatasetName) = None
    arch: _axis(Arch) = None
    loss: _axis(Loss) = None
    width: _axis(PosInt) = None
    depth: _axis(Depth) = None
    lr: _axis(PosFloat, LogRange) = None
    weight_decay: _axis(NonNegFloat, LogRange) = None
    seed: _axis(NonNegInt, Count) = None

    def axes(self) -> dict[str, list[Any]]:
        """The given axes, in `AXES` order, with ranges and counts expanded to lists."""
        axes = {name: getattr(self, name) for name in AXES if getattr(self, name) is not None}
        return {name: list(v) if isinstance(v, list) else v.values() for name, v in axes.items()}

    def lengths(self) -> dict[str, int]:
        """The number of values of each given axis, in `AXES` order, without expanding any."""
        axes = {name: getattr(self, name) for name in AXES if getattr(self, name) is not None}
        return {name: len(v) if isinstance(v, list) else v.num if isinstance(v, LogRange) else v.count
                for name, v in axes.items()}


class MetricsSpec(_Model):
    every: PosInt | None = None
    initial: bool = True
    subset_per_class: PosInt | None = None


class ResourcesSpec(_Model):
    cpu: PosFloat = 1.0
    gpu: NonNegFloat = 0.0
    pack_size: PackSize = "auto"
    max_failures: NonNegInt = 3


class Range(_Model):
    """A log-uniform search range."""

    low: PosFloat
    high: PosFloat

    @model_validator(mode="after")
    def _check(self) -> Range:
        if not self.low < self.high:
            _fail([(("high",), self.high, f"must be > low ({self.low!r})")])
        return self


class Objective(_Model):
    metric: Literal[OBJECTIVE_METRICS]
    layer: Layer
    target: PosFloat


class SearchSpec(_Model):
    mode: Literal["grid", "optuna"] = "grid"
    num_samples: PosInt | None = None
    weight_decay: Range | None = None
    lr: Range | None = None
    objective: Objective | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        optuna = self.mode == "optuna"
        _fail([((key,), getattr(self, key), "only allowed with mode: optuna") for key in
               ("num_samples", "weight_decay", "lr", "objective") if not optuna and getattr(self, key) is not None]
              + [((key,), _MISSING, "required with mode: optuna") for key in
                 ("num_samples", "weight_decay", "objective") if optuna and getattr(self, key) is None])
        return self


class LimitsSpec(_Model):
    """This job's own limits (see nc_ray.limits); one not set here comes from its $NC_RAY_MAX_*
    variable or its default. `SweepSpec.resolved()` records the values in force, so that workers
    and resumes check against the limits the sweep started with."""

    members: PosInt | None = None
    evaluations: PosInt | None = None
    epochs: PosInt | None = None
    depth: Depth | None = None
    pack_memory_gib: PosFloat | None = None


def _param_ok(default: Any, value: Any) -> bool:
    """`value` has the kind of the dataset param's `default` (ints pass for floats, bools only for bools)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and math.isfinite(value)
    if default is None:
        return value is None or isinstance(value, (str, int)) or isinstance(value, float) and math.isfinite(value)
    return isinstance(value, type(default))


class SweepSpec(_Model):
    """A validated sweep spec; `members()` lists its grid."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=200)]
    dataset: DatasetSpec
    model: ModelSpec = ModelSpec()
    loss: Loss = "ce"
    training: TrainingSpec = TrainingSpec()
    grid: GridSpec = GridSpec()
    metrics: MetricsSpec = MetricsSpec()
    resources: ResourcesSpec = ResourcesSpec()
    search: SearchSpec = SearchSpec()
    limits: LimitsSpec = LimitsSpec()

    @property
    def datasets(self) -> list[str]:
        """Every dataset in play: dataset.name, then those of the dataset axis."""
        return list(dict.fromkeys([self.dataset.name, *(self.grid.dataset or [])]))

    @property
    def metric_every(self) -> int:
        return self.metrics.every or max(1, self.training.epochs // 10)

    def _values(self, axis: str, base: Any, where: Loc) -> list[tuple[Loc, Any]]:
        """(key path, value) of the base value and of every value on the grid axis."""
        listed = getattr(self.grid, axis)
        grid = [(("grid", axis, i), v) for i, v in enumerate(listed)] if isinstance(listed, list) else []
        return [(where, base), *grid]

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        problems: list[Problem] = []
        n_classes, resolved = {}, {}
        for name in self.datasets:
            accepted = dataset_params(name)
            bad = [((k,), v, f"unknown parameter for dataset {name!r}; accepted: {', '.join(accepted) or '(none)'}")
                   if k not in accepted else ((k,), v, f"must be of the type of the default {accepted[k]!r}")
                   for k, v in self.dataset.params.items() if k not in accepted or not _param_ok(accepted[k], v)]
            if not bad:
                try:
                    resolved[name] = resolve_params(name, self.dataset.params)
                    n_classes[name] = n_classes_of(name, **resolved[name])
                except ParamError as e:
                    bad = [((e.key,), e.value, f"dataset {name!r}: {e.why}")]
            problems += [(("dataset", "params", *loc), v, msg) for loc, v, msg in bad]
        if len(resolved) == len(self.datasets) == 1:
            # The pinned params replace the given ones (once, before anything reads them), so that
            # resolved() and every member carry them. Params shared by a dataset axis stay as given:
            # a dataset that pins values has params no other dataset accepts.
            object.__setattr__(self, "dataset", self.dataset.model_copy(update={"params": resolved[self.dataset.name]}))
        for loc, width in self._values("width", self.model.width, ("model", "width")):
            problems += [(loc, width, f"must be >= {k}, the number of classes of dataset {name!r}")
                         for name, k in n_classes.items() if width < k][:1]
        schedule, epochs = self.training.schedule, self.training.epochs
        if schedule.warmup_epochs >= epochs and schedule.warmup_epochs > 0:
            problems.append((("training", "schedule", "warmup_epochs"), schedule.warmup_epochs,
                             f"must be < training.epochs ({epochs})"))
        problems += [(("training", "schedule", "milestones", i), m, f"must be < training.epochs ({epochs})")
                     for i, m in enumerate(schedule.milestones or []) if m >= epochs][:1]
        subset, n_per_class = self.metrics.subset_per_class, self.dataset.n_per_class
        if subset is not None and n_per_class is not None and subset > n_per_class:
            problems.append((("metrics", "subset_per_class"), subset,
                             f"must be <= dataset.n_per_class ({n_per_class})"))
        if self.search.mode == "optuna":
            searched = ["weight_decay"] + (["lr"] if self.search.lr is not None else [])
            problems += [(("grid", axis), getattr(self.grid, axis), "is searched by optuna: not allowed as a grid axis")
                         for axis in searched if getattr(self.grid, axis) is not None]
            layer = self.search.objective.layer
            for loc, depth in self._values("depth", self.model.depth, ("model", "depth")):
                if layer == "hidden" and depth < 3 or _is_int(layer) and layer > depth:
                    problems.append((("search", "objective", "layer"), layer,
                                     f"does not exist at {_path(loc)} = {depth}"))
        _fail(problems)
        return self

    def limit(self, limit: Limit) -> int:
        """The value of a limit with a key under `limits:` in force for this spec (nc_ray.limits)."""
        return limit.value(getattr(self.limits, limit.key))

    @model_validator(mode="after")
    def _within_limits(self) -> SweepSpec:
        """Members, evaluations, epochs and depth within their limits, counted without expanding anything."""
        values: dict[str, int] = {}
        problems: list[Problem] = []
        for limit in (MEMBERS, EVALUATIONS, EPOCHS, DEPTH):
            try:
                values[limit.key] = self.limit(limit)
            except LimitError as e:
                problems.append((("limits", limit.key), _MISSING, str(e)))
        _fail(problems)

        def over(limit: Limit) -> str:
            return f"above the limit of {values[limit.key]} ({limit.what}); {limit.how_to_raise}"

        lengths = self.grid.lengths()
        if self.search.mode == "grid" and math.prod(lengths.values()) > values["members"]:
            axes = " x ".join(f"{axis} {n}" for axis, n in lengths.items())
            problems.append((("grid",), math.prod(lengths.values()), f"members ({axes}), {over(MEMBERS)}"))
        seeds = lengths.get("seed", 1)
        if self.search.mode == "optuna" and self.search.num_samples * seeds > values["members"]:
            problems.append((("search", "num_samples"), self.search.num_samples,
                             f"trials of {seeds} seeds each make {self.search.num_samples * seeds} members, {over(MEMBERS)}"))
        epochs = self.training.epochs
        if epochs > values["epochs"]:
            problems.append((("training", "epochs"), epochs, over(EPOCHS)))
        evaluations = evaluation_count(epochs, self.metric_every, self.metrics.initial)
        if evaluations > values["evaluations"]:
            problems.append((("metrics", "every"), self.metric_every,
                             f"evaluates each member {evaluations} times in {epochs} epochs, {over(EVALUATIONS)}; "
                             "or evaluate less often"))
        problems += [(loc, depth, over(DEPTH)) for loc, depth in self._values("depth", self.model.depth, ("model", "depth"))
                     if depth > values["depth"]][:1]
        _fail(problems)
        return self

    def member(self, **overrides: Any) -> MemberConfig:
        """The base config with some grid axes (keys of `AXES`) overridden."""
        unknown = sorted(set(overrides) - set(AXES))
        if unknown:
            raise ValueError(f"unknown axis {', '.join(unknown)}; axes: {', '.join(AXES)}")
        m, t, mt = self.model, self.training, self.metrics
        v = dict(dataset=self.dataset.name, arch=m.arch, loss=self.loss, width=m.width, depth=m.depth,
                 lr=t.lr, weight_decay=t.weight_decay, seed=t.seed) | overrides
        defaults = dataset_params(v["dataset"])
        params = defaults | {k: float(x) if isinstance(defaults[k], float) else x
                             for k, x in self.dataset.params.items()}
        return MemberConfig(
            dataset=v["dataset"], dataset_params=tuple(sorted(params.items())), n_per_class=self.dataset.n_per_class,
            standardize=self.dataset.standardize, arch=v["arch"], width=v["width"], depth=v["depth"],
            activation=m.activation, bias=m.bias, loss=v["loss"], lr=v["lr"], momentum=t.momentum,
            batch_size=t.batch_size, epochs=t.epochs, weight_decay=v["weight_decay"], seed=v["seed"],
            metric_every=self.metric_every, metric_initial=mt.initial, metric_subset_per_class=mt.subset_per_class,
            residual_init=m.residual_init if v["arch"] == "resmlp" else None,
            lr_schedule=t.schedule.kind,
            lr_milestones=tuple(t.schedule.milestones) if t.schedule.kind == "step" else None,
            lr_gamma=(t.schedule.gamma or 0.1) if t.schedule.kind == "step" else None,
            lr_floor=(t.schedule.floor or 0.0) if t.schedule.kind == "cosine" else None,
            lr_warmup_epochs=t.schedule.warmup_epochs,
            stop_stationarity=t.stop.stationarity if t.stop is not None else None,
        )

    def grid_points(self) -> list[dict[str, Any]]:
        """The grid's override dicts, in member order (one empty dict when there is no axis)."""
        axes = self.grid.axes()
        return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]

    def members(self) -> list[MemberConfig]:
        """Grid mode: every member of the cartesian product of the grid axes, in a deterministic order."""
        if self.search.mode != "grid":
            raise ValueError(f"spec {self.name!r} is in {self.search.mode} mode: its members are chosen while it runs")
        return [self.member(**point) for point in self.grid_points()]

    def resolved(self) -> dict[str, Any]:
        """The spec as plain JSON-able data, defaults filled and ranges expanded; parse_spec accepts it."""
        data = self.model_dump(mode="json", exclude={"grid"})
        data["grid"] = self.grid.axes()
        data["metrics"]["every"] = self.metric_every
        data["search"] = {k: v for k, v in data["search"].items() if v is not None}
        data["limits"] |= {limit.key: self.limit(limit) for limit in (MEMBERS, EVALUATIONS, EPOCHS, DEPTH)}
        return data


# ---------------------------------------------------------------- loading


class _TooLarge(yaml.MarkedYAMLError):
    """A YAML document beyond a limit of nc_ray.limits (its problem says which and how to raise it)."""


# libyaml's parser where PyYAML has it: ten times faster than the pure-Python one.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_size(text: str, max_depth: int, max_nodes: int) -> None:
    """_TooLarge if the document nests more than `max_depth` collections deep or holds more than
    `max_nodes` nodes (keys, values, items) with every alias expanded. Counted over the parser's
    events, before anything is composed or built: an alias adds the expanded size of the node it
    names, so a "billion laughs" costs its size in the file, not its expansion."""
    anchored: dict[str, int] = {}
    open_collections: list[list[Any]] = []  # [anchor, expanded size so far, start mark]

    def add(size: int) -> None:
        if open_collections:
            parent = open_collections[-1]
            parent[1] += size
            if parent[1] > max_nodes:
                raise _TooLarge(problem=f"this value holds more than the limit of {max_nodes} ({SPEC_NODES.what}); "
                                        f"{SPEC_NODES.how_to_raise}", problem_mark=parent[2])

    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_collections) >= max_depth:
                raise _TooLarge(problem=f"nested deeper than the limit of {max_depth} levels ({SPEC_DEPTH.what}); "
                                        f"{SPEC_DEPTH.how_to_raise}", problem_mark=event.start_mark)
            open_collections.append([event.anchor, 1, event.start_mark])
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, size, _ = open_collections.pop()
            if anchor is not None:
                anchored[anchor] = size
            add(size)
        elif isinstance(event, yaml.AliasEvent):
            if any(event.anchor == anchor for anchor, _, _ in open_collections):
                raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it", event.start_mark)
            add(anchored.get(event.anchor, 1))  # an undefined alias is reported by the composer
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                anchored[event.anchor] = 1
            add(1)


class _Loader(_SafeLoader):
    """yaml's safe loader that rejects duplicate keys, reads 1e-3 (no dot) as a float, as YAML 1.2
    does, and reports integers too long for Python (sys.get_int_max_str_digits) as YAML errors."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError as e:
            raise yaml.constructor.ConstructorError(None, None, str(e).split(";")[0], node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_short(key)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def parse_spec(data: Any, source: str = "<spec>") -> SweepSpec:
    """Validate already-loaded data (a mapping); every problem is reported, naming `source`."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: <top level>: {_short(data)}: a spec must be a mapping of keys to values")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format(e, source)) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a YAML spec file (safe loading only), within the limits of nc_ray.limits:
    at most $NC_RAY_MAX_SPEC_BYTES bytes are read, and the nesting depth and the size with every
    alias expanded are counted over YAML's events, before anything is composed or built."""
    return read_spec_file(path)[0]


def read_spec_file(path: str | Path) -> tuple[SweepSpec, bytes]:
    """`load_spec`, with the bytes it parsed: what a sweep keeps as its spec.yaml, read once, so
    that the file kept is the file run even when it changes meanwhile."""
    try:
        max_bytes, max_depth, max_nodes = SPEC_BYTES.value(), SPEC_DEPTH.value(), SPEC_NODES.value()
    except LimitError as e:
        raise SpecError(f"{path}: {e}") from None
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size  # 0 for a device or a pipe: the read stops them
            content = file.read(max_bytes + 1) if size <= max_bytes else b""
        text = content.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read the spec: {getattr(e, 'strerror', None) or e}") from None
    if size > max_bytes or len(content) > max_bytes:
        found = f"{size} bytes" if size > max_bytes else f"more than {max_bytes} bytes"
        raise SpecError(f"{path}: {found}, above the limit of {max_bytes} {SPEC_BYTES.what}; {SPEC_BYTES.how_to_raise}")
    loader = None
    try:
        _check_size(text, max_depth, max_nodes)
        loader = _Loader(text)
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "<yaml>"
        problem = " ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p) or str(e)
        raise SpecError(f"{path}: {where}: {'' if isinstance(e, _TooLarge) else 'invalid YAML: '}{problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return parse_spec(data, str(path)), content
