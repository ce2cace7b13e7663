"""scikit-learn's bundled 8x8 handwritten digits (offline; 1797 images, 10 classes)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np

from nc_ray.data.base import Arrays, is_int, require
from nc_ray.data.download import cached

N_SAMPLES, N_CLASSES = 1797, 10


def check_digits(params: Mapping[str, object]) -> None:
    """Check the complete params of `digits` without loading it. The split sizes are the ones
    `train_test_split` computes (test = ceil(fraction * N)); a stratified split needs >= K in each."""
    fraction, seed = params["test_fraction"], params["split_seed"]
    require(isinstance(fraction, numbers.Real) and not isinstance(fraction, bool) and 0 < fraction < 1,
            "test_fraction", fraction, "must be a number in (0, 1)")
    n_test = math.ceil(fraction * N_SAMPLES)
    require(min(n_test, N_SAMPLES - n_test) >= N_CLASSES, "test_fraction", fraction,
            f"gives {n_test} test and {N_SAMPLES - n_test} train images of {N_SAMPLES}; "
            f"a stratified split needs at least {N_CLASSES} (one per class) in each")
    require(is_int(seed) and seed >= 0, "split_seed", seed, "must be an integer >= 0")


def digits(*, test_fraction: float = 0.2, split_seed: int = 0) -> Arrays:
    """Stratified train/test split of the digits, deterministic in split_seed; images (N, 8, 8), pixels 0..16.

    The split is cached like a downloaded dataset (`cached`), so that later loads, in workers and
    in `nc-ray phase`, do not import scikit-learn (about 2 s).
    """

    def split(_: object) -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            x.reshape(-1, 8, 8), y, test_size=float(test_fraction), random_state=int(split_seed), stratify=y
        )
        return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}

    a = cached(f"digits-test{float(test_fraction)!r}-seed{int(split_seed)}", split)
    return Arrays(a["x_train"], a["y_train"], a["x_test"], a["y_test"], n_classes=N_CLASSES, x_scale=16.0)
