"""MNIST and Fashion-MNIST: four gzipped IDX files each, read by one IDX parser."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np

from nc_ray.data.base import Arrays, DatasetError
from nc_ray.data.download import Remote, cached, fetch

# Published MD5s, as used by torchvision.
MNIST = Remote(
    mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    md5={
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
)
FASHION_MNIST = Remote(
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    md5={
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
)

_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}

# IDX type byte -> element type; IDX data is big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (magic 0x0000 TT NN, NN big-endian uint32 dims, then the data)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"bad IDX magic number {data[:4].hex()!r}")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise ValueError(f"IDX header truncated: {len(data)} bytes, need {header}")
    shape = struct.unpack(f">{data[3]}I", data[4:header])
    if len(data) - header != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"IDX size mismatch: shape {shape} needs {math.prod(shape) * dtype.itemsize} "
                         f"data bytes, file has {len(data) - header}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_dataset(name: str, remote: Remote) -> Arrays:
    def build(raw_dir: Path) -> dict[str, np.ndarray]:
        arrays = {key: fetch(remote, filename, raw_dir, read_idx) for key, filename in _FILES.items()}
        for split in ("train", "test"):
            if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
                raise DatasetError(f"{raw_dir}: {_FILES[f'x_{split}']} and {_FILES[f'y_{split}']} "
                                   "hold different numbers of samples")
        return arrays

    a = cached(name, build)
    return Arrays(a["x_train"], a["y_train"], a["x_test"], a["y_test"], n_classes=10, x_scale=255.0)


def mnist() -> Arrays:
    """MNIST handwritten digits: 60000 train / 10000 test images (N, 28, 28) uint8, 10 classes."""
    return _idx_dataset("mnist", MNIST)


def fashion_mnist() -> Arrays:
    """Fashion-MNIST clothing images: 60000 train / 10000 test (N, 28, 28) uint8, 10 classes."""
    return _idx_dataset("fashion_mnist", FASHION_MNIST)
