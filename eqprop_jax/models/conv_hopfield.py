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

from ..equilibrium import Solution
from ..equilibrium.adjoints import AbstractAdjoint
from ..equilibrium.fixed_point import fixed_point
from ..equilibrium.solvers.base import AbstractSolver
from ..equilibrium.solvers.picard import Picard
from ..losses import cross_entropy
from ._conv import conv2d
from .activations import get_activation
from .base import AbstractEnergyModel, State


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


# Channels-last helpers for the hand-written relaxation step. One example, (H, W, C)
# maps and HWIO kernels: the layout XLA:CPU's fast convolution path takes.


def _hwc(s: Array) -> Array:
    return jnp.transpose(s, (1, 2, 0))


def _chw(s: Array) -> Array:
    return jnp.transpose(s, (2, 0, 1))


def _conv_hwc(s: Array, w: Array, padding: int) -> Array:
    """Cross-correlation of an (H, W, C) map with an (kh, kw, C, O) kernel, stride 1;
    its derivatives (BPTT through `step`) are fast inside loops too (`conv2d`)."""
    return conv2d(s, w, padding)


def _pool_argmax(a: Array, q: int) -> tuple[Array, Array | None]:
    """q×q max-pool (stride q, trailing rows/columns dropped) of an (H, W, C) map, and
    the position (0..q²-1, row-major) of each window's maximum, the first one among
    ties: the element that autodiff of `lax.reduce_window(max)` routes gradients to."""
    if q == 1:
        return a, None
    h, w, c = a.shape
    h2, w2 = h // q, w // q
    win = a[: h2 * q, : w2 * q].reshape(h2, q, w2, q, c)
    win = win.transpose(0, 2, 4, 1, 3).reshape(h2, w2, c, q * q)
    return jnp.max(win, axis=-1), jnp.argmax(win, axis=-1)


def _unpool(g: Array, idx: Array | None, q: int, hw: tuple[int, int]) -> Array:
    """Adjoint of [`_pool_argmax`][]'s pooling at fixed argmax: each value of `g` goes
    to its window's argmax, zeros elsewhere; `hw` is the map's size before pooling."""
    if q == 1:
        return g
    h2, w2, c = g.shape
    win = jnp.where(idx[..., None] == jnp.arange(q * q), g[..., None], jnp.zeros((), g.dtype))
    up = win.reshape(h2, w2, c, q, q).transpose(0, 3, 1, 4, 2).reshape(h2 * q, w2 * q, c)
    return jnp.pad(up, ((0, hw[0] - h2 * q), (0, hw[1] - w2 * q), (0, 0)))


def _flips(kernel_hw, padding: int, in_hw, out_hw) -> bool:
    """Whether the transpose of a stride-1 conv (kernel size `kernel_hw`, input size
    `in_hw`, output size `out_hw`) is best taken as a flipped-kernel convolution (see
    [`_conv_transpose_hwc`][])."""
    kh, kw = kernel_hw
    fits = padding <= kh - 1 and padding <= kw - 1
    return fits and in_hw[0] * in_hw[1] <= out_hw[0] * out_hw[1]


def _down_kernel(w: Array, flips: bool) -> Array:
    """The kernel [`_conv_transpose_hwc`][] takes: flipped with in/out channels swapped
    when `flips`, else `w` itself."""
    return jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3) if flips else w


def _conv_transpose_hwc(
    g: Array, w_down: Array, padding: int, hw: tuple[int, int], flips: bool
) -> Array:
    r"""Adjoint of `_conv_hwc(·, w, padding)` applied to `g`: the input gradient of the
    convolution, Σ_{o,p,q} g[y-p+pad, x-q+pad, o] w[p, q, i, o], written as forward
    work (`w_down = _down_kernel(w, flips)`, `hw` the input's spatial size).
    Autodiff's transposed convolution runs ~7-10x slower than a forward one inside
    XLA:CPU while loops (benchmarks/results/ep_conv.md).

    `flips` ('same' or wider convolutions): the forward convolution of `g` with the
    flipped, in/out-swapped kernel, the same FLOPs as the forward pass. Otherwise (a
    shrinking 'valid' convolution, where that convolution would multiply a
    (k-1)-wide border of zeros: 2.25x the work for the 5x5 P-conv layer), each
    tap's channel product g w[p, q]ᵀ is added at its offset.
    """
    kh, kw = w_down.shape[:2]
    if flips:  # square kernels (ConvHopfield's)
        return conv2d(g, w_down, kh - 1 - padding)
    # In-place adds at each tap's offset: measured faster than one fused sum of k²
    # padded copies, which XLA:CPU does not vectorise well.
    h2, w2 = g.shape[:2]
    out = jnp.zeros((h2 + kh - 1, w2 + kw - 1, w_down.shape[2]), g.dtype)
    for p in range(kh):
        for q in range(kw):
            out = out.at[p : p + h2, q : q + w2].add(jnp.einsum("hwo,io->hwi", g, w_down[p, q]))
    return out[padding : padding + hw[0], padding : padding + hw[1]]


class ConvHopfield(AbstractEnergyModel):
    r"""Convolutional EP in the discrete-time prototypical form (Ernoult et al. 2019).

    Layers s_1..s_L are (C, H, W) feature maps, s_0 = x, and (cost `"mse"`) an output
    layer s_{L+1} of `n_outputs` units. With P the max-pool and ⋆ the convolution,

        Φ(x, s) = Σ_l ⟨s_{l+1}, P(W_l ⋆ s_l + b_l)⟩ + ⟨s_{L+1}, W_fc vec(s_L) + b_fc⟩,

    E = -Φ, and the dynamics are s_l ← σ(∂(Φ - βC)/∂s_l). Going up, a layer sees the
    pooled convolution of the layer below; coming down it sees the transposed
    convolution of the unpooled (argmax-routed) layer above. The authors' code
    (Laborieux et al. 2021) takes this field by autodiff of Φ; `step` writes it out
    as forward convolutions (channels-last), which XLA:CPU runs several times faster
    inside relaxation loops, and the tests check it against `jax.grad` of Φ - βC.
    The parameter gradients (EP's ∂F/∂θ) still come from autodiff of Φ.

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
        n_outputs: int,
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
        n_outputs = int(n_outputs)
        if n_outputs < 1:
            raise ValueError(f"ConvHopfield: n_outputs must be positive, got {n_outputs}.")
        fan_in = c * h * w
        bound = 1.0 / np.sqrt(fan_in)
        self.conv_weights = tuple(ws)
        self.conv_biases = tuple(bs)
        self.fc_weight = jax.random.uniform(keys[-2], (n_outputs, fan_in), dtype, -bound, bound)
        self.fc_bias = jax.random.uniform(keys[-1], (n_outputs,), dtype, -bound, bound)
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
        cls, *, key: PRNGKeyArray, n_outputs: int = 10, cost="mse", update="async", dtype=None
    ) -> ConvHopfield:
        """The deep convolutional Hopfield network of Laborieux et al. 2021 / Scellier et
        al. 2023 on CIFAR (3x32x32): 3x3 convs 128-256-512-512 (padding 1), 2x2 max-pool
        after each, fc 2048→`n_outputs`, clip(x/2, 0, 1) (paper: T 250/30 sync or 60/15
        async, β 0.5 MSE / 1.0 CE)."""
        return cls(
            (3, 32, 32),
            (128, 256, 512, 512),
            3,
            n_outputs,
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
    def n_outputs(self) -> int:
        """Number of classes (the size of the output layer or readout)."""
        return self.fc_weight.shape[0]

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
            shapes.append((self.n_outputs,))
        return tuple(shapes)

    def _check_x(self, x: Array) -> None:
        if x.shape != self.in_shape:
            raise ValueError(
                f"ConvHopfield: expected one input of shape {self.in_shape} (C, H, W), got "
                f"{x.shape}; methods act on one example, vmap them over a batch."
            )

    def expected_input(self) -> tuple[tuple[int, ...], str]:
        return tuple(self.in_shape), " (C, H, W)"

    def _target(self, y: Array, dtype) -> Array:
        if jnp.issubdtype(jnp.result_type(y), jnp.integer):
            return jax.nn.one_hot(y, self.n_outputs, dtype=dtype)
        return jnp.asarray(y).astype(dtype)

    # AbstractEnergyModel ---------------------------------------------------------------------

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
        return self._scores(s[-1])

    def predict(self, s: State) -> Array:
        return self.readout(s)

    def cost(self, s: State, y: Array) -> Scalar:
        return self._cost_last(s[-1], y)

    # The readout and the cost read only the last layer of the state.
    def _scores(self, last: Array) -> Array:
        if self.cost_type == "mse":
            return last
        return self.fc_weight @ last.reshape(-1) + self.fc_bias

    def _cost_last(self, last: Array, y: Array) -> Scalar:
        out = self._scores(last)
        target = self._target(y, out.dtype)
        if self.cost_type == "mse":
            return 0.5 * jnp.sum((out - target) ** 2)
        return cross_entropy(out, target)

    def step(self, s: State, x: Array, y: Array, beta: Any) -> State:
        """s_l ← σ(∂(Φ - βC)/∂s_l), all layers at once or even-then-odd (see class doc).

        The field ∂(Φ - βC)/∂s is written out (pooled convolution up, transposed
        convolution of the argmax-unpooled layer above down, both as forward
        convolutions, channels-last) rather than taken by `jax.grad`: it equals
        autodiff's to rounding (tested) and runs several times faster inside
        XLA:CPU relaxation loops. An async sweep reuses the convolutions of layers
        that did not move in its first half.
        """
        _check_real(beta)
        self._check_x(x)
        n = len(self.conv_weights)
        up, down = self._kernels()
        x = _hwc(x)
        drive = self._pooled(0, x, up)
        out = self._step_hwc(self._hwc_state(s), (up, down, drive), y, beta)
        return tuple(_chw(a) for a in out[:n]) + tuple(out[n:])

    def relax(
        self,
        x: Float[Array, "C H W"],
        y: Array,
        beta: Any = 0.0,
        s0: State | None = None,
        *,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
    ) -> Solution:
        """The equilibrium s^β from `s0` by iterating `step` (see
        [`eqprop_jax.AbstractEnergyModel.relax`][]; default solver `Picard(tol=0,
        max_steps=50)`).

        Work that does not depend on the state is done once, before the loop: the
        kernels' channels-last and flipped forms and the input layer's pooled
        convolution of x. The loop carries the conv layers channels-last, converted
        once on the way in and out.
        """
        _check_real(beta)
        self._check_x(x)
        s0 = self.init_state(x) if s0 is None else s0
        solver = Picard(tol=0.0, max_steps=50) if solver is None else solver
        n = len(self.conv_weights)
        up, down = self._kernels()
        drive = self._pooled(0, _hwc(x), up)
        sol = fixed_point(
            lambda s, args: self._step_hwc(s, *args),
            self._hwc_state(s0),
            ((up, down, drive), y, beta),
            solver=solver,
            adjoint=adjoint,
        )
        value = tuple(_chw(a) for a in sol.value[:n]) + tuple(sol.value[n:])
        return Solution(value, sol.result, sol.stats)

    def _hwc_state(self, s: State) -> tuple[Array, ...]:
        n = len(self.conv_weights)
        return tuple(_hwc(a) for a in s[:n]) + tuple(s[n:])

    def _flips(self) -> tuple[bool, ...]:
        """Per conv layer, whether its transpose is taken by a flipped convolution."""
        out = []
        for j, w in enumerate(self.conv_weights):
            in_hw = self.in_shape[1:] if j == 0 else self.layer_shapes[j - 1][1:]
            out.append(_flips(w.shape[2:], self.paddings[j], in_hw, self._conv_hw(j)))
        return tuple(out)

    def _kernels(self) -> tuple[tuple[Array, ...], tuple[Array | None, ...]]:
        """The conv kernels channels-last (HWIO) for the bottom-up convolutions, and
        the kernels of the top-down (transposed) ones; layer 0 has none."""
        up = tuple(jnp.transpose(w, (2, 3, 1, 0)) for w in self.conv_weights)
        flips = self._flips()
        down = (None,) + tuple(_down_kernel(w, f) for w, f in zip(up[1:], flips[1:], strict=True))
        return up, down

    def _step_hwc(self, s: tuple[Array, ...], consts, y: Array, beta: Any):
        """`step` on a state whose conv layers are channels-last; `consts` holds the
        kernels and the input layer's pooled convolution of x."""
        up, down, drive = consts
        rho = get_activation(self.activation)
        layers = list(s)
        # cache[j]: (pooled, argmax) of conv_j(layer j-1) + b_j for the current
        # layers; layer -1 is x.
        cache = {0: drive}
        if self.update == "sync":
            halves = (tuple(range(len(s))),)
        else:
            halves = (tuple(range(0, len(s), 2)), tuple(range(1, len(s), 2)))
        for which in halves:
            fields = self._fields(layers, cache, up, down, y, beta, which)
            for i in which:
                layers[i] = rho(fields[i])
                cache.pop(i + 1, None)  # conv_{i+1} reads layer i, which moved
        return tuple(layers)

    def _pooled(self, j: int, below: Array, up) -> tuple[Array, Array | None]:
        a = _conv_hwc(below, up[j], self.paddings[j]) + self.conv_biases[j]
        return _pool_argmax(a, self.pools[j])

    def _fields(self, layers, cache, up, down, y, beta, which) -> dict[int, Array]:
        """∂(Φ - βC)/∂s_i for i in `which` (conv layers channels-last), by hand."""
        n = len(self.conv_weights)
        flips = self._flips()

        def pooled(j):
            if j not in cache:
                cache[j] = self._pooled(j, layers[j - 1], up)
            return cache[j]

        last = n if self.cost_type == "mse" else n - 1  # the layer C reads
        fields = {}
        for i in which:
            if i == n:  # the output layer (MSE): fc of the last conv layer
                f = self.fc_weight @ _chw(layers[n - 1]).reshape(-1) + self.fc_bias
            else:
                f = pooled(i)[0]
                if i + 1 < n:  # from the conv layer above, routed through its argmax
                    j = i + 1
                    g = _unpool(layers[j], pooled(j)[1], self.pools[j], self._conv_hw(j))
                    hw = layers[i].shape[:2]
                    f = f + _conv_transpose_hwc(g, down[j], self.paddings[j], hw, flips[j])
                elif self.cost_type == "mse":  # from the output layer through fc
                    back = self.fc_weight.T @ layers[n]
                    f = f + _hwc(back.reshape(_chw(layers[i]).shape))
            if i == last:
                v = layers[i] if i == n else _chw(layers[i])
                dc = jax.grad(lambda v: self._cost_last(v, y))(v)
                f = f - beta * (dc if i == n else _hwc(dc))
            fields[i] = f
        return fields

    def _conv_hw(self, j: int) -> tuple[int, int]:
        """Spatial size of conv layer j's output before pooling."""
        h, w = self.in_shape[1:] if j == 0 else self.layer_shapes[j - 1][1:]
        k = self.conv_weights[j].shape[2]
        p = self.paddings[j]
        return h + 2 * p - k + 1, w + 2 * p - k + 1


def _check_real(beta) -> None:
    if jnp.iscomplexobj(jnp.asarray(beta)):
        raise TypeError("ConvHopfield: β must be real (max-pool has no complex form).")


def _autodiff_step(model: ConvHopfield, s: State, x: Array, y: Array, beta: Any) -> State:
    """Reference for [`ConvHopfield.step`][]: the same update with the field taken by
    `jax.grad` of -F = Φ - βC (as in the authors' code), for tests and benchmarks."""
    rho = get_activation(model.activation)

    def half(s, which):
        def neg_f(moving):
            full = list(s)
            for i, si in zip(which, moving, strict=True):
                full[i] = si
            return -model.total_energy(tuple(full), x, y, beta)

        grads = jax.grad(neg_f)(tuple(s[i] for i in which))
        s = list(s)
        for i, g in zip(which, grads, strict=True):
            s[i] = rho(g)
        return tuple(s)

    n = len(s)
    if model.update == "sync":
        return half(s, tuple(range(n)))
    return half(half(s, tuple(range(0, n, 2))), tuple(range(1, n, 2)))


__all__ = ["ConvHopfield"]
