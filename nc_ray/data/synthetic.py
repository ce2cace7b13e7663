"""Gaussian clusters: a synthetic dataset whose class structure is known exactly."""

from __future__ import annotations

import numbers

import numpy as np

from nc_ray.data.base import Arrays, is_int, require


def check_n_classes(n_classes: object) -> int:
    """Validate the gaussian `n_classes` parameter (shared with `n_classes_of`)."""
    require(is_int(n_classes) and n_classes >= 2, "n_classes", n_classes, "must be an integer >= 2")
    return int(n_classes)


def gaussian(
    *,
    n_classes: int = 4,
    dim: int = 32,
    samples_per_class: int = 100,
    test_samples_per_class: int = 100,
    spread: float = 1.0,
    data_seed: int = 0,
) -> Arrays:
    """Class centers ~ N(0, I_dim); each sample = its center + spread * N(0, I_dim).

    Deterministic in data_seed. Draw order is centers, then train, then test, so changing the
    test size leaves centers and train data unchanged. Labels come in shuffled order.
    """
    k = check_n_classes(n_classes)
    for key, value in (("dim", dim), ("samples_per_class", samples_per_class),
                       ("test_samples_per_class", test_samples_per_class)):
        require(is_int(value) and value >= 1, key, value, "must be an integer >= 1")
    require(isinstance(spread, numbers.Real) and spread >= 0, "spread", spread, "must be a number >= 0")
    require(is_int(data_seed) and data_seed >= 0, "data_seed", data_seed, "must be an integer >= 0")

    rng = np.random.default_rng(data_seed)
    centers = rng.standard_normal((k, dim))

    def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.repeat(np.arange(k), per_class))
        return centers[y] + spread * rng.standard_normal((len(y), dim)), y

    x_train, y_train = draw(samples_per_class)
    x_test, y_test = draw(test_samples_per_class)
    return Arrays(x_train, y_train, x_test, y_test, n_classes=k)
