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
) -> Dataset:
    """Load a dataset by name.

    - `"digits"`: scikit-learn's 8x8 digits (embedded; split fixed by `seed`).
    - `"mnist"`, `"fashion_mnist"`, `"cifar10"`, `"cifar100"`: from `data_dir` when it is
      a folder of IDX/npz files, otherwise through `tfds.data_source` (with `data_dir` as
      the tensorflow-datasets folder).
    - `"folder"`: the IDX/npz folder `data_dir`, whatever it holds.
    """
    if name == "digits":
        return load_digits(seed=seed)
    if name == "folder":
        if data_dir is None:
            raise DataError("dataset 'folder' needs a data folder: pass --data-dir DIR.")
        return load_folder(data_dir)
    if name not in TFDS_NAMES:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}, folder.")
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
