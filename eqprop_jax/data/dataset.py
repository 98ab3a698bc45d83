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
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise DataError(
                    f"{self.name}: {split} split has {x.shape[0]} images but {y.shape[0]} labels."
                )
            if x.shape[0] == 0:
                raise DataError(f"{self.name}: the {split} split is empty.")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise DataError(
                    f"{self.name}: {split} labels must lie in [0, {self.num_classes}), "
                    f"found [{y.min()}, {y.max()}]."
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


def to_unit_images(images: np.ndarray, max_value: float) -> np.ndarray:
    """uint8-like images (N, H, W[, C]) -> float32 in [0, 1] with a channel axis."""
    x = np.asarray(images, np.float32) / np.float32(max_value)
    if x.ndim == 3:
        x = x[..., None]
    return x
