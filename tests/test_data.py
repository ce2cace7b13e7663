"""Tests for nc_ray.data: the offline datasets directly, the downloaded ones against tiny files
written here in the real formats and served from 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nc_ray.data import DatasetError, dataset_names, dataset_params, load_dataset, n_classes_of
from nc_ray.data import cifar, idx
from nc_ray.data.download import Remote

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR_FILE = "cifar-10-python.tar.gz"


# ---------------------------------------------------------------- offline datasets


@pytest.mark.parametrize("name, n_train, n_test, native, k", [
    ("gaussian", 400, 400, (32,), 4),
    ("digits", 1437, 360, (8, 8), 10),
])
def test_shapes_dtypes_classes(name, n_train, n_test, native, k):
    ds = load_dataset(name)
    d = int(np.prod(native))
    assert ds.name == name and ds.n_classes == k and ds.in_dim == d
    assert ds.x_train.shape == (n_train, d) and ds.x_test.shape == (n_test, d)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert set(ds.y_train.tolist()) == set(ds.y_test.tolist()) == set(range(k))
    native_ds = load_dataset(name, flatten=False)
    assert native_ds.x_train.shape == (n_train, *native) and native_ds.in_dim == d
    assert torch.equal(native_ds.x_train.reshape(n_train, -1), ds.x_train)


@pytest.mark.parametrize("name", ["gaussian", "digits"])
def test_deterministic(name):
    a, b = (load_dataset(name, n_per_class=7) for _ in range(2))
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    other = load_dataset(name, n_per_class=7, subsample_seed=1)
    assert not torch.equal(a.x_train, other.x_train)


def test_gaussian_params():
    ds = load_dataset("gaussian", n_classes=3, dim=5, samples_per_class=4, test_samples_per_class=2,
                      spread=0.0, standardize=False)
    assert ds.x_train.shape == (12, 5) and ds.x_test.shape == (6, 5) and ds.n_classes == 3
    # spread 0: every sample is its class center, and train and test share the centers
    for c in range(3):
        rows = torch.cat([ds.x_train[ds.y_train == c], ds.x_test[ds.y_test == c]])
        assert torch.equal(rows, rows[:1].expand_as(rows))
    assert not torch.equal(load_dataset("gaussian", data_seed=1).x_train, load_dataset("gaussian").x_train)


def test_digits_split_is_stratified():
    ds = load_dataset("digits", test_fraction=0.25, split_seed=3)
    train, test = np.bincount(ds.y_train.numpy()), np.bincount(ds.y_test.numpy())
    assert len(train) == len(test) == 10 and train.sum() + test.sum() == 1797
    assert np.all(np.abs(test - 0.25 * (train + test)) <= 1)


@pytest.mark.parametrize("name", ["gaussian", "digits"])
def test_n_per_class_is_balanced_subset(name):
    full = load_dataset(name, standardize=False)
    sub = load_dataset(name, n_per_class=5, standardize=False)
    assert np.bincount(sub.y_train.numpy()).tolist() == [5] * full.n_classes
    assert not torch.equal(sub.y_train, sub.y_train.sort().values), "result must not be grouped by class"
    rows = {tuple(r) for r in full.x_train.tolist()}
    assert all(tuple(r) in rows for r in sub.x_train.tolist())
    sub_rows = {tuple(r) for r in sub.x_train.tolist()}
    assert all(tuple(r) in sub_rows for r in load_dataset(name, n_per_class=3, standardize=False).x_train.tolist())
    assert torch.equal(sub.x_test, full.x_test)


def test_standardize_uses_train_statistics():
    raw = load_dataset("digits", n_per_class=20, standardize=False)
    assert raw.x_train.min() == 0 and raw.x_train.max() == 1  # pixels 0..16 scaled to [0, 1]
    std = load_dataset("digits", n_per_class=20)
    mean, sd = raw.x_train.double().mean(0), raw.x_train.double().std(0, unbiased=False)
    constant = sd == 0
    assert constant.any(), "digits has all-zero border pixels"
    assert std.x_train.double().mean(0).abs().max() < 1e-6
    out_sd = std.x_train.double().std(0, unbiased=False)
    assert torch.allclose(out_sd[~constant], torch.ones(int((~constant).sum()), dtype=torch.float64), atol=1e-5)
    assert torch.all(out_sd[constant] == 0)
    expected_test = (raw.x_test.double() - mean) / torch.where(constant, 1.0, sd)
    assert torch.allclose(std.x_test.double(), expected_test, atol=1e-5)


def test_registry_introspection():
    assert dataset_names() == ["gaussian", "digits", "mnist", "fashion_mnist", "cifar10", "mnist1d", "arrays"]
    assert dataset_params("gaussian") == {"n_classes": 4, "dim": 32, "samples_per_class": 100,
                                          "test_samples_per_class": 100, "spread": 1.0, "data_seed": 0}
    assert dataset_params("digits") == {"test_fraction": 0.2, "split_seed": 0}
    assert dataset_params("mnist") == {}
    assert n_classes_of("gaussian") == 4 and n_classes_of("gaussian", n_classes=7) == 7
    assert n_classes_of("cifar10") == n_classes_of("digits") == 10


@pytest.mark.parametrize("call, fragments", [
    (lambda: load_dataset("imagenet"), ["'imagenet'", "gaussian", "cifar10"]),
    (lambda: n_classes_of("imagenet"), ["'imagenet'", "digits"]),
    (lambda: load_dataset("digits", n_classes=3), ["n_classes", "test_fraction", "split_seed"]),
    (lambda: n_classes_of("gaussian", width=3), ["width", "samples_per_class"]),
    (lambda: load_dataset("gaussian", n_per_class=0), ["n_per_class=0"]),
    (lambda: load_dataset("gaussian", n_per_class=101), ["n_per_class=101", "100"]),
    (lambda: load_dataset("gaussian", n_classes=1), ["n_classes=1"]),
    (lambda: n_classes_of("gaussian", n_classes=2.5), ["n_classes=2.5"]),
    (lambda: load_dataset("gaussian", spread=-1.0), ["spread=-1.0"]),
    (lambda: load_dataset("digits", test_fraction=1.5), ["test_fraction=1.5"]),
    (lambda: load_dataset("digits", test_fraction=0.001), ["test_fraction=0.001"]),
])
def test_errors_name_the_problem(call, fragments):
    with pytest.raises(ValueError) as info:
        call()
    for fragment in fragments:
        assert fragment in str(info.value)


# ---------------------------------------------------------------- downloaded datasets


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        with self.server.lock:
            self.server.hits[self.path.lstrip("/")] += 1
        time.sleep(self.server.delay)  # widens the window in which concurrent loads overlap
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving tmp_path/srv and counting GETs per file; cache in tmp_path/cache."""
    monkeypatch.setenv("NC_RAY_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("no_proxy", "*")
    root = tmp_path / "srv"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    srv.hits, srv.lock, srv.delay = Counter(), threading.Lock(), 0.0
    thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)  # fast shutdown
    thread.start()
    yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{srv.server_port}/", srv=srv,
                          cache=tmp_path / "cache")
    srv.shutdown()
    srv.server_close()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _idx_gz(array: np.ndarray) -> bytes:
    """A gzipped IDX file of uint8 data, written independently of the parser under test."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


@pytest.fixture(params=[("mnist", "MNIST"), ("fashion_mnist", "FASHION_MNIST")], ids=["mnist", "fashion_mnist"])
def idx_source(request, server, monkeypatch):
    """Serve tiny MNIST-format files (20 train + 10 test images) and point the dataset's table at them."""
    name, attr = request.param
    rng = np.random.default_rng(1)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        IDX_FILES[1]: np.tile(np.arange(10, dtype=np.uint8), 2),
        IDX_FILES[2]: rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        IDX_FILES[3]: np.arange(10, dtype=np.uint8)[::-1].copy(),
    }
    for filename, array in arrays.items():
        (server.root / filename).write_bytes(_idx_gz(array))

    def set_remote(mirrors=(server.url,), **md5_overrides):
        md5 = {f: _md5(server.root / f) for f in IDX_FILES} | md5_overrides
        monkeypatch.setattr(idx, attr, Remote(tuple(mirrors), md5))

    set_remote()
    return SimpleNamespace(name=name, arrays=arrays, set_remote=set_remote, **vars(server))


def _pixels(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).numpy()


def test_idx_download_parse_and_cache(idx_source):
    s = idx_source
    ds = load_dataset(s.name, standardize=False, flatten=False)
    assert np.array_equal(_pixels(ds.x_train), s.arrays[IDX_FILES[0]])
    assert np.array_equal(ds.y_train.numpy(), s.arrays[IDX_FILES[1]])
    assert np.array_equal(_pixels(ds.x_test), s.arrays[IDX_FILES[2]])
    assert np.array_equal(ds.y_test.numpy(), s.arrays[IDX_FILES[3]])
    assert ds.x_train.shape == (20, 28, 28) and ds.n_classes == 10
    assert s.srv.hits == Counter(IDX_FILES)
    assert (s.cache / f"{s.name}.npz").is_file() and not (s.cache / s.name).exists()

    for filename in IDX_FILES:  # the source disappears: the cache alone must serve the next loads
        (s.root / filename).unlink()
    again = load_dataset(s.name, standardize=False, flatten=False)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)
    assert load_dataset(s.name, n_per_class=2).x_train.shape == (20, 784)
    assert s.srv.hits == Counter(IDX_FILES)


def test_mirrors_tried_in_order(idx_source):
    s = idx_source
    s.set_remote(mirrors=(s.url + "gone/", s.url))
    assert load_dataset(s.name).x_train.shape == (20, 784)
    assert s.srv.hits["gone/" + IDX_FILES[0]] == 1

    (s.cache / f"{s.name}.npz").unlink()
    s.set_remote(mirrors=(s.url + "gone/", s.url + "also-gone/"))
    with pytest.raises(DatasetError) as info:
        load_dataset(s.name)
    message = str(info.value)
    assert IDX_FILES[0] in message and "404" in message
    assert s.url + "gone/" + IDX_FILES[0] in message and s.url + "also-gone/" + IDX_FILES[0] in message


def test_wrong_checksum_is_rejected_and_not_kept(idx_source):
    s = idx_source
    s.set_remote(**{IDX_FILES[2]: "0" * 32})
    with pytest.raises(DatasetError) as info:
        load_dataset(s.name)
    assert IDX_FILES[2] in str(info.value) and "MD5 mismatch" in str(info.value)
    assert not (s.cache / f"{s.name}.npz").exists()
    assert not (s.cache / s.name / IDX_FILES[2]).exists()
    assert not list(s.cache.rglob("*.part"))


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _bad_magic(data: bytes) -> bytes:
    return gzip.compress(b"\x12\x34" + gzip.decompress(data)[2:], mtime=0)


def _short_data(data: bytes) -> bytes:
    return gzip.compress(gzip.decompress(data)[:-1], mtime=0)


@pytest.mark.parametrize("corrupt, problem", [
    (_truncate, "EOFError"), (_bad_magic, "magic"), (_short_data, "size mismatch"),
])
def test_corrupt_file_is_rejected_then_redownloaded(idx_source, corrupt, problem):
    s = idx_source
    served = s.root / IDX_FILES[0]
    good = served.read_bytes()
    served.write_bytes(corrupt(good))
    s.set_remote()  # the corrupt file's own MD5: only parsing can catch it
    with pytest.raises(DatasetError) as info:
        load_dataset(s.name)
    assert str(s.cache / s.name / IDX_FILES[0]) in str(info.value) and problem in str(info.value)
    assert not (s.cache / s.name / IDX_FILES[0]).exists()
    assert not (s.cache / f"{s.name}.npz").exists()

    served.write_bytes(good)
    s.set_remote()
    assert load_dataset(s.name).x_train.shape == (20, 784)
    assert s.srv.hits[IDX_FILES[0]] == 2  # the bad copy was not reused
    assert s.srv.hits[IDX_FILES[1]] == 1  # files that were fine were kept for the retry


def test_concurrent_loads_download_once(idx_source):
    s = idx_source
    s.srv.delay = 0.05
    barrier = threading.Barrier(3)
    results, errors = [], []

    def load():
        barrier.wait()
        try:
            results.append(load_dataset(s.name))
        except Exception as e:  # surfaced by the asserts below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert all(torch.equal(r.x_train, results[0].x_train) for r in results)
    assert s.srv.hits == Counter(IDX_FILES)


def _py2_pickle(obj: dict[bytes, object]) -> bytes:
    """Pickle {bytes: uint8 2-D array | list of ints} the way Python 2 cPickle wrote the CIFAR
    batches (protocol 2, str as BINSTRING, numpy.core globals), so the parser meets the real format."""
    P = pickle

    def s(b: bytes) -> bytes:
        return (P.SHORT_BINSTRING + bytes([len(b)]) if len(b) < 256 else P.BINSTRING + struct.pack("<i", len(b))) + b

    def i(v: int) -> bytes:
        return P.BININT + struct.pack("<i", v)

    def value(v: object) -> bytes:
        if isinstance(v, list):
            return P.EMPTY_LIST + P.MARK + b"".join(i(x) for x in v) + P.APPENDS
        return (P.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n" + P.GLOBAL + b"numpy\nndarray\n"
                + i(0) + P.TUPLE1 + s(b"b") + P.TUPLE3 + P.REDUCE
                + P.MARK + i(1) + i(v.shape[0]) + i(v.shape[1]) + P.TUPLE2
                + P.GLOBAL + b"numpy\ndtype\n" + s(b"u1") + i(0) + i(1) + P.TUPLE3 + P.REDUCE
                + P.MARK + i(3) + s(b"|") + P.NONE * 3 + i(-1) + i(-1) + i(0) + P.TUPLE + P.BUILD
                + P.NEWFALSE + s(v.tobytes()) + P.TUPLE + P.BUILD)

    items = b"".join(s(k) + value(v) for k, v in obj.items())
    return P.PROTO + b"\x02" + P.EMPTY_DICT + P.MARK + items + P.SETITEMS + P.STOP


def _tarball(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def cifar_source(server, monkeypatch):
    """Serve a tiny cifar-10-python.tar.gz (5 train batches of 2 images, a test batch of 3)."""
    rng = np.random.default_rng(2)
    batches = {f"data_batch_{i}": (rng.integers(0, 256, (2, 3072), dtype=np.uint8), [2 * i - 2, 2 * i - 1])
               for i in range(1, 6)}
    batches["test_batch"] = (rng.integers(0, 256, (3, 3072), dtype=np.uint8), [7, 0, 3])
    members = {name: _py2_pickle({b"batch_label": [], b"data": d, b"labels": y}) for name, (d, y) in batches.items()}
    members["batches.meta"] = _py2_pickle({b"num_cases_per_batch": [2]})

    def publish() -> None:  # point the table at the served file, whatever its bytes
        monkeypatch.setattr(cifar, "CIFAR10", Remote((server.url,), {CIFAR_FILE: _md5(server.root / CIFAR_FILE)}))

    def serve(files: dict[str, bytes]) -> None:
        _tarball(server.root / CIFAR_FILE, files)
        publish()

    serve(members)
    return SimpleNamespace(batches=batches, members=members, serve=serve, publish=publish, **vars(server))


def test_cifar10_download_parse_and_cache(cifar_source):
    s = cifar_source
    ds = load_dataset("cifar10", standardize=False, flatten=False)
    train = [s.batches[f"data_batch_{i}"] for i in range(1, 6)]
    assert np.array_equal(_pixels(ds.x_train), np.concatenate([d for d, _ in train]).reshape(10, 3, 32, 32))
    assert ds.y_train.tolist() == list(range(10))
    assert np.array_equal(_pixels(ds.x_test), s.batches["test_batch"][0].reshape(3, 3, 32, 32))
    assert ds.y_test.tolist() == [7, 0, 3] and ds.n_classes == 10 and ds.in_dim == 3072

    (s.root / CIFAR_FILE).unlink()
    assert torch.equal(load_dataset("cifar10", standardize=False, flatten=False).x_train, ds.x_train)
    assert s.srv.hits == Counter({CIFAR_FILE: 1})


def test_cifar10_truncated_tarball(cifar_source):
    s = cifar_source
    path = s.root / CIFAR_FILE
    path.write_bytes(_truncate(path.read_bytes()))
    s.publish()
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10")
    assert str(s.cache / "cifar10" / CIFAR_FILE) in str(info.value)
    assert not (s.cache / "cifar10" / CIFAR_FILE).exists() and not (s.cache / "cifar10.npz").exists()


def test_cifar10_rejects_code_in_pickles(cifar_source, tmp_path):
    s = cifar_source
    marker = tmp_path / "pwned"
    command = f"touch {marker}".encode()
    evil = (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"os\nsystem\n" + pickle.BINSTRING
            + struct.pack("<i", len(command)) + command + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
    s.serve(s.members | {"data_batch_3": evil})
    with pytest.raises(DatasetError, match="forbidden global os.system"):
        load_dataset("cifar10")
    assert not marker.exists()


def test_cifar10_missing_batch(cifar_source):
    s = cifar_source
    s.serve({k: v for k, v in s.members.items() if k != "test_batch"})
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10")
