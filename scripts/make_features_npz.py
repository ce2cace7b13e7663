"""Write the .npz that jobs/features_example.yaml sweeps: a stand-in for features extracted from a
pretrained network.

    python scripts/make_features_npz.py [--out jobs/data/digits_features.npz]

A real use extracts a network's penultimate-layer activations for a dataset (docs/datasets.md
shows how with torchvision). So that the example runs offline in seconds, the features here are
random ReLU features of scikit-learn's 8x8 digits instead: relu(x W + b) for standardized pixels
x, a fixed Gaussian W (64 x 64) and b, which are non-negative like post-ReLU activations. The
train/test split is digits' stratified 80/20 split.

The archive is written with fixed timestamps, so the same arrays give the same bytes, hence the
same sha256 and the same member ids when the script is run again (np.savez stamps the time).
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path("jobs/data/digits_features.npz")


def digits_random_features(n_features: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test: float32 random ReLU features of the digits, int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = x_train.mean(axis=0), np.where(x_train.std(axis=0) > 0, x_train.std(axis=0), 1.0)
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((x.shape[1], n_features)) / np.sqrt(x.shape[1])
    bias = rng.standard_normal(n_features)

    def features(pixels: np.ndarray) -> np.ndarray:
        return np.maximum((pixels - mean) / std @ weights + bias, 0).astype(np.float32)

    return {"x_train": features(x_train), "y_train": y_train.astype(np.int64),
            "x_test": features(x_test), "y_test": y_test.astype(np.int64)}


def save_npz_reproducibly(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What np.savez_compressed writes, with every member dated 1980-01-01: equal arrays, equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, value, allow_pickle=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write the .npz (default {DEFAULT_OUT})")
    args = parser.parse_args()
    arrays = digits_random_features()
    save_npz_reproducibly(args.out, arrays)
    shapes = ", ".join(f"{key} {value.shape}" for key, value in arrays.items())
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {shapes}")


if __name__ == "__main__":
    main()
