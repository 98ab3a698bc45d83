"""A labelled image classification dataset held in host memory."""

from __future__ import annotations

import dataclasses

import numpy as np


class DataError(ValueError):
    """A dataset could not be found, read or checked; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test splits as NumPy arrays.

    Images are float32 in [0, 1] with layout (N, H, W, C); labels are int32 class
    indices in [0, num_classes). The arrays stay on the host; training copies one
    batch at a time to the devices.

    Everything is checked when a Dataset is built (and so after `dataclasses.replace`):
    images are finite real numbers, train and test images have one shape, labels are
    integer class indices in range (integral float labels become int32, fractional
    ones are refused), `num_classes` is at least 2. A failed check raises a
    [`DataError`][] naming the split and the first offending example.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self):
        if not isinstance(self.num_classes, int | np.integer) or isinstance(self.num_classes, bool):
            raise DataError(
                f"{self.name}: num_classes must be an integer, got {self.num_classes!r}."
            )
        if self.num_classes < 2:
            raise DataError(f"{self.name}: num_classes must be at least 2, got {self.num_classes}.")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        for split in ("train", "test"):
            x = _images(self.name, split, getattr(self, f"x_{split}"))
            y = _labels(self.name, split, getattr(self, f"y_{split}"), self.num_classes)
            if x.shape[0] != y.shape[0]:
                raise DataError(
                    f"{self.name}: {split} split has {x.shape[0]} images but {y.shape[0]} labels."
                )
            if x.shape[0] == 0:
                raise DataError(f"{self.name}: the {split} split is empty.")
            object.__setattr__(self, f"x_{split}", x)
            object.__setattr__(self, f"y_{split}", y)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images have shape {self.x_train.shape[1:]} but test images "
                f"{self.x_test.shape[1:]}."
            )

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def flat(self) -> Dataset:
        """The same data with each image flattened to a vector (for fully connected nets)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.reshape(len(self.x_train), -1),
            x_test=self.x_test.reshape(len(self.x_test), -1),
        )

    def subset(self, train: int | None = None, test: int | None = None) -> Dataset:
        """The first `train` training and `test` test examples (for quick runs and tests)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train[:train],
            y_train=self.y_train[:train],
            x_test=self.x_test[:test],
            y_test=self.y_test[:test],
        )

    def standardized(self) -> Dataset:
        """Per-channel (last axis) standardisation with the training split's mean and std."""
        axes = tuple(range(self.x_train.ndim - 1))
        mean = self.x_train.mean(axis=axes, keepdims=True)
        std = self.x_train.std(axis=axes, keepdims=True) + 1e-8
        return dataclasses.replace(
            self,
            x_train=((self.x_train - mean) / std).astype(np.float32),
            x_test=((self.x_test - mean) / std).astype(np.float32),
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"classes={self.num_classes})"
        )


def _images(name: str, split: str, x) -> np.ndarray:
    """Real numbers with a leading example axis, all finite."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise DataError(
            f"{name}: {split} images must have an example axis and at least one feature axis, "
            f"got shape {x.shape}."
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{name}: {split} images must hold real numbers, got dtype {x.dtype}.")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise DataError(
            f"{name}: {split} image {bad[0]} holds NaN or infinite values (first at index "
            f"{tuple(int(i) for i in bad)})."
        )
    return x


def _labels(name: str, split: str, y, num_classes: int) -> np.ndarray:
    """int32 class indices in [0, num_classes); integral floats are accepted, others refused."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{name}: {split} labels must be a vector of class indices, got shape {y.shape}."
        )
    if np.issubdtype(y.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if bad.size:
            raise DataError(
                f"{name}: {split} labels must be integer class indices, but label {bad[0]} is "
                f"{y[bad[0]].item()!r}."
            )
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: {split} labels must be integers, got dtype {y.dtype}.")
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if bad.size:
        raise DataError(
            f"{name}: {split} labels must lie in [0, {num_classes}), but label {bad[0]} is "
            f"{y[bad[0]].item()!r} ({bad.size} out of range)."
        )
    return y.astype(np.int32, copy=False)


def to_unit_images(images: np.ndarray, max_value: float) -> np.ndarray:
    """uint8-like images (N, H, W[, C]) -> float32 in [0, 1] with a channel axis."""
    x = np.asarray(images, np.float32) / np.float32(max_value)
    if x.ndim == 3:
        x = x[..., None]
    return x
