"""Datasets users bring or generate: `arrays` (a .npz file, validated whole before anything starts,
its sha256 pinned into member ids), `mnist1d` (generated locally), and dataset params checked at
spec validation."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import yaml

from nc_ray.cli import main
from nc_ray.data import ParamError, load_dataset, n_classes_of, resolve_params
from nc_ray.spec import SpecError, load_spec, parse_spec
from nc_ray.sweep import run_sweep

K, PER_CLASS, DIM = 3, 10, 4


def clusters(per_class: int = PER_CLASS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """K well separated float32 clusters in DIM dimensions, labels in shuffled order."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(K), per_class))
    return (3 * np.eye(K, DIM)[y] + 0.3 * rng.standard_normal((len(y), DIM))).astype(np.float32), y


def good_arrays(**changes: np.ndarray) -> dict[str, np.ndarray]:
    x_train, y_train = clusters()
    x_test, y_test = clusters(per_class=3, seed=1)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, **changes}


def write_job(directory: Path, data_path: str, name: str = "user", **params: object) -> Path:
    job = {
        "name": name,
        "dataset": {"name": "arrays", "params": {"path": data_path, **params}},
        "model": {"arch": "mlp", "width": 8},
        "training": {"lr": 0.05, "batch_size": 8, "epochs": 4},
        "grid": {"depth": [2, 3], "weight_decay": [1e-3, 1e-2]},
        "metrics": {"every": 2},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- a user's .npz end to end


def test_sweep_of_a_user_npz(ray_address, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the job names its file relative to the current directory
    np.savez(tmp_path / "features.npz", **good_arrays())
    job = write_job(tmp_path, "features.npz")
    run_sweep(job, tmp_path / "runs", address=ray_address, show_progress=False)

    sweep = tmp_path / "runs" / "user"
    members = duckdb.sql(f"SELECT * FROM read_parquet('{sweep}/tables/members/*.parquet')").fetchdf()
    assert len(members) == 4 and set(members["status"]) == {"complete"}
    params = [json.loads(p) for p in members["dataset_params"]]
    pinned = {"path": str(tmp_path / "features.npz"), "sha256": sha256_of(tmp_path / "features.npz"), "n_classes": K}
    assert all(p.items() >= pinned.items() for p in params)
    assert set(members["member_id"]) == {m.member_id for m in load_spec(job).members()}
    metrics = duckdb.sql(f"SELECT member_id, epoch, layer, train_acc FROM read_parquet('{sweep}/tables/metrics/*.parquet')").fetchall()
    assert len(metrics) == sum(len([0, 2, 4]) * depth for depth in (2, 2, 3, 3))
    assert max(acc for *_, acc in metrics) == 1.0  # separated clusters: something was learned from this file
    resolved = json.loads((sweep / "resolved_spec.json").read_text())
    assert resolved["dataset"]["params"] == {"path": pinned["path"], "sha256": pinned["sha256"], "n_classes": K}


def test_editing_the_file_gives_new_member_ids(tmp_path):
    data = tmp_path / "features.npz"
    np.savez(data, **good_arrays())
    job = write_job(tmp_path, str(data))
    spec = load_spec(job)
    before = [m.member_id for m in spec.members()]
    assert load_spec(job).members() == spec.members()

    x_train, _ = clusters(seed=5)
    np.savez(data, **good_arrays(x_train=x_train))
    after = [m.member_id for m in load_spec(job).members()]
    assert not set(before) & set(after)
    # The sweep directory keeps the resolved spec with the old sha256: resuming refuses the edited
    # file, naming both hashes, and so does a worker loading a member's data.
    with pytest.raises(SpecError) as info:
        parse_spec(spec.resolved(), "resolved_spec.json")
    old, new = spec.dataset.params["sha256"], sha256_of(data)
    assert str(info.value).startswith("resolved_spec.json: dataset.params.sha256: ")
    assert old in str(info.value) and new in str(info.value)
    with pytest.raises(ParamError, match=new):
        load_dataset("arrays", **spec.dataset.params)


def test_pinned_n_classes_needs_no_file(tmp_path):
    data = tmp_path / "features.npz"
    np.savez(data, **good_arrays())
    assert n_classes_of("arrays", path=str(data)) == K
    pinned = resolve_params("arrays", {"path": str(data)})
    data.unlink()  # e.g. `nc-ray phase` on another machine: K comes from the member's params
    assert n_classes_of("arrays", **pinned) == K


def test_held_out_test_set_is_stratified_and_deterministic(tmp_path):
    x, y = clusters(per_class=20)
    np.savez(tmp_path / "train_only.npz", x_train=x, y_train=y)
    params = resolve_params("arrays", {"path": str(tmp_path / "train_only.npz"), "test_fraction": 0.25})
    a, b = (load_dataset("arrays", standardize=False, **params) for _ in range(2))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("x_train", "y_train", "x_test", "y_test"))
    assert np.bincount(a.y_test.numpy()).tolist() == [5] * K and len(a.y_train) == 45
    rows = {tuple(r) for r in x.tolist()}
    assert {tuple(r) for r in torch.cat([a.x_train, a.x_test]).tolist()} == rows
    other = load_dataset("arrays", standardize=False, **(params | {"split_seed": 1}))
    assert not torch.equal(other.y_test, a.y_test) or not torch.equal(other.x_test, a.x_test)


# ---------------------------------------------------------------- bad files: one line, before anything starts


def _object_array() -> np.ndarray:
    labels = np.empty(3 * PER_CLASS, dtype=object)
    labels[:] = [int(v) for v in clusters()[1]]
    return labels


BAD_FILES = [
    # (id, what to write: arrays for np.savez or raw bytes, the key path in the error, fragments of the line)
    ("pickle", good_arrays(y_train=_object_array()), "path", ["y_train", "allow_pickle"]),
    ("3-d x", good_arrays(x_train=clusters()[0].reshape(-1, 2, 2)), "path", ["x_train", "(30, 2, 2)", "2-D"]),
    ("label out of range", good_arrays(y_test=np.array([0, 1, 2, 3, 0, 1, 2, 0, 1])), "path", ["y_test", "label [3]", "outside 0..2"]),
    ("negative label", good_arrays(y_train=clusters()[1] - 1), "path", ["y_train", "label -1"]),
    ("missing class", good_arrays(y_train=np.where(clusters()[1] == 1, 2, clusters()[1])), "path", ["y_train", "classes [1] absent"]),
    ("nan", good_arrays(x_train=np.where(np.arange(3 * PER_CLASS * DIM).reshape(-1, DIM) == 9, np.nan, clusters()[0]).astype(np.float32)),
     "path", ["x_train", "1 NaN or infinite values", "row 2"]),
    ("lengths", good_arrays(y_train=clusters()[1][:-1]), "path", ["y_train", "29 labels", "30 rows of x_train"]),
    ("wrong keys", {"x": clusters()[0], "y": clusters()[1]}, "path", ["keys", "unknown ['x', 'y']"]),
    ("test without labels", good_arrays() | {"y_test": None}, "path", ["x_test and y_test come together"]),
    ("empty", good_arrays(x_train=np.zeros((0, DIM), np.float32), y_train=np.zeros(0, np.int64)), "path", ["x_train", "is empty"]),
    ("integer x", good_arrays(x_train=np.ones((3 * PER_CLASS, DIM), np.int64)), "path", ["x_train", "int64", "floats"]),
    ("float labels", good_arrays(y_train=clusters()[1].astype(np.float64)), "path", ["y_train", "float64", "integer labels"]),
    ("one class", good_arrays(y_train=np.zeros(3 * PER_CLASS, np.int64), y_test=np.zeros(9, np.int64)), "path", ["a single class"]),
    ("test features", good_arrays(x_test=np.ones((9, DIM + 1), np.float32)), "path", ["x_test", "5 features", "the 4 of x_train"]),
    ("not a zip", b"x_train,y_train\n0.5,1\n", "path", ["not a zip file", ".npz archive"]),
    ("a .npy", "npy", "path", ["not a zip file"]),
    ("too big", "too big", "path", ["over the limit of 200", "NC_RAY_MAX_ARRAYS_BYTES"]),
    ("too big decompressed", "bomb", "path", ["bytes decompressed", "over the limit", "NC_RAY_MAX_ARRAYS_BYTES"]),
    ("no hold-out possible", {"x_train": clusters()[0][:7], "y_train": np.array([0, 0, 0, 1, 1, 1, 2])}, "test_fraction",
     ["no x_test/y_test", "stratified"]),
]


def _write_bad(path: Path, content: object, monkeypatch: pytest.MonkeyPatch) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "npy":
        with path.open("wb") as f:
            np.save(f, clusters()[0])
    elif content == "too big":
        np.savez(path, **good_arrays())
        monkeypatch.setenv("NC_RAY_MAX_ARRAYS_BYTES", "200")
    elif content == "bomb":  # a few kB compressed, 4.8 MB of zeros once read: the file passes the limit, its arrays do not
        np.savez_compressed(path, **good_arrays(x_train=np.zeros((3 * PER_CLASS, 40_000), np.float32)))
        monkeypatch.setenv("NC_RAY_MAX_ARRAYS_BYTES", str(path.stat().st_size))
    else:
        np.savez(path, **{k: v for k, v in content.items() if v is not None})


@pytest.mark.parametrize("content, key, fragments", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_one_spec_error_before_anything_starts(tmp_path, monkeypatch, capsys, content, key, fragments):
    data = tmp_path / "bad.npz"
    _write_bad(data, content, monkeypatch)
    job = write_job(tmp_path, str(data), name="bad")
    storage = tmp_path / "runs"
    assert main(["sweep", str(job), "--storage", str(storage)]) == 2
    header, *lines = capsys.readouterr().err.strip().splitlines()
    assert header == "nc-ray: invalid job spec"
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{job}: dataset.params.{key}: ")
    assert str(data) in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (storage / "bad").exists()


@pytest.mark.parametrize("params, key, fragments", [
    ({"path": "missing.npz"}, "path", ["missing.npz: no such file"]),
    ({"path": "s3://key:secret@bucket/features.npz"}, "path", ["credentials"]),
    ({"path": "features.npz", "sha256": "0" * 64}, "sha256", ["0" * 64, "has sha256"]),
    ({"path": "features.npz", "sha256": "abc"}, "sha256", ["64 lowercase hex"]),
    ({"path": "features.npz", "n_classes": 5}, "n_classes", ["labels 0..2, so K = 3"]),
    ({"path": "features.npz", "test_fraction": 1.5}, "test_fraction", ["(0, 1)"]),
    ({}, "path", ["required"]),
])
def test_bad_params_are_spec_errors(tmp_path, monkeypatch, params, key, fragments):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "features.npz", **good_arrays())
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "x", "dataset": {"name": "arrays", "params": params}}, "job.yaml")
    [line] = str(info.value).splitlines()
    assert line.startswith(f"job.yaml: dataset.params.{key}: ")
    assert "secret" not in line
    for fragment in fragments:
        assert fragment in line


def test_cli_exits_2_without_importing_ray(tmp_path):
    data = tmp_path / "bad.npz"
    np.savez(data, **good_arrays(x_train=clusters()[0].reshape(-1, 2, 2)))
    job = write_job(tmp_path, str(data), name="bad")
    script = ("import sys; from nc_ray.cli import main; code = main(sys.argv[1:]); "
              "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", script, "sweep", str(job), "--storage", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[1].startswith(f"{job}: dataset.params.path: ")
    assert "Traceback" not in run.stderr and not (tmp_path / "runs" / "bad").exists()


# ---------------------------------------------------------------- mnist1d


@pytest.fixture
def data_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NC_RAY_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_mnist1d_generates_a_small_set(data_cache):
    state = np.random.get_state()[1].copy()
    ds = load_dataset("mnist1d", num_samples=200, standardize=False)
    assert np.array_equal(np.random.get_state()[1], state), "the caller's global numpy RNG is left alone"
    assert ds.n_classes == n_classes_of("mnist1d") == 10
    assert ds.x_train.shape == (160, 40) and ds.x_test.shape == (40, 40)
    assert set(ds.y_train.tolist()) == set(range(10))
    assert len(list(data_cache.glob("mnist1d-*.npz"))) == 1


def test_mnist1d_same_arguments_same_arrays(data_cache, monkeypatch, tmp_path):
    a = load_dataset("mnist1d", num_samples=100, standardize=False)
    cached = load_dataset("mnist1d", num_samples=100, standardize=False)
    monkeypatch.setenv("NC_RAY_DATA", str(tmp_path / "fresh"))
    regenerated = load_dataset("mnist1d", num_samples=100, standardize=False)
    for other in (cached, regenerated):
        assert all(torch.equal(getattr(a, f), getattr(other, f)) for f in ("x_train", "y_train", "x_test", "y_test"))
    reseeded = load_dataset("mnist1d", num_samples=100, seed=7, standardize=False)
    assert not torch.equal(reseeded.x_train, a.x_train)
    assert len(list((tmp_path / "fresh").glob("mnist1d-*.npz"))) == 2  # cached per set of arguments


def test_mnist1d_params_are_pinned():
    spec = parse_spec({"name": "x", "dataset": {"name": "mnist1d", "params": {"num_samples": 1000, "iid_noise_scale": 0}},
                       "model": {"width": 16}})
    params = spec.resolved()["dataset"]["params"]
    assert params["num_samples"] == 1000 and params["iid_noise_scale"] == 0.0
    assert {"seed", "train_split", "corr_noise_scale", "shear_scale", "final_seq_length"} <= set(params)
    assert dict(spec.member().dataset_params) == params
    assert parse_spec(spec.resolved()).resolved() == spec.resolved()


# ---------------------------------------------------------------- params of every dataset, checked by the spec


@pytest.mark.parametrize("name, params, key, value", [
    ("gaussian", {"dim": -5}, "dim", "-5"),
    ("gaussian", {"samples_per_class": 0}, "samples_per_class", "0"),
    ("gaussian", {"spread": -1}, "spread", "-1"),
    ("gaussian", {"data_seed": -1}, "data_seed", "-1"),
    ("digits", {"test_fraction": 0.001}, "test_fraction", "0.001"),
    ("digits", {"split_seed": -2}, "split_seed", "-2"),
    ("mnist1d", {"num_samples": 5}, "num_samples", "5"),
    ("mnist1d", {"train_split": 1.0}, "train_split", "1.0"),
    ("mnist1d", {"seed": 2**32}, "seed", str(2**32)),
    ("mnist1d", {"corr_noise_scale": -0.1}, "corr_noise_scale", "-0.1"),
    ("mnist1d", {"max_translation": 0}, "max_translation", "0"),
])
def test_dataset_params_are_checked_by_the_spec(name, params, key, value):
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "x", "dataset": {"name": name, "params": params}, "model": {"width": 16}}, "job.yaml")
    [line] = str(info.value).splitlines()
    assert line.startswith(f"job.yaml: dataset.params.{key}: {value}: dataset '{name}': ")
