"""MNIST-1D (Greydanus & Steinbach): 1-D signals of the ten digits' templates, padded, scaled,
translated, sheared and made noisy, generated locally by the `mnist1d` package (no download).

Every argument of the generator is fixed here: the ones a researcher varies are the dataset's
params (defaults: the package's, as of mnist1d 0.0.2), the others are `_FIXED`. So a member's
params determine its data whatever the installed package's own defaults are. The arrays are
cached under the dataset cache (`nc_ray.data.download.cached`), one file per set of generator
arguments and package version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import numbers
import random
from collections.abc import Iterator, Mapping
from importlib.metadata import version
from pathlib import Path

import numpy as np

from nc_ray.data.base import Arrays, is_int, require
from nc_ray.data.download import cached

N_CLASSES = 10
# Generator arguments that are not params: the templates are 12 points long, and a signal is
# padded with 36..60 zeros before it is resampled.
_FIXED = {"template_len": 12, "padding": [36, 60]}


def check_mnist1d(params: Mapping[str, object]) -> None:
    """Check the complete params of `mnist1d` without generating anything."""

    def number(key: str) -> object:
        value = params[key]
        require(isinstance(value, numbers.Real) and not isinstance(value, bool), key, value, "must be a number")
        return value

    num_samples = params["num_samples"]
    require(is_int(num_samples) and num_samples >= N_CLASSES, "num_samples", num_samples,
            f"must be an integer >= {N_CLASSES} (the generator makes num_samples // {N_CLASSES} signals per class)")
    split = number("train_split")
    n_total = num_samples // N_CLASSES * N_CLASSES
    require(0 < split < 1 and 0 < int(n_total * split) < n_total, "train_split", split,
            f"must be in (0, 1) and leave both splits non-empty ({n_total} signals)")
    require(is_int(params["seed"]) and 0 <= params["seed"] < 2**32, "seed", params["seed"],
            "must be an integer in [0, 2**32)")
    for key in ("scale_coeff", "corr_noise_scale", "iid_noise_scale", "shear_scale"):
        require(number(key) >= 0, key, params[key], "must be >= 0")
    for key in ("max_translation", "final_seq_length"):
        require(is_int(params[key]) and params[key] >= 1, key, params[key], "must be an integer >= 1")
    require(isinstance(params["shuffle_seq"], bool), "shuffle_seq", params["shuffle_seq"], "must be true or false")


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """The generator seeds Python's and numpy's global RNGs; put them back afterwards, so that
    generating the dataset does not change what the caller's own global draws give."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def mnist1d(
    *,
    num_samples: int = 5000,
    train_split: float = 0.8,
    seed: int = 42,
    scale_coeff: float = 0.4,
    max_translation: int = 48,
    corr_noise_scale: float = 0.25,
    iid_noise_scale: float = 0.02,
    shear_scale: float = 0.75,
    shuffle_seq: bool = False,
    final_seq_length: int = 40,
) -> Arrays:
    """MNIST-1D: num_samples // 10 signals per class of length final_seq_length, standardized as a
    whole by the generator, shuffled, the first train_split of them for training. Deterministic
    in the arguments (same arguments -> identical arrays); 10 classes."""
    from mnist1d import ObjectView  # imports matplotlib: only when generating
    from mnist1d.data import get_dataset_args, make_dataset

    arguments = {**_FIXED, "num_samples": num_samples, "train_split": float(train_split), "seed": seed,
                 "scale_coeff": float(scale_coeff), "max_translation": max_translation,
                 "corr_noise_scale": float(corr_noise_scale), "iid_noise_scale": float(iid_noise_scale),
                 "shear_scale": float(shear_scale), "shuffle_seq": shuffle_seq, "final_seq_length": final_seq_length}
    key = json.dumps({**arguments, "mnist1d": version("mnist1d")}, sort_keys=True)

    def generate(_: Path) -> dict[str, np.ndarray]:
        args = ObjectView({**get_dataset_args(as_dict=True), **arguments})  # every argument it uses is set here
        with _global_rng_kept():
            data = make_dataset(args)
        return {"x_train": data["x"], "y_train": data["y"], "x_test": data["x_test"], "y_test": data["y_test"]}

    a = cached(f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:16]}", generate)
    missing = sorted(set(range(N_CLASSES)) - set(a["y_train"].tolist()))
    require(not missing, "num_samples", num_samples, f"too few: no training signal of class(es) {missing}")
    return Arrays(a["x_train"], a["y_train"].astype(np.int64), a["x_test"], a["y_test"].astype(np.int64),
                  n_classes=N_CLASSES)
