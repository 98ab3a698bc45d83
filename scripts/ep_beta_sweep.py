"""EP's relative error against the implicit (RBP) gradient, over β, variant and N.

A small HopfieldMLP (6-5-4-3, prototypical, tanh, async, Glorot x0.7, 3 examples) in
float64 with states converged to 1e-13, the net of tests/test_ep.py. Prints a
markdown table: one-sided and centered errors against β (slopes ≈ 1 and ≈ 2) and
holomorphic EP against β and N (geometric in N inside the analytic radius).

    python scripts/ep_beta_sweep.py
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import eqprop_jax as eqp  # noqa: E402

TIGHT = eqp.Picard(tol=1e-13, max_steps=5000)


@eqx.filter_jit
def _run(estimator, model, x, y):
    return estimator(model, x, y)[1]


def _rel(a, b):
    a = jnp.concatenate([jnp.ravel(v) for v in jax.tree_util.tree_leaves(a)])
    b = jnp.concatenate([jnp.ravel(v) for v in jax.tree_util.tree_leaves(b)])
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv=None):
    model = eqp.HopfieldMLP(
        (6, 5, 4, 3),
        key=jax.random.PRNGKey(0),
        dynamics="prototypical",
        activation="tanh",
        update="async",
        weight_scale=0.7,
    )
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    x, y = jax.random.uniform(kx, (3, 6)), jax.random.randint(ky, (3,), 0, 3)
    exact = eqp.Implicit(eqp.BiCGStab(200), tol=1e-13)
    ref = _run(eqp.RecurrentBackprop(exact, TIGHT), model, x, y)

    def err(beta, variant, n=4):
        est = eqp.EquilibriumProp(
            jnp.asarray(beta), variant=variant, n_points=n, free_solver=TIGHT, nudged_solver=TIGHT
        )
        return _rel(_run(est, model, x, y), ref)

    betas = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    cols = [("positive", 0), ("negative", 0), ("centered", 0)] + [
        ("holomorphic", n) for n in (2, 3, 4, 6, 8)
    ]
    head = ["β"] + [v if not n else f"holo N={n}" for v, n in cols]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    table = {c: [] for c in cols}
    for b in betas:
        row = []
        for v, n in cols:
            e = err(b, v, max(n, 2))
            table[(v, n)].append(e)
            row.append(f"{e:.1e}")
        print(f"| {b:g} | " + " | ".join(row) + " |", flush=True)
    for v in ("positive", "negative", "centered"):
        slope = np.polyfit(np.log(betas[:4]), np.log(table[(v, 0)][:4]), 1)[0]
        print(f"log-log slope of {v} over β = {betas[0]}..{betas[3]}: {slope:.2f}")


if __name__ == "__main__":
    main()
