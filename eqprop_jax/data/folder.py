"""An offline source: a local folder of IDX (optionally gzipped) or npz files.

The IDX layout is the one of LeCun's MNIST files (also used by Fashion-MNIST):
a magic number 0x0000TTNN (TT the element type, NN the number of dimensions),
NN big-endian uint32 sizes, then the raw row-major data. An `MD5SUMS` file
beside the data (`<md5>  <file name>` per line) is checked when present.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from .dataset import DataError, Dataset, to_unit_images

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The split file stems of the MNIST family ("train-images-idx3-ubyte" ...).
_IDX_STEMS = {
    ("train", "x"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "y"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "x"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "y"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or .gz) into a NumPy array, checking its header and size."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the file ({e}); it is corrupt or truncated.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'none'}).")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated.")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes of data) but the "
            f"file holds {len(raw) - header} bytes; it is corrupt or truncated."
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def md5(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_md5sums(folder: str | os.PathLike) -> list[str]:
    """Check every file listed in `folder/MD5SUMS`; returns the names checked.

    Raises a [`DataError`][] naming the first missing or mismatching file.
    """
    folder = Path(folder)
    sums = folder / "MD5SUMS"
    if not sums.exists():
        return []
    checked = []
    for lineno, line in enumerate(sums.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"{sums}:{lineno}: expected '<md5>  <file>', got {line!r}.")
        digest, name = parts[0].lower(), parts[1].lstrip("*")
        target = folder / name
        if not target.exists():
            raise DataError(f"{folder}: {name} is listed in MD5SUMS but missing.")
        actual = md5(target)
        if actual != digest:
            raise DataError(
                f"{target}: MD5 checksum mismatch (expected {digest}, got {actual}); "
                "the file is corrupt or was changed."
            )
        checked.append(name)
    return checked


def _find_idx(folder: Path, split: str, part: str) -> Path | None:
    for stem in _IDX_STEMS[(split, part)]:
        for suffix in (".gz", ""):
            p = folder / (stem + suffix)
            if p.exists():
                return p
    return None


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `keys` (and `num_classes`, if there) of one npz file."""
    try:
        with np.load(path) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing} (it holds {z.files}).")
            return {k: np.asarray(z[k]) for k in (*keys, "num_classes") if k in z.files}
    except DataError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(f"{path}: holds Python objects, not numeric arrays.") from e
        raise DataError(f"{path}: cannot read the npz data ({e}); it is corrupt.") from e
    except Exception as e:  # noqa: BLE001 - zip, CRC, zlib and header errors alike
        raise DataError(
            f"{path}: cannot read the npz data ({type(e).__name__}: {e}); it is corrupt or "
            "truncated."
        ) from e


def _npz_splits(folder: Path) -> dict[str, np.ndarray] | None:
    """x_train, y_train, x_test, y_test from `data.npz`-style or `train.npz` + `test.npz`."""
    train, test = folder / "train.npz", folder / "test.npz"
    files = sorted(folder.glob("*.npz"))
    if train.exists() and test.exists():
        out = {}
        for split, p in (("train", train), ("test", test)):
            arrays = _read_npz(p, ("x", "y"))
            out[f"x_{split}"], out[f"y_{split}"] = arrays["x"], arrays["y"]
            if "num_classes" in arrays:
                out["num_classes"] = arrays["num_classes"]
        return out
    if len(files) == 1:
        return _read_npz(files[0], ("x_train", "y_train", "x_test", "y_test"))
    if files:
        raise DataError(
            f"{folder}: found {len(files)} npz files; expected one file with "
            "x_train/y_train/x_test/y_test or a train.npz + test.npz pair."
        )
    return None


def _class_count(folder: Path, arrays: dict, name: str, num_classes: int | None) -> int:
    """The class count: stated (argument, an npz `num_classes` entry, or the known count
    of a named dataset), else inferred from labels that must then cover 0..K-1."""
    stated = num_classes
    if stated is None and "num_classes" in arrays:
        try:
            stated = int(np.asarray(arrays["num_classes"]).item())
        except (ValueError, TypeError) as e:
            raise DataError(f"{folder}: the npz entry num_classes is not one integer.") from e
    if stated is None:
        from .tfds_source import TFDS_NAMES

        stated = TFDS_NAMES.get(name)
    if stated is not None:
        return stated
    y = np.asarray(arrays["y_train"]).reshape(-1)
    if y.size == 0 or not np.issubdtype(y.dtype, np.number) or not np.isfinite(y).all():
        return 2  # the Dataset's own checks name what is wrong
    k = int(np.max(y)) + 1
    present = np.zeros(max(k, 1), bool)
    ints = y[(y >= 0) & (y == np.round(y))].astype(np.int64)
    present[ints] = True
    absent = np.flatnonzero(~present)
    if absent.size:
        raise DataError(
            f"{folder}: the training labels run up to {k - 1}, but classes "
            f"{_ranges(absent)} have no training example (a corrupt label?). State the class "
            "count (`num_classes`) if this is intended."
        )
    return max(k, 2)


def _ranges(values: np.ndarray) -> str:
    runs, start = [], values[0]
    for a, b in zip(values[:-1], values[1:], strict=True):
        if b != a + 1:
            runs.append((start, a))
            start = b
    runs.append((start, values[-1]))
    text = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in runs[:5])
    return text + (", ..." if len(runs) > 5 else "")


def load_folder(
    folder: str | os.PathLike, *, name: str | None = None, num_classes: int | None = None
) -> Dataset:
    """Load the four MNIST-style IDX files, or npz arrays, from `folder`.

    Images of integer type (0..255) are scaled by 1/255 to [0, 1]; float images are
    kept. The class count is `num_classes`, else an npz entry `num_classes`, else the
    known count of `name` ("mnist": 10, ...), else inferred from the training labels,
    which must then cover every class from 0 up. Labels outside the class range, NaN
    or inf pixels, and fractional labels are refused with the file named.
    """
    folder = Path(folder).expanduser()
    name = name or folder.name
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist.")
    if not folder.is_dir():
        raise DataError(f"data folder {folder} is not a directory.")
    if not any(folder.iterdir()):
        raise DataError(
            f"data folder {folder} is empty: put the four IDX files "
            "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            "t10k-labels-idx1-ubyte.gz) or npz arrays there."
        )
    verify_md5sums(folder)
    idx = {key: _find_idx(folder, *key) for key in _IDX_STEMS}
    if any(p is not None for p in idx.values()):
        missing = [_IDX_STEMS[k][0] for k, p in idx.items() if p is None]
        if missing:
            raise DataError(f"data folder {folder}: IDX files missing: {missing}.")
        arrays = {f"{part}_{split}": read_idx(p) for (split, part), p in idx.items()}
        where = {f"{part}_{split}": p for (split, part), p in idx.items()}
    else:
        arrays = _npz_splits(folder)
        if arrays is None:
            raise DataError(
                f"data folder {folder} holds no IDX (train-images-idx3-ubyte[.gz], ...) or "
                f"npz files (found: {sorted(p.name for p in folder.iterdir())[:8]})."
            )
        where = dict.fromkeys(arrays, folder)
    xs = {}
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        if x.ndim not in (3, 4):
            raise DataError(
                f"{where[f'x_{split}']}: {split} images have shape {x.shape}; expected "
                "(N, H, W[, C])."
            )
        if np.issubdtype(x.dtype, np.integer):
            if x.size and (x.min() < 0 or x.max() > 255):
                raise DataError(
                    f"{where[f'x_{split}']}: integer {split} images must lie in 0..255, found "
                    f"{x.min()}..{x.max()}."
                )
            x = to_unit_images(x, 255.0)
        xs[split] = x[..., None] if x.ndim == 3 else x
    k = _class_count(folder, arrays, name, num_classes)
    try:
        return Dataset(name, xs["train"], arrays["y_train"], xs["test"], arrays["y_test"], k)
    except DataError as e:
        raise DataError(f"data folder {folder}: {e}") from e


def looks_like_folder_source(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds IDX/npz files (rather than a tensorflow-datasets data_dir)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return False
    names = [p.name for p in folder.iterdir()]
    return any(("idx" in n and "ubyte" in n) or n.endswith(".npz") or n == "MD5SUMS" for n in names)
