"""tensorflow-datasets random-access sources (array_record; TensorFlow is not needed)."""

from __future__ import annotations

import numpy as np

from .dataset import DataError, Dataset, to_unit_images

TFDS_NAMES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def _unreachable(name: str, data_dir: str | None, why: str) -> DataError:
    where = data_dir or "the default tensorflow-datasets folder (~/tensorflow_datasets)"
    return DataError(
        f"tensorflow-datasets could not reach {name!r}: no prepared array_record copy in "
        f"{where} and it was not downloaded ({why}). There is no network access here; pass "
        "`--data-dir DIR` with a folder of IDX (.gz) or npz files instead (for example a folder "
        "holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz)."
    )


def load_tfds(name: str, *, data_dir: str | None = None, download: bool = False) -> Dataset:
    """Read the train and test splits of a tfds dataset into memory through `tfds.data_source`.

    With `download=False` only an already prepared array_record copy under `data_dir` is
    used; with `download=True` tfds may fetch and prepare it (this needs network access).
    """
    if name not in TFDS_NAMES:
        raise DataError(f"unknown tensorflow-datasets name {name!r}; known: {sorted(TFDS_NAMES)}.")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise _unreachable(name, data_dir, "tensorflow-datasets is not installed") from e
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    try:
        sources = tfds.data_source(
            name,
            data_dir=data_dir,
            download=download,
            builder_kwargs={"file_format": "array_record"},
        )
        splits = {s: sources[s] for s in ("train", "test")}
    except Exception as e:  # noqa: BLE001 - tfds raises many unrelated types when offline
        raise _unreachable(name, data_dir, f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    out = {}
    for split, src in splits.items():
        items = src.__getitems__(list(range(len(src))))
        images = np.stack([np.asarray(it["image"]) for it in items])
        labels = np.asarray([int(it["label"]) for it in items], np.int32)
        out[split] = (to_unit_images(images, 255.0), labels)
    return Dataset(name, *out["train"], *out["test"], TFDS_NAMES[name])
