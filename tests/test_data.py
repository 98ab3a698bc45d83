"""Data sources: embedded digits, IDX/npz folders, tfds error path, checks on load.

Batching and augmentation (`data/batching.py`) are tested in test_data_batching.py."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from eqprop_jax.data import (
    DataError,
    Dataset,
    load_dataset,
    load_digits,
    load_folder,
    read_idx,
    verify_md5sums,
)

MNIST = Path("/work/shared/data/mnist")


def _write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    array = np.asarray(array, np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def _idx_folder(tmp_path: Path, n_train=12, n_test=6, gz=True) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "tiny"
    folder.mkdir()
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(
            folder / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 5, 4)), gz
        )
        _write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 3, gz)
    return folder


def test_digits_shapes_and_fixed_stratified_split():
    d = load_digits(seed=0)
    assert d.x_train.shape[1:] == (8, 8, 1) and d.x_train.dtype == np.float32
    assert len(d.x_train) + len(d.x_test) == 1797  # the UCI optdigits images in scikit-learn
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0 and d.x_train.max() == 1.0
    # Stratified: every class holds round(20%) of its examples in the test split.
    counts = np.bincount(d.y_test, minlength=10)
    totals = counts + np.bincount(d.y_train, minlength=10)
    np.testing.assert_array_equal(counts, np.round(0.2 * totals).astype(int))
    other = load_digits(seed=1)
    assert not np.array_equal(d.y_test, other.y_test)
    # Splits are disjoint: the pair (train, test) partitions the 1,797 images.
    all_imgs = np.concatenate([d.x_train, d.x_test]).reshape(1797, -1)
    from sklearn.datasets import load_digits as sk

    ref = sk().data / 16.0
    key = lambda a: sorted(map(bytes, np.round(a * 16).astype(np.uint8)))
    assert key(all_imgs) == key(ref)
    assert d.flat().x_train.shape == (len(d.x_train), 64)


def test_idx_roundtrip_plain_and_gzip(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (3, 7, 2))
    _write_idx(tmp_path / "a.gz", a, gz=True)
    _write_idx(tmp_path / "a", a, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), a)


def test_folder_source_scales_and_counts_classes(tmp_path):
    folder = _idx_folder(tmp_path)
    d = load_folder(folder)
    assert d.x_train.shape == (12, 5, 4, 1) and d.x_test.shape == (6, 5, 4, 1)
    raw = read_idx(folder / "train-images-idx3-ubyte.gz")
    np.testing.assert_allclose(d.x_train[..., 0], raw / 255.0, rtol=1e-6)
    assert d.num_classes == 3
    np.testing.assert_array_equal(d.y_test, np.arange(6) % 3)


def test_npz_folder(tmp_path):
    rng = np.random.default_rng(2)
    xs = {
        s: rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
        for s, n in (("train", 8), ("test", 4))
    }
    np.savez(tmp_path / "train.npz", x=xs["train"], y=np.arange(8) % 5)
    np.savez(tmp_path / "test.npz", x=xs["test"], y=np.arange(4))
    d = load_folder(tmp_path)
    assert d.x_train.shape == (8, 4, 4, 3) and d.num_classes == 5
    np.testing.assert_allclose(d.x_test, xs["test"] / 255.0, rtol=1e-6)


@pytest.mark.skipif(not (MNIST / "MD5SUMS").exists(), reason="no shared MNIST folder")
def test_mnist_idx_against_checksums():
    assert sorted(verify_md5sums(MNIST)) == sorted(
        line.split()[1] for line in (MNIST / "MD5SUMS").read_text().splitlines() if line.strip()
    )
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    # The official MNIST test set: 10,000 labels with these per-class counts.
    np.testing.assert_array_equal(
        np.bincount(labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    d = load_dataset("mnist", data_dir=MNIST)
    assert d.x_train.shape == (60000, 28, 28, 1) and d.x_test.shape == (10000, 28, 28, 1)
    assert d.num_classes == 10 and d.x_train.max() == 1.0


def test_missing_empty_and_unrelated_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", data_dir=tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_dataset("mnist", data_dir=empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="holds no IDX"):
        load_folder(other)


def test_corrupt_folders_name_the_file(tmp_path):
    folder = _idx_folder(tmp_path)
    # A checksum list that no longer matches a file.
    target = folder / "train-labels-idx1-ubyte.gz"
    digest = "0" * 32
    (folder / "MD5SUMS").write_text(f"{digest}  {target.name}\n")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: MD5 checksum mismatch"):
        load_folder(folder)
    (folder / "MD5SUMS").unlink()
    # Truncated gzip stream.
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_folder(folder)
    # Valid gzip, wrong payload size.
    with gzip.open(target, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 12) + bytes(5))
    with pytest.raises(DataError, match="announces shape"):
        load_folder(folder)
    # Not IDX at all.
    with gzip.open(target, "wb") as f:
        f.write(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="bad magic"):
        load_folder(folder)
    # A missing member of the four files.
    target.unlink()
    with pytest.raises(DataError, match="IDX files missing"):
        load_folder(folder)


def test_unknown_dataset_and_unreachable_tfds(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'imagenet9'.*digits"):
        load_dataset("imagenet9")
    # A tfds data_dir without a prepared copy (and no network): the error names --data-dir.
    tfds_dir = tmp_path / "tfds"
    (tfds_dir / "downloads").mkdir(parents=True)
    with pytest.raises(DataError, match="could not reach 'fashion_mnist'.*`data_dir`"):
        load_dataset("fashion_mnist", data_dir=tfds_dir)


# -- data validated at load time ------------------------------------------------------------


def test_a_corrupt_label_byte_is_refused_not_a_bigger_model(tmp_path):
    folder = _idx_folder(tmp_path)
    labels = tmp_path / "tiny" / "train-labels-idx1-ubyte.gz"
    y = read_idx(labels).copy()
    y[5] = 255
    _write_idx(labels, y)
    # Known dataset: the class count is stated (10 for MNIST) and the label is out of range.
    with pytest.raises(DataError, match=r"train labels must lie in \[0, 10\), but label 5 is 255"):
        load_dataset("mnist", data_dir=folder)
    # Unknown name: the count inferred from the labels would leave classes 3..254 empty.
    with pytest.raises(DataError, match=r"run up to 255, but classes 3\.\.254 have no training"):
        load_folder(folder)
    d = load_folder(folder, num_classes=256)  # stated: accepted, and the count is kept
    assert d.num_classes == 256 and d.y_train[5] == 255


def _npz(tmp_path, **arrays):
    rng = np.random.default_rng(0)
    base = {
        "x_train": rng.random((8, 4, 4, 1), np.float32),
        "y_train": np.arange(8) % 4,
        "x_test": rng.random((4, 4, 4, 1), np.float32),
        "y_test": np.arange(4),
    }
    base.update(arrays)
    folder = tmp_path / "npz"
    folder.mkdir(exist_ok=True)
    np.savez(folder / "data.npz", **base)
    return folder


def test_npz_labels_pixels_and_class_counts(tmp_path):
    # Float labels holding integers are accepted (as int32); fractional ones refused.
    d = load_folder(_npz(tmp_path, y_train=(np.arange(8) % 4).astype(np.float64)))
    assert d.y_train.dtype == np.int32 and d.num_classes == 4
    with pytest.raises(
        DataError, match=r"train labels must be integer class indices, but label 1 is 1\.5"
    ):
        load_folder(_npz(tmp_path, y_train=np.array([0, 1.5, 2, 3, 0, 1, 2, 3])))
    with pytest.raises(DataError, match="test image 2 holds NaN"):
        x = np.random.default_rng(1).random((4, 4, 4, 1)).astype(np.float32)
        x[2, 1, 1, 0] = np.nan
        load_folder(_npz(tmp_path, x_test=x))
    with pytest.raises(DataError, match="labels must be integers, got dtype <U1"):
        load_folder(_npz(tmp_path, y_test=np.array(list("abcd"))))
    with pytest.raises(DataError, match="train images have shape .* but test images"):
        load_folder(_npz(tmp_path, x_test=np.zeros((4, 5, 4, 1), np.float32)))
    with pytest.raises(DataError, match="4 images but 3 labels"):
        load_folder(_npz(tmp_path, y_test=np.arange(3)))
    # A stated class count in the npz is used, and checked.
    assert load_folder(_npz(tmp_path, num_classes=np.array(6))).num_classes == 6
    with pytest.raises(DataError, match=r"lie in \[0, 3\)"):
        load_folder(_npz(tmp_path, num_classes=np.array(3)))
    with pytest.raises(DataError, match="integer train images must lie in 0..255"):
        load_folder(_npz(tmp_path, x_train=np.full((8, 4, 4), 300, np.int16)))


def test_truncated_or_garbled_npz_names_the_file(tmp_path):
    folder = _npz(tmp_path)
    path = folder / "data.npz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=f"{path}: cannot read the npz data.*corrupt"):
        load_folder(folder)
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=f"{path}"):
        load_folder(folder)
    np.savez(path, x_train=np.array([object()]), y_train=[0], x_test=[0], y_test=[0])
    with pytest.raises(DataError, match="Python objects"):
        load_folder(folder)


def test_dataset_checks_its_arrays():
    x, y = np.zeros((4, 3), np.float32), np.arange(4) % 2
    Dataset("ok", x, y, x, y, 2)
    for kw, msg in [
        (dict(num_classes=1), "at least 2"),
        (dict(num_classes=2.0), "must be an integer"),
        (dict(y_train=np.array([0, 1, 2, 0])), r"label 2 is 2"),
        (dict(y_train=np.array([0, -1, 1, 0])), r"label 1 is -1"),
        (dict(x_train=np.array([[np.inf, 0, 0]] * 4, np.float32)), "train image 0 holds NaN"),
        (dict(x_test=np.zeros((4,), np.float32)), "feature axis"),
        (dict(y_test=np.zeros((4, 2), np.int32)), "vector of class indices"),
        (dict(x_train=np.zeros((0, 3)), y_train=np.zeros(0, int)), "train split is empty"),
    ]:
        args = dict(x_train=x, y_train=y, x_test=x, y_test=y, num_classes=2) | kw
        with pytest.raises(DataError, match=msg):
            Dataset("bad", **args)
