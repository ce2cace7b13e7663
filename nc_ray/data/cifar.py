"""CIFAR-10 from the official "python version" tarball, unpickled without running arbitrary code."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from nc_ray.data.base import Arrays
from nc_ray.data.download import Remote, cached, fetch

CIFAR10 = Remote(
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    md5={"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
)

_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_BATCHES = (*_TRAIN_BATCHES, "test_batch")

_RECONSTRUCT = np.empty(0).__reduce__()[0]
# The only globals a CIFAR batch (a Python 2 pickle of a dict of bytes, lists and uint8 arrays) needs.
# Both module spellings of _reconstruct: numpy 1 wrote numpy.core, numpy 2 writes numpy._core.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _SAFE_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} in a CIFAR batch") from None


def _read_batch(raw: bytes, member: str) -> tuple[np.ndarray, np.ndarray]:
    # encoding="bytes": the batches are Python 2 pickles, whose str keys become bytes (b"data").
    batch = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{member}: not a CIFAR batch dict with b'data' and b'labels' ({e})") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"{member}: data {data.shape} / labels {labels.shape} are not (n, 3072) / (n,)")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_tarball(path: Path) -> dict[str, np.ndarray]:
    """Parse cifar-10-python.tar.gz in one streaming pass: images (N, 3, 32, 32) uint8, labels int64."""
    batches = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            name = Path(member.name).name
            if member.isfile() and name in _BATCHES:
                batches[name] = _read_batch(tar.extractfile(member).read(), member.name)
    missing = [b for b in _BATCHES if b not in batches]
    if missing:
        raise ValueError(f"tarball lacks batches {missing}")
    train = [batches[b] for b in _TRAIN_BATCHES]
    return {
        "x_train": np.concatenate([x for x, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "x_test": batches["test_batch"][0],
        "y_test": batches["test_batch"][1],
    }


def cifar10() -> Arrays:
    """CIFAR-10: 50000 train / 10000 test RGB images (N, 3, 32, 32) uint8, 10 classes."""
    filename = "cifar-10-python.tar.gz"
    a = cached("cifar10", lambda raw_dir: fetch(CIFAR10, filename, raw_dir, read_cifar_tarball))
    return Arrays(a["x_train"], a["y_train"], a["x_test"], a["y_test"], n_classes=10, x_scale=255.0)
