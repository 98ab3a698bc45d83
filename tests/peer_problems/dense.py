"""Dense references for the derivatives of a fixed point: J is formed column by column
and the implicit function theorem is solved by LU (exact to the dtype)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def jacobian(fn, z):
    """∂fn/∂z at a flat z, as a matrix (complex-linear for complex z)."""
    cols = jax.vmap(lambda e: jax.jvp(fn, (z,), (e,))[1])(jnp.eye(z.size, dtype=z.dtype))
    return cols.T


def _pieces(f, z_star, args, t_args):
    flat, unravel = ravel_pytree(z_star)
    fz = lambda zf: ravel_pytree(f(unravel(zf), args))[0]
    _, b = jax.jvp(lambda a: ravel_pytree(f(z_star, a))[0], (args,), (t_args,))
    return flat, unravel, jacobian(fz, flat), b


def tangent(f, z_star, args, t_args):
    """dz* = (I - ∂f/∂z)⁻¹ (∂f/∂θ · t) at z*."""
    flat, unravel, jac, b = _pieces(f, z_star, args, t_args)
    return unravel(jnp.linalg.solve(jnp.eye(flat.size, dtype=flat.dtype) - jac, b))


def neumann_tangent(f, z_star, args, t_args, k):
    """Σ_{i=0}^{k} J^i (∂f/∂θ · t): the truncated series Neumann(k) computes."""
    _, unravel, jac, b = _pieces(f, z_star, args, t_args)
    term, total = b, b
    for _ in range(k):
        term = jac @ term
        total = total + term
    return unravel(total)


def cotangent(f, z_star, args, w):
    """The vector-Jacobian product wᵀ dz*/dθ, by transposing the dense tangent map."""
    return jax.linear_transpose(lambda t: tangent(f, z_star, args, t), args)(w)[0]
