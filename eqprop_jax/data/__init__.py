"""Datasets: the embedded digits, local IDX/npz folders and tensorflow-datasets sources."""

from __future__ import annotations

import os

from .batching import batch_indices, epoch_order, random_crop_flip, steps_per_epoch
from .dataset import DataError, Dataset
from .digits import load_digits
from .folder import load_folder, looks_like_folder_source, read_idx, verify_md5sums
from .tfds_source import TFDS_NAMES, load_tfds

DATASETS = ("digits", *TFDS_NAMES)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    download: bool = False,
    num_classes: int | None = None,
) -> Dataset:
    """Load a dataset by name.

    - `"digits"`: scikit-learn's 8x8 digits (embedded; split fixed by `seed`).
    - `"mnist"`, `"fashion_mnist"`, `"cifar10"`, `"cifar100"`: from `data_dir` when it is
      a folder of IDX/npz files, otherwise through `tfds.data_source` (with `data_dir` as
      the tensorflow-datasets folder).
    - `"tfds:<name>"`: any prepared tensorflow-datasets dataset with image and label
      features, read through `tfds.data_source`.
    - `"folder"`: the IDX/npz folder `data_dir`, whatever it holds.

    `num_classes` states the class count; it is checked against the dataset's
    metadata where there is some (see [`load_folder`][] and [`load_tfds`][]).
    """
    if not isinstance(name, str):
        raise DataError(f"a dataset name must be a string, got {name!r}.")
    if name == "digits":
        d = load_digits(seed=seed)
        if num_classes not in (None, d.num_classes):
            raise DataError(f"digits has {d.num_classes} classes, not {num_classes}.")
        return d
    if name == "folder":
        if data_dir is None:
            raise DataError("dataset 'folder' needs a data folder: pass `data_dir`.")
        return load_folder(data_dir, num_classes=num_classes)
    if name.startswith("tfds:") and len(name) > 5:
        return load_tfds(
            name[5:],
            data_dir=None if data_dir is None else str(data_dir),
            download=download,
            num_classes=num_classes,
        )
    if name not in TFDS_NAMES:
        raise DataError(
            f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}, folder, tfds:<name>."
        )
    if num_classes not in (None, TFDS_NAMES[name]):
        raise DataError(f"{name} has {TFDS_NAMES[name]} classes, not {num_classes}.")
    if data_dir is not None and (
        looks_like_folder_source(data_dir)
        or not os.path.isdir(data_dir)
        or not any(os.scandir(data_dir))
    ):
        return load_folder(data_dir, name=name)
    return load_tfds(name, data_dir=None if data_dir is None else str(data_dir), download=download)


__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "batch_indices",
    "epoch_order",
    "load_dataset",
    "load_digits",
    "load_folder",
    "load_tfds",
    "random_crop_flip",
    "read_idx",
    "steps_per_epoch",
    "verify_md5sums",
]
