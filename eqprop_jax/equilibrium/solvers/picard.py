"""Damped fixed-point (Picard / Krasnosel'skii-Mann) iteration."""

from __future__ import annotations

from jaxtyping import Array, PyTree

from .base import AbstractSolver, FlatFn


class Picard(AbstractSolver):
    r"""Damped iteration z_{k+1} = (1 - α) z_k + α f(z_k).

    With α = 1 this is plain iteration: it converges linearly, at the rate of the
    spectral radius of ∂f/∂z, whenever f is a contraction. For energy models whose
    map is a gradient step s <- s - ε ∂E/∂s it is gradient descent on E.

    Args:
        damping: α in (0, 1].
        tol, rtol, max_steps, divergence: see [`eqprop_jax.AbstractSolver`][].
    """

    damping: float = 1.0

    def __check_init__(self):
        super().__check_init__()
        if isinstance(self.damping, int | float) and not 0 < self.damping <= 1:
            raise ValueError(f"`damping` must lie in (0, 1], got {self.damping}.")

    def init(self, z: Array, fz: Array) -> PyTree:
        return None

    def update(self, fn: FlatFn, z: Array, fz: Array, state: PyTree) -> tuple[Array, PyTree]:
        if self.damping == 1:
            return fz, state
        return z + self.damping * (fz - z), state
