r"""Layered networks with forward layers F_n and feedback layers G_n, for target propagation.

A [`LayeredNet`][] holds forward layers F_1..F_N (s_{n-1} -> s_n, s_0 = x, s_N the
logits) and feedback layers G_2..G_N (s_n -> s_{n-1}). No feedback layer maps s_1 to
the input: nothing needs a target there. Blocks, following Ernoult et al. 2022
("Towards Scaling Difference Target Propagation by Learning Backprop Targets"):

- dense: F(s) = φ(W s + b),  G(s) = V ψ(s) + c;
- conv:  F(s) = maxpool2x2(φ(conv3x3_W(s) + b)),
         G(s) = conv3x3_V(ψ(unpool(s; argmax of F's pool))) + c,
  i.e. max-unpool with the forward argmax, then the activation, then the
  transposed convolution. `V` is stored as the kernel of a plain convolution; the
  exact transpose of `conv3x3_W` is the convolution with [`transpose_kernel`][](W).

All methods are per example; batch with `jax.vmap`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._conv import conv2d
from .base import AbstractModel


def _identity(x):
    return x


def _float_dtype(dtype):
    return jnp.dtype(dtype) if dtype is not None else jnp.zeros(()).dtype


def _uniform(key, shape, fan_in, dtype):
    lim = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -lim, lim)


def _conv(x: Array, kernel: Array) -> Array:
    """3x3 'same' cross-correlation of one (C, H, W) image with an (O, I, 3, 3) kernel."""
    # Channels-last, through `conv2d`, whose derivatives XLA:CPU runs fast inside
    # loops (DTP's feedback training) as well as at top level (backprop).
    out = conv2d(jnp.transpose(x, (1, 2, 0)), jnp.transpose(kernel, (2, 3, 1, 0)), 1)
    return jnp.transpose(out, (2, 0, 1))


def transpose_kernel(kernel: Float[Array, "o i kh kw"]) -> Float[Array, "i o kh kw"]:
    """Kernel of the adjoint of a 'same' convolution with an odd kernel.

    ⟨conv_K(x), y⟩ = ⟨x, conv_{Kᵀ}(y)⟩ with Kᵀ[i, o, p, q] = K[o, i, -p, -q] (in/out
    channels swapped, taps flipped). This is what a feedback kernel V is compared
    with ("conv vs conv-transpose").
    """
    return jnp.flip(jnp.swapaxes(kernel, 0, 1), axis=(2, 3))


def max_pool(x: Float[Array, "c h w"]) -> tuple[Float[Array, "c h2 w2"], Int[Array, "c h2 w2"]]:
    """2x2 max-pool with stride 2; also returns the argmax (0..3) within each window."""
    c, h, w = x.shape
    win = x.reshape(c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 2, 4).reshape(c, h // 2, w // 2, 4)
    idx = jnp.argmax(win, axis=-1)
    return jnp.take_along_axis(win, idx[..., None], axis=-1)[..., 0], idx


def max_unpool(s: Float[Array, "c h2 w2"], idx: Int[Array, "c h2 w2"]) -> Float[Array, "c h w"]:
    """Adjoint of [`max_pool`][] at fixed argmax: each value back to its window's argmax."""
    c, h2, w2 = s.shape
    win = jax.nn.one_hot(idx, 4, dtype=s.dtype) * s[..., None]
    return win.reshape(c, h2, w2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(c, 2 * h2, 2 * w2)


class Dense(eqx.Module):
    """Forward dense layer s -> φ(W flatten(s) + b)."""

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"]
    activation: Callable = eqx.field(static=True, default=_identity)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if math.prod(in_shape) != self.weight.shape[1]:
            raise ValueError(
                f"Dense layer with weight {self.weight.shape} cannot take an input of shape "
                f"{in_shape} ({math.prod(in_shape)} features, needs {self.weight.shape[1]})."
            )
        return (self.weight.shape[0],)

    def __call__(self, s: Array) -> tuple[Array, None]:
        return self.activation(self.weight @ s.reshape(-1) + self.bias), None


class DenseFeedback(eqx.Module):
    """Feedback dense layer s -> reshape(V ψ(s) + c, out_shape)."""

    weight: Float[Array, "in out"]
    bias: Float[Array, " in"]
    out_shape_: tuple[int, ...] = eqx.field(static=True)
    activation: Callable = eqx.field(static=True, default=_identity)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if tuple(in_shape) != (self.weight.shape[1],):
            raise ValueError(
                f"DenseFeedback with weight {self.weight.shape} takes inputs of shape "
                f"({self.weight.shape[1]},), got {in_shape}."
            )
        if math.prod(self.out_shape_) != self.weight.shape[0]:
            raise ValueError(
                f"DenseFeedback with weight {self.weight.shape} cannot produce shape "
                f"{self.out_shape_}."
            )
        return tuple(self.out_shape_)

    def __call__(self, s: Array, ctx: Any = None) -> Array:
        return (self.weight @ self.activation(s) + self.bias).reshape(self.out_shape_)


class ConvBlock(eqx.Module):
    """Forward conv block s -> maxpool2x2(φ(conv3x3_W(s) + b)); the context is the argmax."""

    weight: Float[Array, "o i 3 3"]
    bias: Float[Array, " o"]
    activation: Callable = eqx.field(static=True, default=jax.nn.elu)
    pool: bool = eqx.field(static=True, default=True)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        o, i = self.weight.shape[:2]
        if len(in_shape) != 3 or in_shape[0] != i:
            raise ValueError(
                f"ConvBlock with kernel {self.weight.shape} takes (C={i}, H, W) inputs, "
                f"got {in_shape}."
            )
        if self.pool and (in_shape[1] % 2 or in_shape[2] % 2):
            raise ValueError(f"ConvBlock: 2x2 max-pool needs even H and W, got {in_shape}.")
        d = 2 if self.pool else 1
        return (o, in_shape[1] // d, in_shape[2] // d)

    def __call__(self, s: Array) -> tuple[Array, Array | None]:
        h = self.activation(_conv(s, self.weight) + self.bias[:, None, None])
        return max_pool(h) if self.pool else (h, None)


class ConvFeedback(eqx.Module):
    """Feedback conv block s -> conv3x3_V(ψ(unpool(s; argmax))) + c, V in (C_in, C_out, 3, 3)."""

    weight: Float[Array, "i o 3 3"]
    bias: Float[Array, " i"]
    activation: Callable = eqx.field(static=True, default=jax.nn.elu)
    pool: bool = eqx.field(static=True, default=True)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        i, o = self.weight.shape[:2]
        if len(in_shape) != 3 or in_shape[0] != o:
            raise ValueError(
                f"ConvFeedback with kernel {self.weight.shape} takes (C={o}, H, W) inputs, "
                f"got {in_shape}."
            )
        d = 2 if self.pool else 1
        return (i, in_shape[1] * d, in_shape[2] * d)

    def __call__(self, s: Array, ctx: Array | None = None) -> Array:
        u = max_unpool(s, ctx) if self.pool else s
        return _conv(self.activation(u), self.weight) + self.bias[:, None, None]


class LayeredNet(AbstractModel):
    r"""Forward layers F_1..F_N and feedback layers G_2..G_N (Ernoult et al. 2022).

    `forward[n-1]` is F_n: s_{n-1} -> s_n and `feedback[n-2]` is G_n: s_n -> s_{n-1}
    (so `len(feedback) == len(forward) - 1`). Each forward layer returns
    `(s_n, ctx_n)`; `ctx_n` (the pooling argmax of a conv block, else None) is passed to
    G_n, which is how max-unpool reuses the forward argmax. s_N are the logits of a
    softmax cross-entropy loss.

    Construct directly or with [`LayeredNet.mlp`][], [`LayeredNet.lenet`][],
    [`LayeredNet.simple_vgg`][]. The constructor checks that every G_n maps the shape of
    s_n to the shape of s_{n-1}.
    """

    forward: tuple[Any, ...]
    feedback: tuple[Any, ...]
    input_shape: tuple[int, ...] = eqx.field(static=True)

    def __check_init__(self):
        if len(self.forward) < 1:
            raise ValueError("LayeredNet needs at least one forward layer.")
        if len(self.feedback) != len(self.forward) - 1:
            raise ValueError(
                f"LayeredNet: {len(self.forward)} forward layers need "
                f"{len(self.forward) - 1} feedback layers (G_2..G_N), got {len(self.feedback)}."
            )
        shapes = self.shapes
        for n, g in enumerate(self.feedback, start=2):
            try:
                got = g.out_shape(shapes[n])
            except ValueError as e:
                raise ValueError(
                    f"LayeredNet: feedback layer G_{n} does not fit s_{n} of shape {shapes[n]}: {e}"
                ) from None
            if tuple(got) != tuple(shapes[n - 1]):
                raise ValueError(
                    f"LayeredNet: feedback layer G_{n} maps s_{n} {shapes[n]} to {got}, but "
                    f"s_{n - 1} (the input of forward layer F_{n}) has shape {shapes[n - 1]}."
                )

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Shapes of s_0 = x, s_1, ..., s_N for one example."""
        out = [tuple(self.input_shape)]
        for n, f in enumerate(self.forward, start=1):
            try:
                out.append(tuple(f.out_shape(out[-1])))
            except ValueError as e:
                raise ValueError(f"LayeredNet: forward layer F_{n}: {e}") from None
        return out

    @property
    def num_layers(self) -> int:
        return len(self.forward)

    @property
    def n_outputs(self) -> int:
        """Number of classes (the size of the logits s_N)."""
        return self.shapes[-1][0]

    def expected_input(self) -> tuple[tuple[int, ...], str]:
        return tuple(self.input_shape), ""

    def activations(self, x: Array) -> tuple[list[Array], list[Any]]:
        """Forward pass of one example: ([s_0, ..., s_N], [ctx_1, ..., ctx_N])."""
        states, ctxs = [x], []
        for f in self.forward:
            s, ctx = f(states[-1])
            states.append(s)
            ctxs.append(ctx)
        return states, ctxs

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        return self.activations(x)[0][-1]

    def propagate(self, n: int, s: Array, ctx: Any) -> Array:
        """G_n(s) for n = 2..N (1-based, as in the paper)."""
        return self.feedback[n - 2](s, ctx)

    # constructors ---------------------------------------------------------------

    @classmethod
    def mlp(
        cls,
        sizes: Sequence[int],
        *,
        key: PRNGKeyArray,
        activation: Callable = jnp.tanh,
        feedback_activation: Callable = _identity,
        dtype=None,
    ) -> LayeredNet:
        """MLP sizes[0] -> ... -> sizes[-1]; hidden layers use `activation`, the last is linear."""
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"LayeredNet.mlp: need at least two positive sizes, got {sizes}.")
        dtype = _float_dtype(dtype)
        n = len(sizes) - 1
        keys = jax.random.split(key, 2 * n)
        fwd, fb = [], []
        for i in range(n):
            act = activation if i < n - 1 else _identity
            kw, kb = jax.random.split(keys[i])
            w = _uniform(kw, (sizes[i + 1], sizes[i]), sizes[i], dtype)
            b = _uniform(kb, (sizes[i + 1],), sizes[i], dtype)
            fwd.append(Dense(w, b, act))
            if i > 0:
                v = _uniform(keys[n + i], (sizes[i], sizes[i + 1]), sizes[i + 1], dtype)
                fb.append(
                    DenseFeedback(
                        v, jnp.zeros((sizes[i],), dtype), (sizes[i],), feedback_activation
                    )
                )
        return cls(tuple(fwd), tuple(fb), (sizes[0],))

    @classmethod
    def convnet(
        cls,
        input_shape: tuple[int, int, int],
        channels: Sequence[int],
        hidden: Sequence[int],
        n_outputs: int,
        *,
        key: PRNGKeyArray,
        activation: Callable = jax.nn.elu,
        dtype=None,
    ) -> LayeredNet:
        """Conv blocks (conv3x3 -> act -> maxpool) of `channels`, dense `hidden`, then logits."""
        dtype = _float_dtype(dtype)
        nconv, nd = len(channels), len(hidden) + 1
        keys = jax.random.split(key, 2 * (nconv + nd))
        fwd, fb = [], []
        shape = tuple(input_shape)
        for i, c in enumerate(channels):
            cin = shape[0]
            kw, kb = jax.random.split(keys[i])
            fan = cin * 9
            fwd.append(
                ConvBlock(
                    _uniform(kw, (c, cin, 3, 3), fan, dtype),
                    _uniform(kb, (c,), fan, dtype),
                    activation,
                )
            )
            if i > 0:
                v = _uniform(keys[nconv + nd + i], (cin, c, 3, 3), c * 9, dtype)
                fb.append(ConvFeedback(v, jnp.zeros((cin,), dtype), activation))
            shape = fwd[-1].out_shape(shape)
        sizes = [math.prod(shape), *[int(h) for h in hidden], int(n_outputs)]
        for j in range(nd):
            i = nconv + j
            act = activation if j < nd - 1 else _identity
            kw, kb = jax.random.split(keys[i])
            fwd.append(
                Dense(
                    _uniform(kw, (sizes[j + 1], sizes[j]), sizes[j], dtype),
                    _uniform(kb, (sizes[j + 1],), sizes[j], dtype),
                    act,
                )
            )
            if i > 0:
                prev = shape if j == 0 else (sizes[j],)
                # A dense layer after a conv block: G un-flattens and applies no activation to
                # the logits/hidden units, mirroring F's linear map.
                v = _uniform(keys[nconv + nd + i], (sizes[j], sizes[j + 1]), sizes[j + 1], dtype)
                fb.append(DenseFeedback(v, jnp.zeros((sizes[j],), dtype), tuple(prev)))
        return cls(tuple(fwd), tuple(fb), tuple(input_shape))

    @classmethod
    def lenet(
        cls,
        *,
        key: PRNGKeyArray,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        channels: Sequence[int] = (16, 32),
        hidden: Sequence[int] = (128,),
        n_outputs: int = 10,
        dtype=None,
    ) -> LayeredNet:
        """LeNet-sized net for MNIST: 2 conv blocks (16, 32 channels), dense 128, 10 logits."""
        return cls.convnet(input_shape, channels, hidden, n_outputs, key=key, dtype=dtype)

    @classmethod
    def simple_vgg(
        cls,
        *,
        key: PRNGKeyArray,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        channels: Sequence[int] = (128, 128, 256, 256, 512),
        n_outputs: int = 10,
        dtype=None,
    ) -> LayeredNet:
        """The paper's SimpleVGG (CIFAR-10): 5 conv3x3-ELU-maxpool blocks, linear 512 -> 10."""
        return cls.convnet(input_shape, channels, (), n_outputs, key=key, dtype=dtype)


__all__ = [
    "ConvBlock",
    "ConvFeedback",
    "Dense",
    "DenseFeedback",
    "LayeredNet",
    "max_pool",
    "max_unpool",
    "transpose_kernel",
]
