"""Layered Hopfield networks: the models of the first Equilibrium Propagation papers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from .activations import HOLOMORPHIC, STATE_RANGE, get_activation
from .base import AbstractEnergyModel

State = tuple[Array, ...]


def _glorot(key, n_out, n_in, dtype):
    bound = np.sqrt(6.0 / (n_in + n_out))
    return jax.random.uniform(key, (n_out, n_in), dtype, -bound, bound)


def holomorphic_grad(f, z: Array) -> Array:
    """df/dz for a scalar `f` that is holomorphic in `z` (the ordinary gradient if real).

    `jax.grad` refuses complex outputs; a VJP with cotangent 1 gives f'(z) itself (JAX
    does not conjugate), which is what a complex-β relaxation needs.
    """
    out, vjp = jax.vjp(f, z)
    return vjp(jnp.ones_like(out))[0]


def _derivative(fn, z: Array) -> Array:
    """Elementwise fn'(z) by forward mode (complex-safe for holomorphic fn)."""
    return jax.jvp(fn, (z,), (jnp.ones_like(z),))[1]


class HopfieldMLP(AbstractEnergyModel):
    r"""A layered Hopfield network trained by Equilibrium Propagation.

    Layers 0..L with sizes `sizes[0]..`: the input x = layer 0 is clamped (not a
    state); the state is the tuple (s_1, ..., s_L) of the other layers. Weights
    W_l (n_{l+1} × n_l) couple layers l and l+1 symmetrically; biases b_l act on
    s_l. Two dynamics:

    - `dynamics="gradient"` (Scellier & Bengio 2017): the Hopfield energy
      E = ½ Σ_l ‖s_l‖² − Σ_l ρ(s_{l+1})ᵀ W_l ρ(s_l) − Σ_l b_lᵀ ρ(s_l), with ρ(s_0) = x,
      relaxed by gradient flow s ← s − ε ∂F/∂s, F = E + βC. With a piecewise-linear
      activation the state is clipped to ρ's active range after every step, as in
      the authors' code (outside it ρ' = 0 and the state would drift).
    - `dynamics="prototypical"` (Ernoult et al. 2019, "P-1h"): the discrete-time map
      s ← σ(∂Φ/∂s − β ∂C/∂s) with the primitive Φ = Σ_l s_{l+1}ᵀ W_l s_l + Σ_l b_lᵀ s_l
      (s_0 = x), so E = −Φ. At a fixed point with symmetric coupling, EP's β → 0 limit
      is exactly recurrent backprop through this map.

    Cost C(s, y):

    - `cost="mse"`: C = ½ ‖s_L − t‖², the output layer s_L being part of the dynamics.
    - `cost="ce"` (Laborieux et al. 2021): the last size is a readout outside the
      dynamics, z = W_out a(s_L) + b_out with a = ρ for gradient dynamics and the
      identity for prototypical ones, and C = −log softmax(z)_y. It has its own
      parameters, which EP trains through F = E + βC.

    `y` is an integer class label (one-hot encoded inside) or a float target vector
    of the output size. `update="sync"` updates all layers at once from the previous
    state; `update="async"` updates the even layers, then the odd layers from the new
    even ones (block Gauss–Seidel: since layers only touch their neighbours, each
    half-step is exact and the relaxation needs far fewer steps; Scellier et al. 2023).
    Both have the same fixed points.

    All methods are per example (no batch axis); [`HopfieldMLP.check_input`][] checks
    a batch eagerly. States may be complex (holomorphic EP) when the activation is
    holomorphic (`tanh`, `sigmoid`, `sigmoid4`, `identity`).

    Args:
        sizes: layer sizes from the input to the output, e.g. (784, 512, 10).
        key: PRNG key for the Glorot-uniform weights (biases start at zero).
        dynamics: "gradient" or "prototypical".
        activation: a name from `eqprop_jax.models.activations.ACTIVATIONS`; default
            "hard_sigmoid" for gradient dynamics, "sigmoid4" for prototypical ones.
        cost: "mse" or "ce".
        update: "sync" or "async".
        step_size: ε of the gradient dynamics (ignored by prototypical dynamics).
        weight_scale: factor applied to the Glorot-uniform initial weights.
        dtype: floating dtype of the parameters (default: JAX's default float).
    """

    weights: tuple[Array, ...]
    biases: tuple[Array, ...]
    readout: tuple[Array, Array] | None
    readout_fields: ClassVar[tuple[str, ...]] = ("readout",)
    sizes: tuple[int, ...] = eqx.field(static=True)
    dynamics: str = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    cost_type: str = eqx.field(static=True)
    update: str = eqx.field(static=True)
    step_size: float = eqx.field(static=True)

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        key: PRNGKeyArray,
        dynamics: Literal["gradient", "prototypical"] = "prototypical",
        activation: str | None = None,
        cost: Literal["mse", "ce"] = "mse",
        update: Literal["sync", "async"] = "sync",
        step_size: float = 0.5,
        weight_scale: float = 1.0,
        dtype: Any = None,
    ):
        sizes = tuple(sizes)
        if not all(isinstance(n, int | np.integer) and n >= 1 for n in sizes):
            raise ValueError(f"HopfieldMLP: `sizes` must be positive integers, got {sizes}.")
        if dynamics not in ("gradient", "prototypical"):
            raise ValueError(
                f"HopfieldMLP: `dynamics` must be 'gradient' or 'prototypical', got {dynamics!r}."
            )
        if cost not in ("mse", "ce"):
            raise ValueError(f"HopfieldMLP: `cost` must be 'mse' or 'ce', got {cost!r}.")
        if update not in ("sync", "async"):
            raise ValueError(f"HopfieldMLP: `update` must be 'sync' or 'async', got {update!r}.")
        min_len = 3 if cost == "ce" else 2
        if len(sizes) < min_len:
            raise ValueError(
                f"HopfieldMLP: cost={cost!r} needs at least {min_len} sizes (input, "
                f"{'hidden, ' if cost == 'ce' else ''}output), got {sizes}."
            )
        if activation is None:
            activation = "hard_sigmoid" if dynamics == "gradient" else "sigmoid4"
        get_activation(activation)
        if not 0 < step_size <= 1:
            raise ValueError(f"HopfieldMLP: `step_size` must lie in (0, 1], got {step_size}.")
        dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"HopfieldMLP: `dtype` must be a real floating dtype, got {dtype}.")

        dyn_sizes = sizes[:-1] if cost == "ce" else sizes
        keys = jax.random.split(key, len(dyn_sizes))
        self.weights = tuple(
            weight_scale * _glorot(k, n_out, n_in, dtype)
            for k, n_in, n_out in zip(keys, dyn_sizes[:-1], dyn_sizes[1:], strict=False)
        )
        self.biases = tuple(jnp.zeros((n,), dtype) for n in dyn_sizes[1:])
        if cost == "ce":
            self.readout = (
                weight_scale * _glorot(keys[-1], sizes[-1], sizes[-2], dtype),
                jnp.zeros((sizes[-1],), dtype),
            )
        else:
            self.readout = None
        self.sizes = sizes
        self.dynamics = dynamics
        self.activation = activation
        self.cost_type = cost
        self.update = update
        self.step_size = float(step_size)

    # -- shapes and input checks -------------------------------------------------

    @property
    def n_layers(self) -> int:
        """L, the number of state layers."""
        return len(self.biases)

    @property
    def n_outputs(self) -> int:
        """Number of classes (or size of the target vector)."""
        return self.sizes[-1]

    @property
    def holomorphic(self) -> bool:
        """True with a holomorphic activation (`tanh`, `sigmoid`, `sigmoid4`, `identity`)."""
        return self.activation in HOLOMORPHIC

    @property
    def flow_step_size(self) -> float | None:
        """ε for gradient dynamics (s ← s − ε ∂F/∂s); None for prototypical ones."""
        return self.step_size if self.dynamics == "gradient" else None

    def expected_input(self) -> tuple[tuple[int, ...], str]:
        return (self.sizes[0],), f" with n_in = {self.sizes[0]} (model sizes {self.sizes})"

    # -- the energy model ----------------------------------------------------------

    def _rho(self, s):
        return get_activation(self.activation)(s)

    def _act(self, s):
        """What a layer presents to its neighbours: ρ(s) (gradient) or s itself."""
        return self._rho(s) if self.dynamics == "gradient" else s

    def _target(self, y, dtype):
        if jnp.issubdtype(jnp.result_type(y), jnp.integer):
            return jax.nn.one_hot(y, self.n_outputs, dtype=dtype)
        return jnp.asarray(y).astype(dtype)

    def init_state(self, x: Float[Array, " n_in"]) -> State:
        dtype = jnp.result_type(x, self.weights[0])
        return tuple(jnp.zeros(b.shape, dtype) for b in self.biases)

    def energy(self, s: State, x: Float[Array, " n_in"]) -> Scalar:
        a = (x, *(self._act(sl) for sl in s))
        coupling = sum(a[i + 1] @ (w @ a[i]) for i, w in enumerate(self.weights))
        bias = sum(b @ al for b, al in zip(self.biases, a[1:], strict=True))
        if self.dynamics == "gradient":
            return 0.5 * sum(jnp.sum(sl * sl) for sl in s) - coupling - bias
        return -(coupling + bias)

    def logits(self, s: State) -> Array:
        """The class scores: the output layer (MSE) or the readout W_out a(s_L) + b_out (CE)."""
        if self.readout is None:
            return s[-1]
        w, b = self.readout
        return w @ self._act(s[-1]) + b

    def _cost_out(self, s_last, y):
        """C as a function of the last state layer only."""
        if self.readout is None:
            t = self._target(y, s_last.dtype)
            return 0.5 * jnp.sum((s_last - t) ** 2)
        w, b = self.readout
        z = w @ self._act(s_last) + b
        t = self._target(y, z.dtype)
        # logsumexp by hand: stable (shift by the real max) and holomorphic in z.
        m = jax.lax.stop_gradient(jnp.max(jnp.real(z)))
        return jnp.log(jnp.sum(jnp.exp(z - m))) + m - jnp.sum(t * z)

    def cost(self, s: State, y: Array) -> Scalar:
        return self._cost_out(s[-1], y)

    def predict(self, s: State) -> Array:
        return self.logits(s)

    def _drive(self, s: State, x: Array, j: int) -> Array:
        """∂Φ/∂a_j = W_{j-1} a_{j-1} + W_jᵀ a_{j+1} + b_j, the input layer j gets."""
        below = x if j == 0 else self._act(s[j - 1])
        d = self.weights[j] @ below + self.biases[j]
        if j + 1 < self.n_layers:
            d = d + self._act(s[j + 1]) @ self.weights[j + 1]
        return d

    def _new_layer(self, s: State, x: Array, j: int, dcost: Array | None, beta) -> Array:
        d = self._drive(s, x, j)
        if self.dynamics == "prototypical":
            if dcost is not None:
                d = d - beta * dcost
            return self._rho(d)
        sj = s[j]
        rng = STATE_RANGE.get(self.activation)
        clipped = rng is not None and not jnp.iscomplexobj(sj)
        if clipped:
            # ρ is linear on the clipped state range, whose closed ends the states reach;
            # there jnp.clip's derivative is ½, and a unit held at 1 by a drive in (1, 2)
            # would step to ½ + d/4 and back forever. Take the slope from inside, as the
            # authors' code does (Theano's clip gradient is 1 on the closed range).
            lo, hi = rng
            inside = (sj >= lo) & (sj <= hi)
            slope = _derivative(self._rho, jnp.full_like(sj, (lo + hi) / 2))
            d_rho = jnp.where(inside, slope, 0)
        else:
            d_rho = _derivative(self._rho, sj)
        grad = sj - d_rho * d
        if dcost is not None:
            grad = grad + beta * dcost
        new = sj - self.step_size * grad
        if clipped:
            new = jnp.clip(new, *rng)
        return new

    def _update_layers(self, s: State, x: Array, y: Array, beta, layers) -> State:
        last = self.n_layers - 1
        dcost = None
        if last in layers:
            dcost = holomorphic_grad(lambda sl: self._cost_out(sl, y), s[last])
        new = list(s)
        for j in layers:
            new[j] = self._new_layer(s, x, j, dcost if j == last else None, beta)
        return tuple(new)

    def step(self, s: State, x: Array, y: Array, beta: Any) -> State:
        """One relaxation step (see the class docstring); its fixed point is s^β."""
        if self.update == "sync":
            return self._update_layers(s, x, y, beta, range(self.n_layers))
        # Layer index j holds layer j + 1 of the network, so "even layers" are odd j.
        even = [j for j in range(self.n_layers) if (j + 1) % 2 == 0]
        odd = [j for j in range(self.n_layers) if (j + 1) % 2 == 1]
        s = self._update_layers(s, x, y, beta, even)
        return self._update_layers(s, x, y, beta, odd)
