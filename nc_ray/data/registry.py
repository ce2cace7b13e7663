"""The dataset registry and `load_dataset`: name -> loader, plus the options common to all datasets."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np

from nc_ray.data.base import Arrays, Dataset, is_int, require
from nc_ray.data.cifar import cifar10
from nc_ray.data.digits import digits
from nc_ray.data.idx import fashion_mnist, mnist
from nc_ray.data.synthetic import check_n_classes, gaussian

_LOADERS: dict[str, Callable[..., Arrays]] = {
    "gaussian": gaussian,
    "digits": digits,
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
}
# Class counts known without loading; a dataset missing here takes K from its n_classes param.
_FIXED_N_CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10}


def dataset_names() -> list[str]:
    """The registered dataset names."""
    return list(_LOADERS)


def _loader(name: str) -> Callable[..., Arrays]:
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(_LOADERS)}")
    return _LOADERS[name]


def dataset_params(name: str) -> dict[str, object]:
    """The dataset-specific keyword parameters of `name` and their defaults."""
    return {p.name: p.default for p in inspect.signature(_loader(name)).parameters.values()}


def _check_keys(name: str, params: dict[str, object]) -> None:
    accepted = dataset_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for dataset {name!r}; "
                         f"accepted: {', '.join(accepted) or '(none)'}")


def n_classes_of(name: str, **params: object) -> int:
    """K for dataset `name` with these dataset params, without loading any data."""
    _check_keys(name, params)
    if name in _FIXED_N_CLASSES:
        return _FIXED_N_CLASSES[name]
    return check_n_classes(params.get("n_classes", dataset_params(name)["n_classes"]))


def balanced_subset(y: np.ndarray, n_classes: int, n_per_class: int, seed: int) -> np.ndarray:
    """Indices of the first n_per_class samples of each class in a seeded permutation, kept in that order
    (so classes are interleaved, and a smaller n_per_class gives a subset of a larger one)."""
    perm = np.random.default_rng(seed).permutation(len(y))
    y_perm = y[perm]
    counts = np.bincount(y_perm, minlength=n_classes)
    require(1 <= n_per_class <= counts.min(), "n_per_class", n_per_class,
            f"must be between 1 and {counts.min()}, the size of the smallest train class")
    # rank[i] = how many earlier entries of the permutation share y_perm[i]'s class
    by_class = np.argsort(y_perm, kind="stable")
    rank = np.empty(len(y), dtype=np.int64)
    rank[by_class] = np.arange(len(y)) - np.repeat(np.cumsum(counts) - counts, counts)
    return perm[rank < n_per_class]


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (x - mean) / std with train statistics; constant features keep std 1."""
    flat = x_train.reshape(len(x_train), -1)
    # float64 accumulation, float32 data: exact for constant features, so their std is exactly 0
    mean = flat.mean(axis=0, dtype=np.float64).astype(np.float32)
    centered = flat - mean
    std = np.sqrt(np.square(centered).mean(axis=0, dtype=np.float64))
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    centered /= std
    return centered.reshape(x_train.shape), ((x_test.reshape(len(x_test), -1) - mean) / std).reshape(x_test.shape)


def load_dataset(
    name: str,
    *,
    n_per_class: int | None = None,
    standardize: bool = True,
    flatten: bool = True,
    subsample_seed: int = 0,
    **params: object,
) -> Dataset:
    """Load dataset `name` with its params, then: balanced train subsample, scale pixels to [0, 1],
    standardize with train statistics, flatten to (N, d). Same arguments -> bitwise identical tensors.
    """
    loader = _loader(name)
    _check_keys(name, params)
    require(n_per_class is None or is_int(n_per_class), "n_per_class", n_per_class, "must be an integer or None")
    require(is_int(subsample_seed) and subsample_seed >= 0, "subsample_seed", subsample_seed,
            "must be an integer >= 0")
    a = loader(**params)
    x_train, y_train = a.x_train, a.y_train
    if n_per_class is not None:
        keep = balanced_subset(y_train, a.n_classes, int(n_per_class), int(subsample_seed))
        x_train, y_train = x_train[keep], y_train[keep]
    # Scale after subsampling so uint8 pixels are only converted for the samples kept.
    x_train = x_train.astype(np.float32) / np.float32(a.x_scale)
    x_test = a.x_test.astype(np.float32) / np.float32(a.x_scale)
    if standardize:
        x_train, x_test = _standardize(x_train, x_test)
    if flatten:
        x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)

    import torch  # here, so that validating a spec against the registry does not import torch

    def tensor(x: np.ndarray, dtype: np.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=dtype))

    return Dataset(name, tensor(x_train, np.float32), tensor(y_train, np.int64),
                   tensor(x_test, np.float32), tensor(a.y_test, np.int64), a.n_classes)
