"""The `eqprop-jax` command line: messages on bad input, checkpoint refusal, `align`."""

import re

import pytest

from eqprop_jax.cli import main
from eqprop_jax.presets import PRESETS, get_preset

TINY = ["--epochs", "1", "--max-steps-per-epoch", "2", "--eval-limit", "16", "--no-progress"]


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_every_paper_preset_is_registered():
    for name in (
        "default",
        "scellier2017-1h",
        "ernoult2019-p1h",
        "ernoult2019-pconv",
        "laborieux2021-cifar10",
        "scellier2024-drn-xs",
        "scellier2024-drn-1h",
        "ernoult2022-ldrl-cifar10",
    ):
        assert get_preset(name).name == name
    assert set(get_preset("default").estimators) >= {"ep-centered", "bptt", "rbp-implicit"}


def test_unknown_preset_dataset_and_estimator(capsys, tmp_path):
    rc, _, err = run(capsys, "train", "--preset", "nope", "--out", str(tmp_path))
    assert rc == 1 and "unknown preset 'nope'" in err and "default" in err
    rc, _, err = run(capsys, "train", "--dataset", "imagenet9", "--out", str(tmp_path))
    assert rc == 1 and "unknown dataset 'imagenet9'" in err
    rc, _, err = run(capsys, "train", "--estimator", "dtp-ldrl", "--out", str(tmp_path))
    assert rc == 1 and "does not apply to preset 'default'" in err and "ep-centered" in err
    assert not any(tmp_path.iterdir())  # nothing written on bad input


def test_empty_data_folder_and_unreachable_tfds(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(
        capsys,
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(empty),
        "--out",
        str(tmp_path / "o"),
    )
    assert rc == 1 and f"data folder {empty} is empty" in err
    tfds_dir = tmp_path / "tfds"
    (tfds_dir / "downloads").mkdir(parents=True)
    rc, _, err = run(
        capsys,
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(tfds_dir),
        "--out",
        str(tmp_path / "o"),
    )
    assert rc == 1 and "could not reach 'cifar10'" in err and "--data-dir" in err


def test_checkpoint_of_another_model_is_refused_and_kept(capsys, tmp_path):
    out = tmp_path / "run"
    rc, stdout, err = run(capsys, "train", "--out", str(out), *TINY)
    assert rc == 0, err
    assert re.search(r"done: 1 epochs, 2 steps .* test accuracy", stdout)
    ckpt, metrics = out / "checkpoint.npz", out / "metrics.jsonl"
    # The learning curves are drawn beside the metrics.
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    before = ckpt.read_bytes(), metrics.read_bytes()
    # Same folder, no --resume: refused before the data is loaded, nothing overwritten.
    rc, _, err = run(capsys, "train", "--out", str(out), "--dataset", "mnist", *TINY)
    assert rc == 1 and "already holds a checkpoint" in err and "--resume" in err
    assert "--out" in err and "`" not in err
    # --resume with a different model (512 hidden units instead of 128): refused.
    rc, _, err = run(
        capsys,
        "train",
        "--preset",
        "ernoult2019-p1h",
        "--dataset",
        "digits",
        "--resume",
        "--out",
        str(out),
        *TINY,
    )
    assert rc == 1 and "written for a different model" in err
    assert "HopfieldMLP" in err
    # --resume with another seed would change the data order: refused too.
    rc, _, err = run(capsys, "train", "--resume", "--seed", "3", "--out", str(out), *TINY)
    assert rc == 1 and "seed 0" in err and "--seed 0" in err
    assert (ckpt.read_bytes(), metrics.read_bytes()) == before


def test_align_default_centered_ep_within_one_degree(capsys, tmp_path):
    rc, out, err = run(
        capsys,
        "align",
        "--estimators",
        "ep-centered",
        "bptt",
        "--betas",
        "0.03",
        "--out",
        str(tmp_path),
    )
    assert rc == 0, err
    table = out.split("alignment with rbp-implicit")[1].split("\n\n")[0]
    rows = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(ep-centered|bptt)\s+([0-9.]+)\s", table, re.M)
    }
    assert set(rows) == {"ep-centered", "bptt"}
    # BPTT through the preset's converged free phase is the autodiff gradient itself.
    assert rows["bptt"] < 1e-3
    # The brief's requirement: centered EP within 1° of the autodiff (implicit RBP) gradient.
    assert rows["ep-centered"] < 1.0, out
    for name in ("alignment.json", "angle_vs_beta.png", "angle_per_layer.png"):
        assert (tmp_path / name).exists()
    assert (tmp_path / "angle_vs_beta.png").read_bytes()[:4] == b"\x89PNG"


def test_align_rejects_estimators_of_other_models(capsys, tmp_path):
    rc, _, err = run(capsys, "align", "--estimators", "dtp-lee", "--out", str(tmp_path))
    assert rc == 1 and "do not apply" in err


def test_bench_unknown_name(capsys):
    rc, _, err = run(capsys, "bench", "nope")
    assert rc == 1 and "unknown benchmark" in err


def test_bench_imports_each_benchmark_main():
    from eqprop_jax.cli import BENCHMARKS, _benchmark_main

    for name in BENCHMARKS:
        main = _benchmark_main(name)
        assert callable(main) and main.__module__ == f"benchmarks.{name}"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_estimators_build(name):
    # Every estimator in a preset's table can be constructed; those `align` sweeps take β.
    from eqprop_jax.estimators import Estimator
    from eqprop_jax.presets import PresetError

    p = get_preset(name)
    assert p.estimator in p.estimators and p.reference in p.estimators
    for est in p.estimators:
        assert isinstance(p.make_estimator(est), Estimator)
    for est in p.beta_sweep:
        assert p.make_estimator(est, beta=0.25).beta == 0.25
    others = [n for n in p.estimators if n not in p.beta_sweep]
    with pytest.raises(PresetError, match="takes no β"):
        p.make_estimator(others[0], beta=0.25)


NOMINAL = {"digits": (8, 8, 1), "mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_models_match_their_learning_rates(name):
    # Each preset builds its model for its dataset's images, and its per-layer learning
    # rates (when given as a list) match the model's layers.
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from eqprop_jax.presets import to_layout
    from eqprop_jax.train import make_optimizer

    p = get_preset(name)
    x = to_layout(np.zeros((1, *NOMINAL[p.dataset]), np.float32), p.layout)
    # Shapes only (eval_shape): the CIFAR-sized models would take long to initialise.
    model = eqx.filter_eval_shape(p.model, jax.random.PRNGKey(0), x.shape[1:], 10)
    inexact = lambda a: isinstance(a, jax.ShapeDtypeStruct) and jnp.issubdtype(a.dtype, jnp.inexact)
    params = eqx.filter(model, inexact)
    tx = make_optimizer(params, lr=p.train.lr, frozen=p.train.frozen)
    updates = jax.eval_shape(lambda q: tx.update(q, tx.init(q), q)[0], params)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)


# -- bad input: one clear message, before any work ----------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["train", "--lr", "nan"], "--lr"),
        (["train", "--lr", "-0.5"], "--lr"),
        (["train", "--lr", "1e39"], "--lr"),
        (["train", "--eval-limit", "0"], "--eval-limit"),
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--seed", "-3"], "--seed"),
        (["align", "--batch-size", "0"], "--batch-size"),
        (["align", "--betas", "0.1", "inf"], "--betas"),
    ],
)
def test_out_of_range_flags_are_refused(capsys, tmp_path, argv, flag):
    rc, _, err = run(capsys, *argv, "--out", str(tmp_path / "o"))
    assert rc == 2 and f"argument {flag}" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", ["/proc/eqprop-x", "file/below", "/dev/null"])
def test_unusable_out_is_refused_before_the_data(capsys, tmp_path, where):
    (tmp_path / "file").write_text("")
    out = where if where.startswith("/") else str(tmp_path / where)
    # The data folder does not exist either: the output folder is checked first.
    missing = str(tmp_path / "no-data")
    for cmd in ("train", "align"):
        rc, _, err = run(capsys, cmd, "--dataset", "mnist", "--data-dir", missing, "--out", out)
        assert rc == 1 and "output folder" in err and "no-data" not in err, err


def test_a_second_concurrent_run_is_refused(capsys, tmp_path):
    from eqprop_jax.train import Checkpointer

    with Checkpointer(tmp_path):
        rc, _, err = run(capsys, "train", "--out", str(tmp_path), *TINY)
    assert rc == 1 and "another run (process" in err and "--out" in err


def test_library_parameters_become_flags():
    from eqprop_jax.cli import _translate

    msg = "pass `resume=True`, or another `out_dir`; resume with `seed=4`, keep `shard=False`."
    assert (
        _translate(msg)
        == "pass --resume, or another --out; resume with --seed 4, keep `shard=False`."
    )
