"""scikit-learn's bundled 8x8 handwritten digits (offline; 1797 images, 10 classes)."""

from __future__ import annotations

import numbers

from nc_ray.data.base import Arrays, is_int, require


def digits(*, test_fraction: float = 0.2, split_seed: int = 0) -> Arrays:
    """Stratified train/test split of the digits, deterministic in split_seed; images (N, 8, 8), pixels 0..16."""
    require(isinstance(test_fraction, numbers.Real) and 0 < test_fraction < 1,
            "test_fraction", test_fraction, "must be a number in (0, 1)")
    require(is_int(split_seed) and split_seed >= 0, "split_seed", split_seed, "must be an integer >= 0")
    # Imported here: scikit-learn takes about a second to import and only this dataset needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    try:
        x_train, x_test, y_train, y_test = train_test_split(
            x.reshape(-1, 8, 8), y, test_size=float(test_fraction), random_state=int(split_seed), stratify=y
        )
    except ValueError as e:  # e.g. a test set smaller than the number of classes
        raise ValueError(f"test_fraction={test_fraction!r}: {e}") from e
    return Arrays(x_train, y_train, x_test, y_test, n_classes=10, x_scale=16.0)
