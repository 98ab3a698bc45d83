"""Hostile input, generated: every bad file, setting or flag ends in one clear error.

More than 200 generated cases across the data loaders, checkpoints, `fit`'s settings
and the command line. Each must raise the library's own error type with a message
naming the problem (or, for the command line, exit with status 2 or 1 and one
`error:` line), never an internal traceback, and never be accepted silently: a
corrupted file either fails to load or loads exactly the original content.
Examples are derandomised, so every run tries the same inputs.
"""

import gzip
import io
import math
import struct
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqprop_jax.cli import main
from eqprop_jax.data import DataError, Dataset, load_folder, read_idx
from eqprop_jax.train import CheckpointError, TrainConfig, load_checkpoint, save_checkpoint

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def fuzz(n: int) -> settings:
    return settings(FUZZ, max_examples=n)


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


VALID_IDX = _idx_bytes(np.random.default_rng(0).integers(0, 256, (3, 5, 4)))


# -- loaders ------------------------------------------------------------------------------


@fuzz(60)
@given(
    kind=st.sampled_from(["truncate", "append", "dtype", "magic"]),
    where=st.integers(0, len(VALID_IDX) - 1),
    extra=st.binary(min_size=1, max_size=9),
    code=st.integers(0, 255).filter(lambda c: c not in (0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E)),
    gz=st.booleans(),
)
def test_idx_damage_is_a_data_error(kind, where, extra, code, gz):
    raw = bytearray(VALID_IDX)
    if kind == "truncate":
        raw = raw[:where]
    elif kind == "append":
        raw += extra
    elif kind == "dtype":
        raw[2] = code
    else:
        raw[where % 2] = 1 + code % 255
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("x.idx.gz" if gz else "x.idx")
        path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
        with pytest.raises(DataError, match=str(path)):
            read_idx(path)


@fuzz(20)
@given(cut=st.integers(1, 200), gz_tail=st.booleans())
def test_truncated_gzip_streams_are_data_errors(cut, gz_tail):
    packed = gzip.compress(VALID_IDX)
    raw = packed[: len(packed) - cut] if gz_tail else packed[: max(1, cut % len(packed))]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.gz"
        path.write_bytes(raw)
        with pytest.raises(DataError, match="corrupt or truncated|not an IDX|truncated"):
            read_idx(path)


def _good_arrays(rng, n_train, n_test):
    return {
        "x_train": rng.random((n_train, 4, 3, 1)).astype(np.float32),
        "y_train": np.arange(n_train) % 3,
        "x_test": rng.random((n_test, 4, 3, 1)).astype(np.float32),
        "y_test": np.arange(n_test) % 3,
        "num_classes": np.array(3),
    }


DEFECTS = [
    "nan_pixel",
    "inf_pixel",
    "label_high",
    "label_gap",
    "label_negative",
    "label_fraction",
    "label_nan",
    "length_mismatch",
    "image_ndim",
    "missing_key",
    "string_labels",
    "int_pixels_out_of_range",
    "empty_split",
    "shape_mismatch",
    "stated_too_few_classes",
]


@fuzz(60)
@given(
    defect=st.sampled_from(DEFECTS),
    split=st.sampled_from(["train", "test"]),
    n_train=st.integers(3, 12),
    n_test=st.integers(3, 8),
    seed=st.integers(0, 2**16),
)
def test_bad_npz_contents_are_data_errors(defect, split, n_train, n_test, seed):
    rng = np.random.default_rng(seed)
    a = _good_arrays(rng, n_train, n_test)
    x, y = f"x_{split}", f"y_{split}"
    n = len(a[y])
    i = int(rng.integers(n))
    if defect in ("nan_pixel", "inf_pixel"):
        a[x][i, int(rng.integers(4)), int(rng.integers(3)), 0] = (
            np.nan if defect == "nan_pixel" else -np.inf
        )
        msg = f"{split} image {i} holds NaN"
    elif defect == "label_high":
        a[y][i] = 3 + int(rng.integers(0, 300))
        msg = r"must lie in \[0, 3\)"
    elif defect == "label_gap":  # no stated count: inferred, and a gap is refused
        del a["num_classes"]
        a[y][i] = 5 + int(rng.integers(0, 300))
        msg = "run up to .* have no training example" if split == "train" else r"\[0, 3\)"
    elif defect == "label_negative":
        a[y][i] = -1 - int(rng.integers(0, 5))
        msg = r"must lie in \[0, 3\)"
    elif defect in ("label_fraction", "label_nan"):
        a[y] = a[y].astype(np.float64)
        a[y][i] = 0.5 if defect == "label_fraction" else np.nan
        msg = f"{split} labels must be integer class indices"
    elif defect == "length_mismatch":
        a[y] = a[y][:-1]
        msg = f"{n} images but {n - 1} labels"
    elif defect == "image_ndim":
        a[x] = a[x].reshape(n, -1) if rng.integers(2) else a[x][..., None]
        msg = "expected \\(N, H, W\\[, C\\]\\)"
    elif defect == "missing_key":
        del a[y]
        msg = "missing arrays"
    elif defect == "string_labels":
        a[y] = np.array(["a"] * n)
        msg = f"{split} labels must be integers"
    elif defect == "int_pixels_out_of_range":
        a[x] = np.full(a[x].shape, 256 + int(rng.integers(1000)), np.int32)
        msg = "must lie in 0..255"
    elif defect == "empty_split":
        a[x], a[y] = a[x][:0], a[y][:0]
        msg = f"the {split} split is empty"
    elif defect == "shape_mismatch":
        a[x] = np.zeros((n, 5, 3, 1), np.float32)
        msg = "but test images"
    else:
        a["num_classes"] = np.array(2)
        msg = r"must lie in \[0, 2\)"
    with tempfile.TemporaryDirectory() as d:
        np.savez(Path(d) / "data.npz", **a)
        with pytest.raises(DataError, match=msg):
            load_folder(d)


@fuzz(30)
@given(kind=st.sampled_from(["truncate", "flip"]), where=st.floats(0, 1), bit=st.integers(0, 7))
def test_damaged_npz_bytes_fail_or_load_exactly(kind, where, bit):
    a = _good_arrays(np.random.default_rng(1), 6, 3)
    buf = io.BytesIO()
    np.savez(buf, **a)
    raw = bytearray(buf.getvalue())
    k = min(int(where * len(raw)), len(raw) - 1)
    if kind == "truncate":
        raw = raw[:k]
    else:
        raw[k] ^= 1 << bit
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "data.npz").write_bytes(bytes(raw))
        try:
            got = load_folder(d)
        except DataError as e:
            assert str(Path(d)) in str(e)
            return
    # Accepted: then the bytes that changed carried no data (e.g. a zip timestamp).
    assert got.num_classes == 3
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(got, key), a[key].astype(getattr(got, key).dtype))


@fuzz(12)
@given(
    n=st.integers(1, 6),
    x_dtype=st.sampled_from(["complex64", "bool", "object", "U2"]),
)
def test_dataset_refuses_non_numeric_images(n, x_dtype):
    x = np.zeros((n, 2), x_dtype)
    y = np.arange(n) % 2
    with pytest.raises(DataError, match="real numbers"):
        Dataset("fuzz", x, y, np.zeros((n, 2), np.float32), y, 2)


# -- checkpoints ----------------------------------------------------------------------------

STATE = {"w": jnp.linspace(-1.0, 1.0, 60).reshape(6, 10), "step": jnp.array(7)}


@fuzz(40)
@given(
    kind=st.sampled_from(["truncate", "flip", "zero"]), where=st.floats(0, 1), bit=st.integers(0, 7)
)
def test_damaged_checkpoints_fail_or_load_exactly(kind, where, bit):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "checkpoint.npz"
        save_checkpoint(path, STATE, {"epoch": 1})
        raw = bytearray(path.read_bytes())
        k = min(int(where * len(raw)), len(raw) - 1)
        if kind == "truncate":
            raw = raw[:k]
        elif kind == "flip":
            raw[k] ^= 1 << bit
        else:
            raw[k : k + 8] = bytes(len(raw[k : k + 8]))
        path.write_bytes(bytes(raw))
        try:
            got, _ = load_checkpoint(path, STATE)
        except CheckpointError as e:
            assert str(path) in str(e)
            return
    for key in STATE:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(STATE[key]))


# -- settings -------------------------------------------------------------------------------

BAD_SETTINGS = {
    "epochs": [0, -1, 1.5, "3", True, None],
    "batch_size": [0, -4, 2.0, "8", None],
    "eval_batch_size": [0, -1, 1.0],
    "seed": [-1, 2**32, 1.5, "0", None],
    "lr": [0.0, -0.5, math.nan, math.inf, -math.inf, "0.1", None, [], (0.1, -1.0),
           (0.1, math.nan), {}, {"(": 0.1}, {"*": -1.0}, {1: 0.1}],
    "optimizer": ["sdg", "", None, "Adam"],
    "momentum": [-0.1, 1.0, 1.5, math.nan, "0.9"],
    "weight_decay": [-1e-4, math.inf, math.nan, "0"],
    "schedule": ["linear", "", None],
    "warmup_epochs": [-1, 10, 2.5],
    "frozen": ["(", "[a-", 3],
    "max_steps_per_epoch": [0, -2, 1.5],
    "eval_limit": [0, -1, 2.0],
    "augment": [1, "yes"],
    "shard": [0, None],
}  # fmt: skip
SETTING_CASES = [(k, v) for k, vs in BAD_SETTINGS.items() for v in vs]


@pytest.mark.parametrize("field, value", SETTING_CASES)
def test_bad_settings_are_value_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{"epochs": 10, field: value})


# -- fit -------------------------------------------------------------------------------


def _fit_inputs():
    import equinox as eqx
    import jax
    import optax

    from eqprop_jax.data import load_digits
    from eqprop_jax.estimators import EquilibriumProp
    from eqprop_jax.models.hopfield import HopfieldMLP

    data = load_digits().flat().subset(train=40, test=20)
    model = HopfieldMLP((64, 8, 10), key=jax.random.PRNGKey(0))
    est = EquilibriumProp(beta=0.2, free_steps=3, nudged_steps=2)
    cfg = TrainConfig(epochs=1, batch_size=8)
    nan = eqx.tree_at(lambda m: m.weights[0], model, model.weights[0].at[1, 2].set(jnp.nan))
    inf = eqx.tree_at(lambda m: m.biases[0], model, model.biases[0].at[0].set(-jnp.inf))
    small = HopfieldMLP((64, 8, 6), key=jax.random.PRNGKey(0))
    return (
        data,
        model,
        est,
        cfg,
        {
            "data_none": (dict(data=None), TypeError, "data must be"),
            "data_tuple": (dict(data=(data.x_train, data.y_train)), TypeError, "data must be"),
            "config_str": (dict(config="fast"), TypeError, "config must be a TrainConfig"),
            "config_dict": (dict(config={"epochs": 1}), TypeError, "config must be a TrainConfig"),
            "optimizer_str": (dict(optimizer="adam"), TypeError, "optax.GradientTransformation"),
            "optimizer_twice": (
                dict(optimizer=optax.sgd(0.1), config=TrainConfig(epochs=1, batch_size=8, lr=0.2)),
                ValueError,
                "not both",
            ),
            "estimator_none": (dict(estimator=None), TypeError, "estimator must be"),
            "estimator_fn": (dict(estimator=lambda m, x, y: 0), TypeError, "estimator must be"),
            "model_nan": (dict(model=nan), ValueError, r"weights\[0\] holds NaN"),
            "model_inf": (dict(model=inf), ValueError, r"biases\[0\] holds NaN or inf"),
            "model_too_few_outputs": (
                dict(model=small),
                ValueError,
                "10 classes but the model has 6",
            ),
            "batch_too_big": (dict(config=TrainConfig(batch_size=64)), ValueError, "larger than"),
            "out_dev_null": (dict(out_dir="/dev/null"), Exception, "output folder"),
            "out_below_file": (dict(out_dir="/dev/null/run"), Exception, "output folder"),
            "out_nul_byte": (dict(out_dir="runs/a\0b"), Exception, "output folder"),
            "out_proc": (dict(out_dir="/proc/eqprop-fuzz"), Exception, "output folder"),
        },
    )


FIT_CASES = sorted(_fit_inputs()[4])


@pytest.mark.parametrize("case", FIT_CASES)
def test_bad_fit_inputs_are_refused_before_training(case):
    from eqprop_jax.train import OutputError, fit

    data, model, est, cfg, cases = _fit_inputs()
    kw, error, msg = cases[case]
    args = dict(model=model, estimator=est, data=data, config=cfg) | kw
    with pytest.raises(error, match=msg) as e:
        fit(args.pop("model"), args.pop("estimator"), args.pop("data"), args.pop("config"),
            log=str, **args)  # fmt: skip
    if error is Exception:
        assert isinstance(e.value, OutputError)


# -- command line ---------------------------------------------------------------------------

INT_FLAGS = {
    "train": ["--epochs", "--batch-size", "--max-steps-per-epoch", "--eval-limit", "--seed",
              "--train-limit"],
    "align": ["--batch-size", "--seed", "--train-limit"],
}  # fmt: skip
BAD_INTS = ["-1", "1.5", "abc", "", "nan", "1e3", "0x10", "0"]
BAD_FLOATS = ["nan", "inf", "-inf", "0", "-0.5", "1e30", "1e39", "abc", "", "1e400"]
FLAG_CASES = (
    [
        (cmd, flag, v)
        for cmd, flags in INT_FLAGS.items()
        for flag in flags
        # A seed of 0 is valid; 2**32 is not.
        for v in (BAD_INTS if flag != "--seed" else [*BAD_INTS[:-1], "4294967296"])
    ]
    + [("train", "--lr", v) for v in BAD_FLOATS]
    + [("align", "--betas", v) for v in ["0", "nan", "inf", "-inf", "x", ""]]
)


@pytest.mark.parametrize("cmd, flag, value", FLAG_CASES)
def test_bad_flag_values_exit_2_with_one_message(capsys, tmp_path, cmd, flag, value):
    rc = main([cmd, flag, value, "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert f"argument {flag}" in err and "Traceback" not in err + out
    assert not (tmp_path / "o").exists()


def _write(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


DATA_DIRS = {
    "garbage_idx": lambda f: [
        _write(f, n, b"garbage")
        for n in (
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        )
    ],
    "three_of_four_idx": lambda f: [
        _write(f, n, gzip.compress(VALID_IDX))
        for n in (
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
        )
    ],
    "garbage_npz": lambda f: _write(f, "data.npz", b"PK\x03\x04 not really a zip"),
    "two_npz": lambda f: [_write(f, n, b"") for n in ("a.npz", "b.npz")],
    "md5_mismatch": lambda f: [
        _write(f, "x.npz", b""),
        _write(f, "MD5SUMS", b"0" * 32 + b"  x.npz\n"),
    ],
    "md5_missing_file": lambda f: _write(f, "MD5SUMS", b"0" * 32 + b"  gone.npz\n"),
    "bad_md5_line": lambda f: _write(f, "MD5SUMS", b"just-one-field\n"),
    "unrelated": lambda f: _write(f, "notes.txt", b"hello"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(DATA_DIRS))
@pytest.mark.parametrize("dataset", ["mnist", "folder"])
def test_bad_data_folders_exit_1_with_one_message(capsys, tmp_path, kind, dataset):
    data = tmp_path / "data"
    DATA_DIRS[kind](data)
    out = tmp_path / "out"
    rc = main(["train", "--dataset", dataset, "--data-dir", str(data), "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 1, (stdout, err)
    assert err.startswith("eqprop-jax: error: ") and err.count("\n") == 1
    assert "Traceback" not in err + stdout and str(data) in err
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize(
    "argv, text",
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--estimator", "magic"], "does not apply to preset"),
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--dataset", "folder"], "needs a data folder: pass --data-dir"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent/x"], "does not exist"),
        (["train", "--dataset", "mnist", "--data-dir", "/dev/null"], "not a directory"),
        (["train", "--out", "/dev/null"], "output folder /dev/null exists and is not a folder"),
        (["train", "--out", "/proc/eqprop-fuzz/x"], "output folder"),
        (["train", "--train-limit", "3"], "larger than the 3 training examples"),
        (["align", "--estimators", "nope"], "do not apply"),
        (["align", "--out", "/dev/null/x"], "output folder"),
        (["bench", "nope"], "unknown benchmark"),
    ],
)
def test_bad_choices_exit_1_with_one_message(capsys, tmp_path, argv, text):
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "o")] if argv[0] != "bench" else argv
    rc = main(argv)
    stdout, err = capsys.readouterr()
    assert rc == 1, (stdout, err)
    assert err.startswith("eqprop-jax: error: ") and text in err, err
    assert "Traceback" not in err + stdout


def test_the_suite_tries_more_than_200_inputs():
    generated = 60 + 20 + 60 + 30 + 12 + 40  # hypothesis max_examples above
    parametrized = len(SETTING_CASES) + len(FIT_CASES) + len(FLAG_CASES) + 2 * len(DATA_DIRS) + 12
    assert generated + parametrized >= 200
