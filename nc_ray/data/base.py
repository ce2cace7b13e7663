"""Types shared by the dataset loaders: the public `Dataset`, the loaders' raw `Arrays`, errors."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the tensors are made by load_dataset, which imports torch when it runs
    import torch


class DatasetError(ValueError):
    """A downloaded or cached dataset file failed verification or parsing; the message names the file."""


# eq=False: field-wise == on tensors is ambiguous, so datasets compare by identity.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split ready for training: float32 features, int64 labels in [0, n_classes)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def in_dim(self) -> int:
        """Number of input features: the product of the per-sample shape."""
        return math.prod(self.x_train.shape[1:])


@dataclass(frozen=True)
class Arrays:
    """What a dataset function returns: numpy arrays in native per-sample shape.

    `x_scale` maps features into [0, 1] for pixel data (x / x_scale); it is 1 for other data.
    The division happens after subsampling, so pixels can stay uint8 until then.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    x_scale: float = 1.0


def is_int(value: object) -> bool:
    """True for Python/numpy integers, but not for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class ParamError(ValueError):
    """A bad dataset parameter or option: `key` names it, `value` is what was given, `why` says what is wrong."""

    def __init__(self, key: str, value: object, why: str):
        super().__init__(f"{key}={value!r}: {why}")
        self.key, self.value, self.why = key, value, why


def require(ok: bool, key: str, value: object, why: str) -> None:
    """Raise ParamError naming `key` and `value` unless `ok`."""
    if not ok:
        raise ParamError(key, value, why)
