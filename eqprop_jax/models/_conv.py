r"""A stride-1 2-D convolution whose derivatives XLA:CPU runs fast inside loops.

`lax.conv_general_dilated`'s own derivatives are convolutions too: the input
gradient a transposed convolution, the kernel gradient a convolution whose window is
the whole image. Inside `while` loops (relaxations, DTP's feedback training)
XLA:CPU runs those through a generic emitter that is 10-1000x slower than its
forward convolution (benchmarks/results/ep_conv.md). [`conv2d`][] keeps the forward
convolution (channels-last, the layout of XLA:CPU's fast path) and defines its JVP
as one matrix product of the k² shifted copies of the input (im2col) with the
kernel; autodiff transposes that into matrix products: the kernel gradient is one
(k²·C_in × B·H·W) @ (B·H·W × C_out) product, the batch folded into the contraction
when the call is `vmap`ped, and the input gradient one product followed by k²
shifted adds.

    conv2d(x, w, p)[y, x, o] = Σ_{i,a,b} pad_p(x)[y+a, x+b, i] w[a, b, i, o]

Per example; batch with `jax.vmap`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv2d(
    x: Float[Array, "H W I"], w: Float[Array, "kh kw I O"], padding: int
) -> Float[Array, "H2 W2 O"]:
    """Cross-correlation of one channels-last image with an HWIO kernel, stride 1,
    `padding` zeros on each side (an int, static)."""
    if w.shape[0] > x.shape[0] or w.shape[1] > x.shape[1]:
        # A kernel wider than the map (SimpleVGG's last block: 3x3 on 2x2): XLA:CPU
        # rewrites that convolution into a slow form (measured 4x the whole rest of a
        # SimpleVGG backprop step); the per-tap products are fast.
        return _taps(x, w, padding)
    return lax.conv_general_dilated(
        x[None],
        w,
        window_strides=(1, 1),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )[0]


def _taps(x: Array, w: Array, padding: int) -> Array:
    """`conv2d` as one product of the k² shifted copies of `x` (im2col) with the
    kernel: linear in `x` and in `w`, and transposed by autodiff into products and
    shifted adds (measured faster, and quicker to compile, than k² separate products
    for SimpleVGG's backprop and L-DRL steps)."""
    kh, kw = w.shape[:2]
    h2 = x.shape[0] + 2 * padding - kh + 1
    w2 = x.shape[1] + 2 * padding - kw + 1
    xp = jnp.pad(x, ((padding, padding), (padding, padding), (0, 0)))
    cols = jnp.stack([xp[a : a + h2, b : b + w2] for a in range(kh) for b in range(kw)], 2)
    return jnp.einsum("hwki,kio->hwo", cols, w.reshape(kh * kw, *w.shape[2:]))


def _conv2d_jvp(padding, primals, tangents):
    x, w = primals
    dx, dw = tangents
    out = conv2d(x, w, padding)
    # Symbolic zeros: no work for an argument that is not differentiated (DTP's
    # feedback training differentiates the kernel only).
    tangent = jnp.zeros_like(out)
    if not isinstance(dx, SymbolicZero):
        tangent = _taps(dx, w, padding)
    if not isinstance(dw, SymbolicZero):
        t = _taps(x, dw, padding)
        tangent = t if isinstance(dx, SymbolicZero) else tangent + t
    return out, tangent


conv2d.defjvp(_conv2d_jvp, symbolic_zeros=True)
