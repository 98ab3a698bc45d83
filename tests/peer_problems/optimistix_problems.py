"""optimistix's fixed-point test problems (`tests/helpers.py`, `fixed_point_fn_init_args`),
written anew: the same maps, initial states and arguments, as pure functions.

All are written to run under `jax_numpy_dtype_promotion="strict"` (optimistix's
test setting) and in float64 or complex128. Where the fixed point has a closed form,
`exact` gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree


@dataclass(frozen=True)
class Problem:
    name: str
    f: Any  # f(z, args) -> z
    z0: Any
    args: Any
    exact: Any = None  # dtype -> the fixed point, where it has a closed form

    def cast(self, dtype):
        """(z0, args) in `dtype` (optimistix's complex128 runs cast both)."""
        to = lambda x: jnp.asarray(x).astype(dtype)
        return jtu.tree_map(to, self.z0), jtu.tree_map(to, self.args)


# optimistix's `ones_pytree`: a pytree state of 28 entries, all 0.5.
ONES = ({"a": 0.5 * jnp.ones((3, 2, 4))}, 0.5 * jnp.ones(4))
SIZE = 28
# optimistix's `ones_robertson`: a 3-entry pytree state.
ONES_ROBERTSON = (jnp.ones(2), {"b": jnp.array(1.0)})


def _flat(f):
    """f on the flattened state, returned in the state's structure."""

    def g(tree, args):
        y, unravel = ravel_pytree(tree)
        return unravel(f(y, args))

    return g


def cos_map(tree, const):
    return jtu.tree_map(lambda x: jnp.cos(const * x), tree)


def exp_map(tree, const):
    return jtu.tree_map(lambda x: jnp.exp(-const * x), tree)


def _nn(y, weights):
    # optimistix's `_nn`: 0.1 · MLP(y), one hidden layer of width 8, softplus.
    w1, b1, w2, b2 = weights
    return 0.1 * (w2 @ jax.nn.softplus(w1 @ y + b1) + b2)


def _nn_weights():
    mlp = eqx.nn.MLP(SIZE, SIZE, 8, 1, activation=jax.nn.softplus, key=jax.random.PRNGKey(42))
    (l1, l2) = mlp.layers
    return (l1.weight, l1.bias, l2.weight, l2.bias)


GRID = jnp.linspace(-1.0, 1.0, 100)


def heat_map(y, const):
    """One Crank–Nicolson step (dt = 1) of optimistix's nonlinear heat problem,
    y = const · (y0 + ½ ((1 - y) L(y) + (1 - y0) L(y0))), y0 = x².

    optimistix's `_laplacian` returns its input unchanged, so L(y) = y in the map its
    suite solves, and that map is the one ported here. Its fixed point (const = 1)
    solves y² + y - (3 y0 - y0²) = 0 elementwise (see `heat_exact`).
    """
    y0 = (GRID**2).astype(y.dtype)
    return const * (y0 + 0.5 * ((1 - y) * y + (1 - y0) * y0))


def heat_exact(dtype):
    y0 = GRID**2
    return ((-1 + jnp.sqrt(1 + 4 * (3 * y0 - y0**2))) / 2).astype(dtype)


DT_LINEAR = 1 / 16


def midpoint_y_linear(y, matrix):
    # Implicit midpoint step of y' = M y from y0 = 0, in y-space: y = y0 + dt M (y0 + y)/2.
    return DT_LINEAR * (matrix @ (0.5 * y))


def midpoint_f_linear(y, matrix):
    # ... in f-space: f = M (y0 + dt f).
    return matrix @ (DT_LINEAR * y)


def midpoint_k_linear(y, matrix):
    # ... in k-space: k = dt M (y0 + k).
    return DT_LINEAR * (matrix @ y)


DT_ROBERTSON = 1e-8


def robertson(y, k):
    k1, k2, k3 = k
    return jnp.stack(
        [
            -k1 * y[0] + k3 * y[1] * y[2],
            k1 * y[0] - k2 * y[1] ** 2 - k3 * y[1] * y[2],
            k2 * y[1] ** 2,
        ]
    )


def midpoint_y_robertson(y, k):
    return DT_ROBERTSON * robertson(0.5 * y, k)


def midpoint_f_robertson(y, k):
    return robertson(DT_ROBERTSON * y, k)


def midpoint_k_robertson(y, k):
    return DT_ROBERTSON * robertson(y, k)


MATRIX = jax.random.normal(jax.random.PRNGKey(19), (SIZE, SIZE))
ROBERTSON_ARGS = (jnp.array(0.04), jnp.array(3e7), jnp.array(1e4))


def _zero(tree):
    return lambda dtype: jtu.tree_map(lambda x: jnp.zeros(jnp.shape(x), dtype), tree)


def _const(value, tree):
    return lambda dtype: jtu.tree_map(lambda x: jnp.full(jnp.shape(x), value, dtype), tree)


# The Dottie number (cos z = z) and the omega constant (exp(-z) = z).
DOTTIE = 0.7390851332151607
OMEGA = 0.5671432904097838

PROBLEMS = [
    Problem("cos", cos_map, ONES, jnp.array(1.0), _const(DOTTIE, ONES)),
    Problem("exp", exp_map, ONES, jnp.array(1.0), _const(OMEGA, ONES)),
    Problem("nn", _flat(_nn), ONES, _nn_weights()),
    Problem("heat", heat_map, jnp.ones(100), jnp.array(1.0), heat_exact),
    Problem("midpoint_y_linear", _flat(midpoint_y_linear), ONES, MATRIX, _zero(ONES)),
    Problem("midpoint_f_linear", _flat(midpoint_f_linear), ONES, MATRIX, _zero(ONES)),
    Problem("midpoint_k_linear", _flat(midpoint_k_linear), ONES, MATRIX, _zero(ONES)),
    Problem(
        "midpoint_y_robertson", _flat(midpoint_y_robertson), ONES_ROBERTSON, ROBERTSON_ARGS,
        _zero(ONES_ROBERTSON),
    ),
    Problem(
        "midpoint_f_robertson", _flat(midpoint_f_robertson), ONES_ROBERTSON, ROBERTSON_ARGS,
        _zero(ONES_ROBERTSON),
    ),
    Problem(
        "midpoint_k_robertson", _flat(midpoint_k_robertson), ONES_ROBERTSON, ROBERTSON_ARGS,
        _zero(ONES_ROBERTSON),
    ),
]
IDS = [p.name for p in PROBLEMS]
