"""tensorflow-datasets random-access sources (array_record; TensorFlow is not needed)."""

from __future__ import annotations

import numpy as np

from .dataset import DataError, Dataset, to_unit_images

# The class counts of the datasets known by name; any other prepared tfds dataset is
# read as "tfds:<name>", its class count taken from its metadata.
TFDS_NAMES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def _unreachable(name: str, data_dir: str | None, why: str) -> DataError:
    where = data_dir or "the default tensorflow-datasets folder (~/tensorflow_datasets)"
    return DataError(
        f"tensorflow-datasets could not reach {name!r}: no prepared array_record copy in "
        f"{where} and it was not downloaded ({why}). There is no network access here; pass "
        "a folder of IDX (.gz) or npz files as `data_dir` instead (for example a folder "
        "holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz)."
    )


def _class_count(name: str, source, label_key: str, num_classes: int | None) -> int:
    """The class count from the dataset's metadata, checked against what is stated."""
    try:
        meta = int(source.dataset_info.features[label_key].num_classes)
    except (AttributeError, KeyError, TypeError, ValueError):
        meta = None
    known = TFDS_NAMES.get(name)
    stated = [(w, v) for w, v in (("known", known), ("given", num_classes)) if v is not None]
    for what, v in stated:
        if meta is not None and v != meta:
            raise DataError(
                f"tensorflow-datasets {name!r}: its metadata has {meta} classes, but the "
                f"{what} class count is {v}."
            )
    count = meta if meta is not None else (num_classes or known)
    if count is None:
        raise DataError(
            f"tensorflow-datasets {name!r}: its label {label_key!r} states no class count; "
            "state it (`num_classes`)."
        )
    return count


def load_tfds(
    name: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    num_classes: int | None = None,
) -> Dataset:
    """Read the train and test splits of a tfds dataset into memory through `tfds.data_source`.

    With `download=False` only an already prepared array_record copy under `data_dir` is
    used; with `download=True` tfds may fetch and prepare it (this needs network access).
    Images and labels are the dataset's supervised keys (default "image", "label"); the
    class count comes from the label's metadata and must agree with `num_classes` and,
    for the datasets of `TFDS_NAMES`, with the known count. uint8 images are scaled to
    [0, 1].
    """
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
    info = getattr(splits["train"], "dataset_info", None)
    keys = tuple(getattr(info, "supervised_keys", None) or ("image", "label"))[:2]
    count = _class_count(name, splits["train"], keys[1], num_classes)
    out = {}
    for split, src in splits.items():
        try:
            items = src.__getitems__(list(range(len(src))))
            images = np.stack([np.asarray(it[keys[0]]) for it in items])
            labels = np.asarray([np.asarray(it[keys[1]]) for it in items])
        except KeyError as e:
            raise DataError(
                f"tensorflow-datasets {name!r}: its {split} examples have no {e} feature."
            ) from e
        except Exception as e:  # noqa: BLE001 - decoding errors of a damaged copy
            raise DataError(
                f"tensorflow-datasets {name!r}: cannot read the {split} split "
                f"({type(e).__name__}: {e}); the prepared copy is damaged."
            ) from e
        if np.issubdtype(images.dtype, np.integer):
            images = to_unit_images(images, 255.0)
        out[split] = (images, labels)
    return Dataset(name, *out["train"], *out["test"], count)
