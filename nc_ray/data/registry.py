"""The dataset registry and `load_dataset`: name -> loader, plus the options common to all datasets.

A dataset is a function returning `Arrays`; its keyword parameters and their defaults are the
dataset's params. Each is registered with a check of its complete params that loads nothing
(run by `load_dataset` and by spec validation through `resolve_params`), its K, and optionally a
`pin`: the values `resolve_params` adds to the params, so that the resolved spec and member ids
carry them (`arrays`: the file's sha256 and K; `mnist1d`: every generator argument).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nc_ray.data.arrays import arrays, check_arrays, n_classes_of_arrays, pin_arrays
from nc_ray.data.base import Arrays, Dataset, is_int, require
from nc_ray.data.cifar import cifar10
from nc_ray.data.digits import check_digits, digits
from nc_ray.data.idx import fashion_mnist, mnist
from nc_ray.data.mnist1d import check_mnist1d, mnist1d
from nc_ray.data.synthetic import check_gaussian, gaussian

Params = Mapping[str, Any]


def _no_params(params: Params) -> None:
    """The check of a dataset without params: `_complete` refuses any key."""


def _ten_classes(params: Params) -> int:
    return 10


@dataclass(frozen=True)
class _Registered:
    load: Callable[..., Arrays]  # the dataset function; its keyword params are the dataset's params
    check: Callable[[Params], None]  # complete params -> ParamError unless valid; loads nothing
    n_classes: Callable[[Params], int]  # K from complete, checked params
    pin: Callable[[Params], dict[str, Any]] | None = None  # complete, checked params -> the values to pin


_DATASETS: dict[str, _Registered] = {
    "gaussian": _Registered(gaussian, check_gaussian, lambda params: int(params["n_classes"])),
    "digits": _Registered(digits, check_digits, _ten_classes),
    "mnist": _Registered(mnist, _no_params, _ten_classes),
    "fashion_mnist": _Registered(fashion_mnist, _no_params, _ten_classes),
    "cifar10": _Registered(cifar10, _no_params, _ten_classes),
    "mnist1d": _Registered(mnist1d, check_mnist1d, _ten_classes, pin=dict),  # every generator argument
    "arrays": _Registered(arrays, check_arrays, n_classes_of_arrays, pin_arrays),
}


def dataset_names() -> list[str]:
    """The registered dataset names."""
    return list(_DATASETS)


def _registered(name: str) -> _Registered:
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(_DATASETS)}")
    return _DATASETS[name]


def dataset_params(name: str) -> dict[str, object]:
    """The dataset-specific keyword parameters of `name` and their defaults."""
    return {p.name: p.default for p in inspect.signature(_registered(name).load).parameters.values()}


def _complete(name: str, params: Params) -> dict[str, Any]:
    """`params` over the defaults of `name`, checked: unknown keys and bad values raise, naming them.
    Integers given for float params become floats, so equal params compare (and hash) equal."""
    defaults = dataset_params(name)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for dataset {name!r}; "
                         f"accepted: {', '.join(defaults) or '(none)'}")
    _registered(name).check(defaults | params)
    return defaults | {k: float(v) if is_int(v) and isinstance(defaults[k], float) else v for k, v in params.items()}


def resolve_params(name: str, params: Params) -> dict[str, Any]:
    """`params` checked for dataset `name` (values too, with the defaults of the params not given)
    without loading data, with the values the dataset pins added: `mnist1d` every generator
    argument; `arrays` reads its file whole, checks it, and pins its absolute path, sha256 and K.
    Raises ParamError (a ValueError) naming the param."""
    registered = _registered(name)
    complete = _complete(name, params)
    return {**params, **registered.pin(complete)} if registered.pin is not None else dict(params)


def n_classes_of(name: str, **params: object) -> int:
    """K for dataset `name` with these dataset params, without loading data (`arrays` without a
    pinned n_classes reads its file)."""
    return _registered(name).n_classes(_complete(name, params))


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


def prepared_arrays(
    name: str,
    *,
    n_per_class: int | None = None,
    standardize: bool = True,
    flatten: bool = True,
    subsample_seed: int = 0,
    **params: object,
) -> Arrays:
    """Dataset `name` with its params as numpy arrays, after: balanced train subsample, pixels scaled
    to [0, 1], standardization with train statistics, flattening to (N, d); `x_scale` is then 1.
    What `load_dataset` makes tensors of; the read side (the forecast's radius) uses it without torch."""
    complete = _complete(name, params)
    require(n_per_class is None or is_int(n_per_class), "n_per_class", n_per_class, "must be an integer or None")
    require(is_int(subsample_seed) and subsample_seed >= 0, "subsample_seed", subsample_seed,
            "must be an integer >= 0")
    a = _registered(name).load(**complete)
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
    return Arrays(x_train, y_train, x_test, a.y_test, a.n_classes)


def load_dataset(name: str, **options: object) -> Dataset:
    """`prepared_arrays` as a `Dataset` of tensors (float32 features, int64 labels): the options are
    theirs (n_per_class, standardize, flatten, subsample_seed, and the dataset's params). Same
    arguments -> bitwise identical tensors."""
    import torch  # here, so that validating a spec against the registry does not import torch

    a = prepared_arrays(name, **options)

    def tensor(x: np.ndarray, dtype: np.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=dtype))

    return Dataset(name, tensor(a.x_train, np.float32), tensor(a.y_train, np.int64),
                   tensor(a.x_test, np.float32), tensor(a.y_test, np.int64), a.n_classes)
