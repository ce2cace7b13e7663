"""Tests for nc_ray.spec: the job files, member configs and ids, and every validation error."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nc_ray.config import MemberConfig
from nc_ray.spec import SpecError, SweepSpec, load_spec, parse_spec

JOBS = Path(__file__).resolve().parent.parent / "jobs"
JOB_FILES = sorted(JOBS.glob("*.yaml"))
SOURCE = "jobs/bad_job.yaml"

VALID: dict[str, Any] = {
    "name": "valid",
    "dataset": {"name": "gaussian", "n_per_class": 20, "standardize": True,
                "params": {"n_classes": 3, "dim": 8, "samples_per_class": 30}},
    "model": {"arch": "mlp", "width": 16, "depth": 3, "activation": "relu", "bias": False},
    "loss": "ce",
    "training": {"lr": 0.05, "momentum": 0.9, "batch_size": 32, "epochs": 10, "weight_decay": 1e-3, "seed": 0},
    "grid": {"depth": [2, 3], "weight_decay": {"log_range": [1e-4, 1e-2], "num": 3}, "seed": {"count": 2},
             "lr": [0.05, 0.1], "width": [16, 32]},
    "metrics": {"every": 5, "initial": True, "subset_per_class": 10},
    "resources": {"cpu": 1, "gpu": 0.25, "pack_size": 4, "max_failures": 3},
    "search": {"mode": "grid"},
}
OPTUNA = {"mode": "optuna", "num_samples": 8, "weight_decay": {"low": 1e-5, "high": 1e-1},
          "objective": {"metric": "tcv_rel", "layer": "penultimate", "target": 1e-2}}


def patched(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of `base` with dotted key paths (`__` for `.`) set; `DELETE` removes a key."""
    data = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return data


DELETE = object()


def member(**changes: Any) -> MemberConfig:
    fields = dict(dataset="gaussian", dataset_params=(("dim", 8), ("n_classes", 3)), n_per_class=None,
                  standardize=True, arch="mlp", width=8, depth=3, activation="relu", bias=False, loss="ce",
                  lr=0.05, momentum=0.9, batch_size=32, epochs=6, weight_decay=1e-3, seed=0,
                  metric_every=3, metric_initial=True, metric_subset_per_class=None)
    return MemberConfig(**(fields | changes))


# ---------------------------------------------------------------- job files and members


def test_job_files_exist() -> None:
    names = {path.stem for path in JOB_FILES}
    assert {"quickstart", "smoke", "mnist_mlp", "fashion_mnist_resmlp", "cifar10_mlp", "optuna_boundary"} <= names


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_every_job_loads_and_round_trips(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    again = parse_spec(spec.resolved(), "resolved")
    through_yaml = parse_spec(yaml.safe_load(yaml.safe_dump(spec.resolved())), "resolved.yaml")
    assert again.resolved() == spec.resolved() == through_yaml.resolved()
    json.dumps(spec.resolved(), allow_nan=False)
    if spec.search.mode == "grid":
        members = spec.members()
        assert again.members() == members == through_yaml.members()
        assert len({m.member_id for m in members}) == len(members)
        assert all(MemberConfig.from_dict(json.loads(json.dumps(m.to_dict()))) == m for m in members[:50])


def test_job_member_counts() -> None:
    counts = {p.stem: len(load_spec(p).members()) for p in JOB_FILES if load_spec(p).search.mode == "grid"}
    assert counts["quickstart"] == 72
    assert counts["smoke"] == 8
    for name in ("mnist_mlp", "fashion_mnist_resmlp", "cifar10_mlp"):
        assert counts[name] >= 1000


def test_quickstart_members() -> None:
    members = load_spec(JOBS / "quickstart.yaml").members()
    assert {(m.dataset, m.loss, m.lr_schedule, m.lr_warmup_epochs) for m in members} == {("digits", "mse", "cosine", 20)}
    assert sorted({m.depth for m in members}) == [4, 6, 8]
    decays = sorted({m.weight_decay for m in members})
    assert len(decays) == 8 and decays[0] == 5e-4 and decays[-1] == 6.4e-2
    assert all(b / a == pytest.approx(decays[1] / decays[0], rel=1e-9) for a, b in zip(decays, decays[1:]))
    assert {m.seed for m in members} == {0, 1, 2}
    assert members[0].evaluation_epochs()[0] == 0 and members[0].evaluation_epochs()[-1] == members[0].epochs


def test_smoke_members_and_packs() -> None:
    spec = load_spec(JOBS / "smoke.yaml")
    members = spec.members()
    assert len(members) == 8
    m = members[0]
    assert (m.dataset, dict(m.dataset_params)["n_classes"], m.width) == ("gaussian", 3, 8)
    assert (m.epochs, m.batch_size) == (6, 32)
    assert m.evaluation_epochs() == [0, 3, 6]
    packs: dict[tuple, list[MemberConfig]] = {}
    for m in members:
        packs.setdefault(m.pack_key(), []).append(m)
    assert sorted(len(p) for p in packs.values()) == [4, 4]
    assert all(len({m.depth for m in pack}) == 1 for pack in packs.values())


def test_member_order_is_deterministic_and_last_axis_fastest() -> None:
    spec = parse_spec(VALID)
    members = spec.members()
    assert len(members) == 2 * 2 * 2 * 3 * 2
    assert [m.seed for m in members[:4]] == [0, 1, 0, 1]
    assert [m.width for m in members[:2]] == [16, 16] and members[-1].width == 32
    assert spec.grid_points()[0] == {"width": 16, "depth": 2, "lr": 0.05, "weight_decay": 1e-4, "seed": 0}
    assert [m.member_id for m in parse_spec(VALID).members()] == [m.member_id for m in members]


def test_member_overrides_and_defaults() -> None:
    spec = parse_spec({"name": "x", "dataset": {"name": "digits"}})
    assert spec.members() == [spec.member()]
    m = spec.member(depth=7, weight_decay=0.5, dataset="gaussian")
    assert (m.depth, m.weight_decay, m.dataset) == (7, 0.5, "gaussian")
    assert dict(m.dataset_params)["n_classes"] == 4  # dataset defaults are filled in
    base = spec.member()
    training = (base.lr, base.momentum, base.batch_size, base.epochs, base.weight_decay, base.seed)
    assert training == (0.05, 0.9, 128, 100, 1e-3, 0)
    model = (base.arch, base.width, base.depth, base.activation, base.bias, base.loss)
    assert model == ("mlp", 64, 4, "relu", False, "ce")
    assert base.metric_every == 10 and base.metric_initial and base.metric_subset_per_class is None
    assert dict(base.dataset_params) == {"test_fraction": 0.2, "split_seed": 0}
    with pytest.raises(ValueError, match="unknown axis"):
        spec.member(activation="tanh")


def test_dataset_axis_shares_options() -> None:
    spec = parse_spec({"name": "x", "dataset": {"name": "digits", "n_per_class": 5},
                       "grid": {"dataset": ["digits", "mnist", "gaussian"]}})
    members = spec.members()
    assert [m.dataset for m in members] == ["digits", "mnist", "gaussian"]
    assert {m.n_per_class for m in members} == {5}
    assert len({m.pack_key() for m in members}) == 3


def test_optuna_mode() -> None:
    spec = load_spec(JOBS / "optuna_boundary.yaml")
    assert spec.search.num_samples == 24 and spec.search.objective.metric == "rank_rel_1e2"
    assert len(spec.grid_points()) == 6
    with pytest.raises(ValueError, match="optuna"):
        spec.members()
    assert spec.member(depth=6, seed=1, weight_decay=3e-3).weight_decay == 3e-3


def test_member_id_is_pinned() -> None:
    # A change here changes every stored member id: only ever on purpose.
    canonical = ('{"activation":"relu","arch":"mlp","batch_size":32,"bias":false,"dataset":"gaussian",'
                 '"dataset_params":{"dim":8,"n_classes":3},"depth":3,"epochs":6,"loss":"ce","lr":0.05,'
                 '"metric_every":3,"metric_initial":true,"metric_subset_per_class":null,"momentum":0.9,'
                 '"n_per_class":null,"seed":0,"standardize":true,"weight_decay":0.001,"width":8}')
    assert hashlib.sha256(canonical.encode()).hexdigest()[:16] == "f6eb97d3fb2c8748"
    assert member().member_id == "f6eb97d3fb2c8748"
    assert member(weight_decay=0).member_id == member(weight_decay=0.0).member_id
    assert member(dataset_params={"n_classes": 3, "dim": 8}) == member()
    # Version-2 fields at their defaults leave version-1 ids unchanged.
    assert member(lr_schedule="constant", lr_warmup_epochs=0, stop_stationarity=None).member_id == "f6eb97d3fb2c8748"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(MemberConfig)])
def test_member_id_changes_with_every_field(field: str) -> None:
    other = {"dataset": "digits", "dataset_params": (("dim", 9), ("n_classes", 3)), "n_per_class": 5,
             "standardize": False, "arch": "resmlp", "width": 9, "depth": 4, "activation": "tanh", "bias": True,
             "loss": "mse", "lr": 0.051, "momentum": 0.0, "batch_size": None, "epochs": 7, "weight_decay": 2e-3,
             "seed": 1, "metric_every": 2, "metric_initial": False, "metric_subset_per_class": 4,
             "lr_schedule": "cosine", "lr_milestones": (3,), "lr_gamma": 0.5, "lr_floor": 0.1, "lr_warmup_epochs": 2,
             "stop_stationarity": 1e-2, "residual_init": "depth"}
    changed = member(**{field: other[field]})
    assert changed.member_id != member().member_id
    assert MemberConfig.from_dict(changed.to_dict()) == changed
    assert (changed.pack_key() == member().pack_key()) == (field in ("lr", "weight_decay", "seed"))


@pytest.mark.parametrize(("every", "epochs", "initial", "expected"), [
    (3, 6, True, [0, 3, 6]),
    (4, 10, True, [0, 4, 8, 10]),
    (4, 10, False, [4, 8, 10]),
    (50, 10, False, [10]),
    (1, 3, True, [0, 1, 2, 3]),
])
def test_evaluation_epochs(every: int, epochs: int, initial: bool, expected: list[int]) -> None:
    assert member(metric_every=every, epochs=epochs, metric_initial=initial).evaluation_epochs() == expected


def test_metrics_every_default() -> None:
    assert parse_spec(patched(VALID, metrics__every=None, training__epochs=35)).members()[0].metric_every == 3
    assert parse_spec(patched(VALID, metrics__every=DELETE, training__epochs=5)).resolved()["metrics"]["every"] == 1


# ---------------------------------------------------------------- validation errors


BAD_CASES = [
    # (changes, key path, bad value as it must appear)
    ({"extra": 1}, "extra", "1"),
    ({"model__depthh": 3}, "model.depthh", "3"),
    ({"grid__weight_decay": {"log_range": [1e-4, 1e-2], "num": 3, "base": 10}}, "grid.weight_decay.base", "10"),
    ({"name": "a/b"}, "name", "'a/b'"),
    ({"name": DELETE}, "name", "<missing>"),
    ({"dataset__name": DELETE}, "dataset.name", "<missing>"),
    ({"model__width": "64"}, "model.width", "'64'"),
    ({"training__lr": "0.1"}, "training.lr", "'0.1'"),
    ({"model__bias": 1}, "model.bias", "1"),
    ({"training__epochs": True}, "training.epochs", "True"),
    ({"training__lr": True}, "training.lr", "True"),
    ({"training__epochs": 2.0}, "training.epochs", "2.0"),
    ({"model__depth": 1}, "model.depth", "1"),
    ({"grid__depth": [2, 1]}, "grid.depth[1]", "1"),
    ({"grid__width": [16, 2]}, "grid.width[1]", "2"),
    ({"model__width": 2}, "model.width", "2"),
    ({"dataset__params__n_classes": 20}, "model.width", "16"),
    ({"grid__width": [0, 16]}, "grid.width[0]", "0"),
    ({"training__epochs": 0}, "training.epochs", "0"),
    ({"training__batch_size": 0}, "training.batch_size", "0"),
    ({"training__lr": 0}, "training.lr", "0"),
    ({"grid__lr": [0.1, -0.1]}, "grid.lr[1]", "-0.1"),
    ({"training__weight_decay": -1e-3}, "training.weight_decay", "-0.001"),
    ({"grid__weight_decay": [0, -1e-3]}, "grid.weight_decay[1]", "-0.001"),
    ({"grid__weight_decay": {"log_range": [-1.0, 1e-2], "num": 3}}, "grid.weight_decay.log_range[0]", "-1.0"),
    ({"grid__weight_decay": {"log_range": [0, 1e-2], "num": 3}}, "grid.weight_decay.log_range[0]", "0"),
    ({"grid__weight_decay": {"log_range": [1e-4, 1e-2], "num": 0}}, "grid.weight_decay.num", "0"),
    ({"grid__weight_decay": {"log_range": [1e-2, 1e-4], "num": 3}}, "grid.weight_decay.log_range", "[0.01, 0.0001]"),
    ({"grid__weight_decay": {"log_range": [1e-4], "num": 3}}, "grid.weight_decay.log_range", "[0.0001]"),
    ({"grid__weight_decay": 0.1}, "grid.weight_decay", "0.1"),
    ({"grid__seed": {"count": 0}}, "grid.seed.count", "0"),
    ({"grid__seed": [0, -1]}, "grid.seed[1]", "-1"),
    ({"grid__epochs": [1, 2]}, "grid.epochs", "[1, 2]"),
    ({"dataset__name": "imagenet"}, "dataset.name", "'imagenet'"),
    ({"grid__dataset": ["gaussian", "svhn"]}, "grid.dataset[1]", "'svhn'"),
    ({"dataset__params__colour": True}, "dataset.params.colour", "True"),
    ({"dataset__params__dim": "8"}, "dataset.params.dim", "'8'"),
    ({"dataset__params__n_classes": 1}, "dataset.params.n_classes", "1"),
    ({"grid__dataset": ["gaussian", "digits"]}, "dataset.params.dim", "8"),
    ({"model__arch": "cnn"}, "model.arch", "'cnn'"),
    ({"grid__arch": ["mlp", "transformer"]}, "grid.arch[1]", "'transformer'"),
    ({"model__activation": "gelu"}, "model.activation", "'gelu'"),
    ({"loss": "hinge"}, "loss", "'hinge'"),
    ({"grid__loss": ["ce", "l1"]}, "grid.loss[1]", "'l1'"),
    ({"resources__pack_size": 0}, "resources.pack_size", "0"),
    ({"resources__pack_size": "many"}, "resources.pack_size", "'many'"),
    ({"resources__pack_size": True}, "resources.pack_size", "True"),
    ({"resources__cpu": 0}, "resources.cpu", "0"),
    ({"resources__gpu": -0.25}, "resources.gpu", "-0.25"),
    ({"resources__max_failures": -1}, "resources.max_failures", "-1"),
    ({"grid__depth": [2, 3, 2]}, "grid.depth[2]", "2"),
    ({"grid__weight_decay": [1e-3, 0.001]}, "grid.weight_decay[1]", "0.001"),
    ({"grid__depth": []}, "grid.depth", "[]"),
    ({"metrics__every": 0}, "metrics.every", "0"),
    ({"metrics__subset_per_class": 30}, "metrics.subset_per_class", "30"),
    ({"training__momentum": 1.5}, "training.momentum", "1.5"),
    ({"training__lr": float("inf")}, "training.lr", "inf"),
    ({"search__num_samples": 10}, "search.num_samples", "10"),
    ({"search__objective": OPTUNA["objective"]}, "search.objective", "tcv_rel"),
    ({"search__mode": "random"}, "search.mode", "'random'"),
    ({"search": {"mode": "optuna"}}, "search.num_samples", "<missing>"),
    ({"search": patched(OPTUNA, objective=DELETE)}, "search.objective", "<missing>"),
    ({"search": patched(OPTUNA, objective__metric="accuracy")}, "search.objective.metric", "'accuracy'"),
    ({"search": patched(OPTUNA, objective__layer=0)}, "search.objective.layer", "0"),
    ({"search": patched(OPTUNA, objective__layer="last")}, "search.objective.layer", "'last'"),
    ({"search": patched(OPTUNA, objective__layer=4)}, "search.objective.layer", "4"),
    ({"search": patched(OPTUNA, objective__target=0)}, "search.objective.target", "0"),
    ({"search": patched(OPTUNA, weight_decay__low=0.5)}, "search.weight_decay.high", "0.1"),
    ({"search": patched(OPTUNA, lr={"low": 0, "high": 0.1})}, "search.lr.low", "0"),
    ({"search": OPTUNA}, "grid.weight_decay", "log_range"),
    ({"dataset": "digits"}, "dataset", "'digits'"),
]


@pytest.mark.parametrize(("changes", "path", "value"), BAD_CASES, ids=[c[1] + ":" + c[2] for c in BAD_CASES])
def test_validation_error(changes: dict[str, Any], path: str, value: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(patched(VALID, **changes), SOURCE)
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{SOURCE}: ") for line in lines), lines
    assert any(line.startswith(f"{SOURCE}: {path}: ") and value in line for line in lines), lines


def test_valid_spec_parses() -> None:
    assert isinstance(parse_spec(VALID), SweepSpec)
    assert parse_spec(patched(VALID, grid__weight_decay=[0, 1e-3])).members()[0].weight_decay == 0.0
    assert parse_spec(patched(VALID, search=OPTUNA, grid__weight_decay=DELETE)).search.mode == "optuna"


def test_unknown_dataset_lists_known_ones() -> None:
    with pytest.raises(SpecError, match="known datasets: .*digits.*mnist"):
        parse_spec(patched(VALID, dataset__name="imagenet"), SOURCE)


def test_every_problem_on_its_own_line() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(patched(VALID, model__width="64", training__lr=-1, extra=1, loss="l2"), SOURCE)
    lines = str(info.value).splitlines()
    assert len(lines) == 4
    assert {line.split(": ")[1] for line in lines} == {"model.width", "training.lr", "extra", "loss"}


def test_spec_is_frozen() -> None:
    spec = parse_spec(VALID)
    with pytest.raises(Exception):
        spec.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.members()[0].width = 3  # type: ignore[misc]


# ---------------------------------------------------------------- files


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_load_spec_reports_file_problems(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="missing.yaml"):
        load_spec(tmp_path / "missing.yaml")
    path = write(tmp_path, "name: x\ndataset: {name: digits\nmodel: {}\n")
    with pytest.raises(SpecError, match=r"job\.yaml: line \d+"):
        load_spec(path)
    for text in ("", "- a\n- b\n", "just a string\n"):
        with pytest.raises(SpecError, match=r"job\.yaml: <top level>: .*mapping"):
            load_spec(write(tmp_path, text))
    with pytest.raises(SpecError, match=r"job\.yaml: line 4, column 3: .*duplicate key 'name'"):
        load_spec(write(tmp_path, "name: x\ndataset:\n  name: digits\n  name: mnist\n"))
    with pytest.raises(SpecError, match=r"job\.yaml: line 1"):
        load_spec(write(tmp_path, "name: !!python/object/apply:os.system [ls]\n"))


def test_load_spec_validation_names_file_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ndataset: {name: digits}\n"
                           "grid:\n  weight_decay: {log_range: [-1.0, 3.0e-2], num: 8}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: grid.weight_decay.log_range[0]: -1.0: Input should be greater than 0"


def test_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, "name: x\ndataset: {name: digits}\ntraining: {weight_decay: 1e-3, lr: 5E-2}\n"))
    assert spec.training.weight_decay == 1e-3 and spec.training.lr == 0.05
    path = write(tmp_path, "name: x\ndataset: {name: digits}\ntraining: {lr: .5e-1, epochs: 1_0}\ngrid: {seed: [e5]}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).splitlines() == [f"{path}: grid.seed[0]: 'e5': Input should be a valid integer"]
    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}  # the global SafeLoader is left alone


# ---------------------------------------------------------------- random mutations

WRONG = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["auto", "digits", "gaussian", "mlp", "ce", "optuna", "penultimate", "hidden", "tcv_rel"]),
    st.lists(st.one_of(st.integers(-3, 20), st.floats(-1, 1), st.text(max_size=3), st.none()), max_size=4),
    st.dictionaries(st.sampled_from(["log_range", "num", "count", "low", "high", "n_classes", "x"]),
                    st.one_of(st.integers(-3, 5), st.floats(-1, 1), st.lists(st.floats(-1, 1), max_size=3)),
                    max_size=3),
)


def key_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path (dict keys and list indices) inside `node`."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    paths = []
    for key, child in items:
        paths.append(prefix + (key,))
        paths += key_paths(child, prefix + (key,))
    return paths


@st.composite
def mutated_specs(draw: st.DrawFn) -> dict[str, Any]:
    base = copy.deepcopy(draw(st.sampled_from([VALID, patched(VALID, search=OPTUNA, grid__weight_decay=DELETE)])))
    for _ in range(draw(st.integers(1, 4))):
        paths = key_paths(base)
        path = draw(st.sampled_from(paths))
        parent = base
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "extra", "delete"]))
        if action == "replace":
            parent[path[-1]] = draw(WRONG)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=6))] = draw(WRONG)
    return base


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
def test_mutations_parse_or_raise_spec_error(data: dict[str, Any]) -> None:
    try:
        spec = parse_spec(data, SOURCE)
    except SpecError as e:
        lines = str(e).splitlines()
        assert lines and all(line.startswith(f"{SOURCE}: ") for line in lines)
        return
    resolved = spec.resolved()
    json.dumps(resolved, allow_nan=False)
    assert parse_spec(resolved).resolved() == resolved
    if spec.search.mode == "grid" and len(spec.grid_points()) <= 1000:
        assert len({m.member_id for m in spec.members()}) == len(spec.grid_points())
