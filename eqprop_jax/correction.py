r"""Fixed-point correction: losses on the intermediate iterates of a DEQ's solve.

Bai, Koltun & Kolter 2022, "Deep equilibrium optical flow estimation", CVPR.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax
from jaxtyping import Array, Float, Int, PyTree

from . import _checks


def correction_indices(steps: Int[Array, ""], n_traced: int, n_states: int) -> Int[Array, " m"]:
    """The 0-based rows of the iterate trace that the correction loss reads: the
    iterates z_{k_j}, k_j = ⌈j n / m⌉ (j = 1, …, m), evenly spaced over the
    n = min(steps, K) recorded updates and ending at the last one (row 0, which holds
    z0, when the solve took no step)."""
    n = jnp.minimum(steps, n_traced)
    j = jnp.arange(1, n_states + 1)
    k = -((-j * n) // n_states)  # ⌈j n / m⌉ in integers
    return jnp.clip(k - 1, 0, n_traced - 1)


def fixed_point_correction(
    f: Callable[[PyTree, Any], PyTree],
    iterates: PyTree[Array],
    steps: Int[Array, ""],
    args: PyTree,
    loss: Callable[[PyTree], Float[Array, ""]],
    *,
    n_states: int = 3,
    gamma: float = 0.8,
    k: int = 1,
    damping: float = 1.0,
) -> Float[Array, ""]:
    r"""Fixed-point correction loss (Bai, Koltun & Kolter 2022, "Deep equilibrium
    optical flow estimation", CVPR): losses on m iterates of the forward solve,

        L = Σ_{j=1}^{m} γ^{m-j} ℓ(ẑ_j),   ẑ_j = φ^k(sg(z_{k_j})),
        φ(h) = λ f(h, x) + (1 - λ) h,

    where z_{k_1}, …, z_{k_m} are m iterates evenly spaced over the solve (k_j =
    ⌈j n / m⌉ of its n updates, so the last one is the solve's last iterate), sg
    stops the gradient, and φ^k is k damped steps of f. The gradient of each term
    is the paper's: an unrolled phantom gradient (Geng et al. 2021) through the k
    steps from the detached iterate, so that dℓ(ẑ_j)/dθ = ∂ℓ/∂ẑ · dφ^k/dθ with
    z_{k_j} held fixed (k = 1, λ = 1: Jacobian-free backprop at z_{k_j}, the
    default). The weights γ^{m-j} (γ < 1) stress the later states, as in RAFT's
    sequence loss. The paper adds L to the loss of the equilibrium itself; its
    iterates are typically far from z* early on, so the correction trains f to
    make progress from where the solver actually is.

    The iterates come from the solve: `fixed_point(..., trace=Trace(K,
    iterates=True))` returns `sol.iterates` and `sol.stats.steps`; only the first
    K updates are recorded, so choose K >= the steps the solve takes (if it takes
    more, the states are spread over the first K).

    ```python
    sol = eqp.fixed_point(f, z0, x, solver=solver, trace=eqp.Trace(30, iterates=True))
    total = task(sol.value) + eqp.fixed_point_correction(
        f, sol.iterates, sol.stats.steps, x, task, n_states=3, gamma=0.8)
    ```

    One example at a time: `jax.vmap` it over a batch (per-example step counts).

    Args:
        f: the map, `f(z, args) -> z`.
        iterates: the recorded iterates, a pytree with a leading axis K (`sol.iterates`).
        steps: the solve's number of updates (`sol.stats.steps`).
        args: f's other input (differentiated like f's weights).
        loss: ℓ, from a state to a scalar.
        n_states: m, the number of iterates the loss reads.
        gamma: γ in (0, 1].
        k: phantom steps per state (>= 1).
        damping: λ in (0, 1].
    """
    who = "fixed_point_correction"
    _checks.positive_int(who, "n_states", n_states)
    _checks.positive_int(who, "k", k)
    for name, value in (("gamma", gamma), ("damping", damping)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ValueError(f"{who}: `{name}` must be a number in (0, 1], got {value!r}.")
    leaves = jtu.tree_leaves(iterates)
    if not leaves or jnp.ndim(leaves[0]) < 1:
        raise ValueError(
            f"{who}: `iterates` must have a leading trace axis (sol.iterates from "
            "fixed_point(..., trace=Trace(K, iterates=True)))."
        )
    n_traced = leaves[0].shape[0]
    rows = correction_indices(jnp.asarray(steps), n_traced, n_states)
    states = jtu.tree_map(lambda x: lax.stop_gradient(x[rows]), iterates)
    weights = gamma ** jnp.arange(n_states - 1, -1, -1, dtype=jnp.result_type(float))

    def term(h):
        for _ in range(k):
            fh = f(h, args)
            h = jtu.tree_map(lambda a, b: damping * a + (1 - damping) * b, fh, h)
        return loss(h)

    per_state = jax.vmap(term)(states)
    return jnp.sum(weights.astype(per_state.dtype) * per_state)
