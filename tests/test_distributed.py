"""Multi-process data parallelism with jax.distributed: 2 local processes, gloo collectives."""

import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
from helpers import subprocess_env as _env

WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    mode, pid, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    from eqprop_jax.train import distributed as dist
    if mode != "single":
        dist.initialize(f"127.0.0.1:{port}", 2, pid, heartbeat_timeout=5,
                        initialization_timeout=60)
    import jax.numpy as jnp, equinox as eqx
    import eqprop_jax as eqp
    from eqprop_jax.data import load_digits
    d = load_digits().flat()
    model = eqp.HopfieldMLP((64, 16, 10), key=jax.random.PRNGKey(0), weight_scale=0.5)
    est = eqp.EquilibriumProp(beta=0.2, variant="centered", free_steps=8, nudged_steps=4)
    mesh = dist.global_mesh()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params = dist.replicate_global(params, mesh)

    @jax.jit
    def step(params, x, y):
        loss, g, _ = est(eqx.combine(params, static), x, y)
        return jax.tree_util.tree_map(lambda p, g: p - 0.3 * g, params, g), loss

    batch = 32
    rows = dist.process_rows(batch) if mode != "single" else slice(0, batch)
    for k in range(4):
        order = np.random.default_rng(k).permutation(len(d.y_train))[:batch]  # same everywhere
        idx = order[rows]
        x, y = dist.global_batch((d.x_train[idx], d.y_train[idx].astype(np.int32)), mesh)
        if mode == "die" and pid == 1 and k == 2:
            os._exit(17)
        params, loss = step(params, x, y)
    if dist.is_primary():
        flat = [np.asarray(a) for a in jax.tree_util.tree_leaves(params)]
        np.savez(out, *flat)
    print("WORKER-DONE", pid, float(loss), flush=True)
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(mode, pid, port, out):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, mode, str(pid), str(port), str(out)],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_two_processes_equal_one_process(tmp_path):
    port = _free_port()
    procs = [_spawn("multi", i, port, tmp_path / "multi.npz") for i in range(2)]
    single = _spawn("single", 0, 0, tmp_path / "single.npz")
    for p in [*procs, single]:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        assert "WORKER-DONE" in out
    multi, one = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    assert len(multi.files) == len(one.files) > 0
    for k in one.files:
        # float32 round-off: the cross-process all-reduce sums in another order.
        np.testing.assert_allclose(multi[k], one[k], rtol=2e-5, atol=1e-6)


def test_a_dead_process_stops_the_others_with_an_error(tmp_path):
    port = _free_port()
    start = time.monotonic()
    procs = [_spawn("die", i, port, tmp_path / "die.npz") for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    elapsed = time.monotonic() - start
    assert procs[1].returncode == 17
    assert procs[0].returncode != 0, outs[0][0]
    assert "another task died" in outs[0][1] or "heartbeat" in outs[0][1], outs[0][1][-2000:]
    assert elapsed < 120
    assert not (tmp_path / "die.npz").exists()


def _cli(out, *extra):
    return [
        sys.executable, "-m", "eqprop_jax.cli", "train", "--out", str(out), "--no-progress",
        "--max-steps-per-epoch", "3", "--eval-limit", "64", *extra,
    ]


def _run_cli(procs_args, timeout=240):
    procs = [
        subprocess.Popen(a, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for a in procs_args
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, (out[-2000:], err[-3000:])
    return outs


def _params(folder):
    with np.load(folder / "checkpoint.npz") as z:
        return {k: z[k] for k in z.files if k.startswith("a")}


def test_cli_two_processes_train_and_resume_like_one(tmp_path):
    """`eqprop-jax train` on 2 processes equals 1 process, and resumes when both restart."""
    single, multi = tmp_path / "single", tmp_path / "multi"

    def pair(*extra):
        port = str(_free_port())
        return [
            _cli(multi, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                 "--process-id", str(i), *extra)
            for i in range(2)
        ]

    outs = _run_cli([_cli(single, "--epochs", "1"), *pair("--epochs", "1")])
    # Only process 0 writes and logs.
    assert "epoch   1/1" in outs[1][0] and "epoch" not in outs[2][0]
    assert (multi / "checkpoint.npz").exists() and (multi / "metrics.jsonl").exists()
    _assert_same(_params(single), _params(multi))
    # Both processes restart and continue the run (as the single process does).
    _run_cli([_cli(single, "--epochs", "2", "--resume"), *pair("--epochs", "2", "--resume")])
    _assert_same(_params(single), _params(multi))


def _assert_same(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        # float32: the 2-device all-reduce sums the batch mean in another order.
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6)
