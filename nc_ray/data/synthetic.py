"""Gaussian clusters: a synthetic dataset whose class structure is known exactly."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import numpy as np

from nc_ray.data.base import Arrays, is_int, require


def check_gaussian(params: Mapping[str, object]) -> None:
    """Check the complete params of `gaussian` (the registry runs this before loading and at spec validation)."""
    require(is_int(params["n_classes"]) and params["n_classes"] >= 2, "n_classes", params["n_classes"],
            "must be an integer >= 2")
    for key in ("dim", "samples_per_class", "test_samples_per_class"):
        require(is_int(params[key]) and params[key] >= 1, key, params[key], "must be an integer >= 1")
    require(isinstance(params["spread"], numbers.Real) and not isinstance(params["spread"], bool)
            and params["spread"] >= 0, "spread", params["spread"], "must be a number >= 0")
    require(is_int(params["data_seed"]) and params["data_seed"] >= 0, "data_seed", params["data_seed"],
            "must be an integer >= 0")


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
    rng = np.random.default_rng(data_seed)
    centers = rng.standard_normal((n_classes, dim))

    def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.permutation(np.repeat(np.arange(n_classes), per_class))
        return centers[y] + spread * rng.standard_normal((len(y), dim)), y

    x_train, y_train = draw(samples_per_class)
    x_test, y_test = draw(test_samples_per_class)
    return Arrays(x_train, y_train, x_test, y_test, n_classes=n_classes)
