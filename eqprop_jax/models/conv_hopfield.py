"""Convolutional Hopfield networks trained by EP (Ernoult et al. 2019, Laborieux et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from ._checks import check_classifier_input
from .activations import get_activation
from .energy import EnergyModel, State


def _conv(s: Array, w: Array, padding: int) -> Array:
    # One example (C, H, W), computed channels-last: XLA:CPU runs channels-first
    # convolutions inside while loops (our relaxations) through a slow path, up to
    # ~50x slower (jax-ml/jax#12868); the transposes cost little beside the conv.
    out = lax.conv_general_dilated(
        jnp.transpose(s, (1, 2, 0))[None],
        w,
        window_strides=(1, 1),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "OIHW", "NHWC"),
    )
    return jnp.transpose(out[0], (2, 0, 1))


def _max_pool(s: Array, size: int) -> Array:
    if size == 1:
        return s
    return lax.reduce_window(
        s, -jnp.inf, lax.max, (1, size, size), (1, size, size), padding="VALID"
    )


class ConvHopfield(EnergyModel):
    r"""Convolutional EP in the discrete-time prototypical form (Ernoult et al. 2019).

    Layers s_1..s_L are (C, H, W) feature maps, s_0 = x, and (cost `"mse"`) an output
    layer s_{L+1} of `n_out` units. With P the max-pool and ⋆ the convolution,

        Φ(x, s) = Σ_l ⟨s_{l+1}, P(W_l ⋆ s_l + b_l)⟩ + ⟨s_{L+1}, W_fc vec(s_L) + b_fc⟩,

    E = -Φ, and the dynamics are s_l ← σ(∂(Φ - βC)/∂s_l). Going up, a layer sees the
    pooled convolution of the layer below; coming down it sees the transposed
    convolution of the unpooled (argmax-routed) layer above. Both come from
    `jax.grad` of Φ, as in the authors' code (Laborieux et al. 2021), so no
    transposed operator is hand-written.

    Costs: `"mse"` uses C = ½‖s_{L+1} - onehot(y)‖² with the output inside the
    dynamics; `"ce"` takes the output layer out of the dynamics (Laborieux et al.
    2021): C = CE(softmax(W_fc vec(s_L) + b_fc), y), which nudges s_L directly.

    Updates: `"sync"` moves every layer from the previous state; `"async"` first
    updates the layers at even positions of the state tuple (s_1, s_3, ...), then
    those at odd positions (s_2, s_4, ...) from the fresh ones. Layers of one parity
    do not interact, so each half-step is an exact block update (Scellier et al.
    2023 use it for the DCHN).

    States are tuples of per-example arrays; every method acts on one example and
    estimators `vmap` it. Real β only: max-pool has no complex ordering, so
    holomorphic EP is not available for this model.
    """

    conv_weights: tuple[Array, ...]
    conv_biases: tuple[Array, ...]
    fc_weight: Array
    fc_bias: Array
    in_shape: tuple[int, int, int] = eqx.field(static=True)
    paddings: tuple[int, ...] = eqx.field(static=True)
    pools: tuple[int, ...] = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    cost_type: Literal["mse", "ce"] = eqx.field(static=True)
    update: Literal["sync", "async"] = eqx.field(static=True)

    def __init__(
        self,
        in_shape: Sequence[int],
        channels: Sequence[int],
        kernel_sizes: Sequence[int] | int,
        n_out: int,
        *,
        paddings: Sequence[int] | int = 0,
        pools: Sequence[int] | int = 2,
        activation: str = "hard_sigmoid",
        cost: Literal["mse", "ce"] = "mse",
        update: Literal["sync", "async"] = "sync",
        dtype: Any = None,
        key: PRNGKeyArray,
    ):
        """PyTorch-style uniform(±1/√fan_in) initialisation, as in the authors' code."""
        in_shape = tuple(int(d) for d in in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"ConvHopfield: in_shape must be (C, H, W), got {in_shape}.")
        n = len(channels)
        if n == 0:
            raise ValueError("ConvHopfield: give at least one conv layer in `channels`.")
        per_layer = lambda v, name: (int(v),) * n if np.ndim(v) == 0 else tuple(int(a) for a in v)
        kernel_sizes = per_layer(kernel_sizes, "kernel_sizes")
        paddings = per_layer(paddings, "paddings")
        pools = per_layer(pools, "pools")
        for name, v in (("kernel_sizes", kernel_sizes), ("paddings", paddings), ("pools", pools)):
            if len(v) != n:
                raise ValueError(f"ConvHopfield: {name} has {len(v)} entries for {n} conv layers.")
        if cost not in ("mse", "ce"):
            raise ValueError(f"ConvHopfield: cost must be 'mse' or 'ce', got {cost!r}.")
        if update not in ("sync", "async"):
            raise ValueError(f"ConvHopfield: update must be 'sync' or 'async', got {update!r}.")
        get_activation(activation)
        dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"ConvHopfield: `dtype` must be a real floating dtype, got {dtype}.")
        keys = jax.random.split(key, 2 * n + 2)
        ws, bs = [], []
        c, h, w = in_shape
        for i, (c_out, k, p, q) in enumerate(
            zip(channels, kernel_sizes, paddings, pools, strict=True)
        ):
            bound = 1.0 / np.sqrt(c * k * k)
            ws.append(jax.random.uniform(keys[2 * i], (c_out, c, k, k), dtype, -bound, bound))
            bs.append(jax.random.uniform(keys[2 * i + 1], (c_out,), dtype, -bound, bound))
            h, w = h + 2 * p - k + 1, w + 2 * p - k + 1
            if h < q or w < q:
                raise ValueError(
                    f"ConvHopfield: conv layer {i} leaves a {h}x{w} map, too small for "
                    f"{q}x{q} pooling; use a larger input or smaller kernels."
                )
            c, h, w = c_out, h // q, w // q
        fan_in = c * h * w
        bound = 1.0 / np.sqrt(fan_in)
        self.conv_weights = tuple(ws)
        self.conv_biases = tuple(bs)
        self.fc_weight = jax.random.uniform(keys[-2], (n_out, fan_in), dtype, -bound, bound)
        self.fc_bias = jax.random.uniform(keys[-1], (n_out,), dtype, -bound, bound)
        self.in_shape = in_shape
        self.paddings = paddings
        self.pools = pools
        self.activation = activation
        self.cost_type = cost
        self.update = update

    # Constructors for the papers' networks ------------------------------------------

    @classmethod
    def ernoult2019(cls, *, key: PRNGKeyArray, update="sync", dtype=None) -> ConvHopfield:
        """P-conv of Ernoult et al. 2019 on MNIST (1x28x28): 5x5 convs 64-32, each with
        2x2 max-pool, fc 512→10, hard sigmoid, MSE (paper: T 200/10, β 0.4, ~1% error)."""
        return cls(
            (1, 28, 28),
            (64, 32),
            5,
            10,
            paddings=0,
            pools=2,
            activation="hard_sigmoid",
            cost="mse",
            update=update,
            dtype=dtype,
            key=key,
        )

    @classmethod
    def dchn(
        cls, *, key: PRNGKeyArray, n_out: int = 10, cost="mse", update="async", dtype=None
    ) -> ConvHopfield:
        """The deep convolutional Hopfield network of Laborieux et al. 2021 / Scellier et
        al. 2023 on CIFAR (3x32x32): 3x3 convs 128-256-512-512 (padding 1), 2x2 max-pool
        after each, fc 2048→`n_out`, clip(x/2, 0, 1) (paper: T 250/30 sync or 60/15
        async, β 0.5 MSE / 1.0 CE)."""
        return cls(
            (3, 32, 32),
            (128, 256, 512, 512),
            3,
            n_out,
            paddings=1,
            pools=2,
            activation="clip_half",
            cost=cost,
            update=update,
            dtype=dtype,
            key=key,
        )

    # Shapes and checks ---------------------------------------------------------------

    @property
    def n_out(self) -> int:
        return self.fc_weight.shape[0]

    @property
    def n_outputs(self) -> int:
        """Number of classes (the name every model shares; estimators check labels with it)."""
        return self.n_out

    @property
    def layer_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of the state's layers (the output layer last when the cost is MSE)."""
        shapes = []
        _, h, w = self.in_shape
        for wt, p, q in zip(self.conv_weights, self.paddings, self.pools, strict=True):
            c_out, _, k, _ = wt.shape
            h, w = (h + 2 * p - k + 1) // q, (w + 2 * p - k + 1) // q
            shapes.append((c_out, h, w))
        if self.cost_type == "mse":
            shapes.append((self.n_out,))
        return tuple(shapes)

    def _check_x(self, x: Array) -> None:
        if x.shape != self.in_shape:
            raise ValueError(
                f"ConvHopfield: expected one input of shape {self.in_shape} (C, H, W), got "
                f"{x.shape}; methods act on one example, vmap them over a batch."
            )

    def check_input(self, x: Array, y: Array | None = None, *, batched: bool = True) -> None:
        """Raise a clear error if `x` or `y` cannot be fed to this model (input shape and
        dtype, NaN, label range or target shape); estimators call it eagerly."""
        check_classifier_input(
            "ConvHopfield",
            x,
            y,
            tuple(self.in_shape),
            self.n_out,
            batched=batched,
            shape_hint=" (C, H, W)",
        )

    def _target(self, y: Array, dtype) -> Array:
        if jnp.issubdtype(jnp.result_type(y), jnp.integer):
            return jax.nn.one_hot(y, self.n_out, dtype=dtype)
        return jnp.asarray(y).astype(dtype)

    # EnergyModel ---------------------------------------------------------------------

    def init_state(self, x: Float[Array, "C H W"]) -> State:
        self._check_x(x)
        dtype = jnp.result_type(x, self.fc_weight)
        return tuple(jnp.zeros(shape, dtype) for shape in self.layer_shapes)

    def phi(self, s: State, x: Float[Array, "C H W"]) -> Scalar:
        """Φ(x, s): the primitive function whose gradient drives the dynamics."""
        self._check_x(x)
        below = x
        total = 0.0
        n = len(self.conv_weights)
        for i in range(n):
            up = _max_pool(
                _conv(below, self.conv_weights[i], self.paddings[i])
                + self.conv_biases[i][:, None, None],
                self.pools[i],
            )
            total = total + jnp.sum(s[i] * up)
            below = s[i]
        if self.cost_type == "mse":
            total = total + jnp.dot(s[n], self.fc_weight @ below.reshape(-1) + self.fc_bias)
        return total

    def energy(self, s: State, x: Float[Array, "C H W"]) -> Scalar:
        return -self.phi(s, x)

    def readout(self, s: State) -> Array:
        if self.cost_type == "mse":
            return s[-1]
        return self.fc_weight @ s[-1].reshape(-1) + self.fc_bias

    def predict(self, s: State) -> Array:
        return self.readout(s)

    def cost(self, s: State, y: Array) -> Scalar:
        out = self.readout(s)
        target = self._target(y, out.dtype)
        if self.cost_type == "mse":
            return 0.5 * jnp.sum((out - target) ** 2)
        return -jnp.sum(target * jax.nn.log_softmax(out))

    def _half_step(self, s: State, x: Array, y: Array, beta: Any, which: Sequence[int]) -> State:
        which = tuple(which)
        rho = get_activation(self.activation)

        def neg_f(moving):
            full = list(s)
            for i, si in zip(which, moving, strict=True):
                full[i] = si
            return -self.total_energy(tuple(full), x, y, beta)

        # Differentiating only the layers that move lets XLA drop the other half's
        # convolutions, so an async sweep costs about what a sync one does.
        grads = jax.grad(neg_f)(tuple(s[i] for i in which))
        s = list(s)
        for i, g in zip(which, grads, strict=True):
            s[i] = rho(g)
        return tuple(s)

    def step(self, s: State, x: Array, y: Array, beta: Any) -> State:
        """s_l ← σ(∂(Φ - βC)/∂s_l), all layers at once or even-then-odd (see class doc)."""
        if jnp.iscomplexobj(jnp.asarray(beta)):
            raise TypeError("ConvHopfield: β must be real (max-pool has no complex form).")
        n = len(s)
        if self.update == "sync":
            return self._half_step(s, x, y, beta, range(n))
        s = self._half_step(s, x, y, beta, range(0, n, 2))
        return self._half_step(s, x, y, beta, range(1, n, 2))


__all__ = ["ConvHopfield"]
