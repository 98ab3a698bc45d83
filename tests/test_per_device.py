"""`train.PerDevice`: shard_map'ed estimators equal the one-device ones (8 host devices)."""

import subprocess
import sys
import textwrap

from helpers import subprocess_env

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, equinox as eqx
    jax.config.update("jax_enable_x64", True)
    import eqprop_jax as eqp
    from eqprop_jax.train import PerDevice, batch_mesh
    assert jax.device_count() == 8, jax.devices()
    model = eqp.HopfieldMLP((12, 10, 4), key=jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 12))
    y = jnp.arange(16) % 4
    mesh = batch_mesh()
    ests = [
        eqp.EquilibriumProp(beta=0.2, variant="centered", free_steps=6, nudged_steps=3),
        eqp.EquilibriumProp(beta=0.2, random_sign=True, free_steps=6, nudged_steps=3),
        eqp.RecurrentBackprop(),  # tolerance-based solves: compacted per device
    ]
    key = jax.random.PRNGKey(5)
    for est in ests:
        run = eqx.filter_jit(lambda e, m, x, y, k: e(m, x, y, key=k))
        l1, g1, a1 = run(est, model, x, y, key)
        l8, g8, a8 = run(PerDevice(est, mesh), model, x, y, key)
        np.testing.assert_allclose(l8, l1, rtol=1e-12)
        for a, b in zip(jax.tree_util.tree_leaves(g8), jax.tree_util.tree_leaves(g1)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
        # Per-example aux comes back in batch order; per-batch values as they were.
        np.testing.assert_array_equal(a8["result"], a1["result"])
        np.testing.assert_allclose(a8["predictions"], a1["predictions"], rtol=1e-10)
        np.testing.assert_array_equal(a8["stats"].steps, a1["stats"].steps)
    try:
        PerDevice(ests[0], mesh)(model, x[:12], y[:12])
    except ValueError as e:
        assert "divisible by 8" in str(e), e
    else:
        raise AssertionError("an uneven batch was accepted")
    print("PER-DEVICE-OK")
    """
)


def test_per_device_equals_one_device():
    env = subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "PER-DEVICE-OK" in out.stdout
