"""Layered networks with separate forward and feedback weights (Scellier et al. 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from .activations import get_activation
from .base import AbstractVectorFieldModel

State = tuple[Array, ...]


def _derivative(fn, z: Array) -> Array:
    return jax.jvp(fn, (z,), (jnp.ones_like(z),))[1]


def _tilted(w_t: Array, r: Array, angle: float) -> Array:
    """cos(a)·w_t + sin(a)·r̂, r̂ ⟂ w_t in the Frobenius inner product, ‖r̂‖ = ‖w_t‖.

    So the result has the norm of w_t and makes exactly the angle a with it.
    """
    r = r - (jnp.vdot(r, w_t) / jnp.vdot(w_t, w_t)) * w_t
    r = r * (jnp.linalg.norm(w_t) / jnp.linalg.norm(r))
    return np.cos(angle) * w_t + np.sin(angle) * r


class VectorFieldMLP(AbstractVectorFieldModel):
    r"""A layered network whose dynamics are a vector field, not an energy gradient.

    Layers: x = s_0 (clamped), state (s_1, ..., s_L), s_L the output. Forward weights
    W_l (n_{l+1} × n_l) carry layer l up to l+1; feedback weights B_l (n_l × n_{l+1},
    l = 1..L-1) carry layer l+1 down to l. With ρ(s_0) = x the vector field is
    (Scellier, Goyal, Binas, Mesnard & Bengio 2018)

        μ_l(θ, x, s) = ρ'(s_l) ⊙ (W_{l-1} ρ(s_{l-1}) + B_l ρ(s_{l+1}) + b_l) − s_l,

    and the dynamics ds/dt = μ(θ, x, s) − β ∂C/∂s, discretised as
    `step`: s ← s + ε (μ − β ∂C/∂s), C = ½ ‖s_L − t‖².

    When B_l = W_lᵀ, μ = −∂E/∂s for the Hopfield energy (Scellier & Bengio 2017)
    E = ½ Σ‖s_l‖² − Σ ρ(s_{l+1})ᵀ W_l ρ(s_l) − Σ b_lᵀ ρ(s_l). When B_l ≠ W_lᵀ there is
    no energy; `energy` then returns the energy of the symmetrised weights
    (W_l + B_lᵀ)/2, which is only a diagnostic: `step` does not descend it. In the
    symmetric case `step` descends it exactly and [`eqprop_jax.EquilibriumProp`][]
    applies; its W_l and B_l gradients are then each half the gradient of the tied
    weight. [`eqprop_jax.VectorFieldEP`][] is the estimator meant for this model.

    The asymmetry control: `feedback_angle` θ_fb (degrees) builds
    B_l = cos θ_fb · W_lᵀ + sin θ_fb · R_l with R_l random, Frobenius-orthogonal to
    W_lᵀ and of the same norm, so that the angle between B_l and W_lᵀ is exactly θ_fb
    and ‖B_l‖ = ‖W_l‖ (0°: symmetric; 90°: feedback uncorrelated with the forward
    weights, as in feedback alignment). See [`VectorFieldMLP.feedback_angles`][].

    Args:
        sizes: layer sizes from input to output, e.g. (10, 8, 3).
        key: PRNG key (Glorot-uniform forward weights, zero biases).
        feedback_angle: θ_fb in degrees, in [0, 180].
        activation: a name from `eqprop_jax.models.activations` (smooth: "tanh",
            "sigmoid", "sigmoid4"; the vector field needs ρ').
        step_size: ε.
        weight_scale: factor on the initial forward weights.
        dtype: parameter dtype.
    """

    weights: tuple[Array, ...]
    feedback: tuple[Array, ...]
    biases: tuple[Array, ...]
    sizes: tuple[int, ...] = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    step_size: float = eqx.field(static=True)

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        key: PRNGKeyArray,
        feedback_angle: float = 0.0,
        activation: str = "tanh",
        step_size: float = 0.5,
        weight_scale: float = 1.0,
        dtype: Any = None,
    ):
        sizes = tuple(int(n) for n in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"VectorFieldMLP: `sizes` must be ≥ 2 positive ints, got {sizes}.")
        if not 0.0 <= feedback_angle <= 180.0:
            raise ValueError(
                f"VectorFieldMLP: `feedback_angle` is in degrees within [0, 180], got "
                f"{feedback_angle}."
            )
        if not 0 < step_size <= 1:
            raise ValueError(f"VectorFieldMLP: `step_size` must lie in (0, 1], got {step_size}.")
        get_activation(activation)
        dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
        kw, kb = jax.random.split(key)
        wkeys = jax.random.split(kw, len(sizes) - 1)
        bkeys = jax.random.split(kb, max(len(sizes) - 2, 1))
        weights = []
        for k, n_in, n_out in zip(wkeys, sizes[:-1], sizes[1:], strict=True):
            bound = weight_scale * np.sqrt(6.0 / (n_in + n_out))
            weights.append(jax.random.uniform(k, (n_out, n_in), dtype, -bound, bound))
        angle = np.deg2rad(feedback_angle)
        feedback = []
        for k, w in zip(bkeys, weights[1:], strict=False):
            r = jax.random.normal(k, w.T.shape, dtype)
            feedback.append(_tilted(w.T, r, angle))
        self.weights = tuple(weights)
        self.feedback = tuple(feedback)
        self.biases = tuple(jnp.zeros((n,), dtype) for n in sizes[1:])
        self.sizes = sizes
        self.activation = activation
        self.step_size = float(step_size)

    # -- shapes, checks, diagnostics ------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.biases)

    @property
    def n_outputs(self) -> int:
        return self.sizes[-1]

    def feedback_angles(self) -> list[float]:
        """Angle in degrees between each B_l and W_lᵀ (Frobenius inner product)."""
        out = []
        for w, b in zip(self.weights[1:], self.feedback, strict=True):
            cos = jnp.vdot(w.T, b) / (jnp.linalg.norm(w) * jnp.linalg.norm(b))
            out.append(float(np.degrees(np.arccos(np.clip(float(cos), -1.0, 1.0)))))
        return out

    def feedback_traces(self) -> list[float]:
        """tr(W_l B_l) for each feedback matrix (Scellier et al. 2018 track it)."""
        return [
            float(jnp.trace(w @ b)) for w, b in zip(self.weights[1:], self.feedback, strict=True)
        ]

    def symmetrized(self) -> VectorFieldMLP:
        """The model with B_l replaced by W_lᵀ (the energy-based network it tilts)."""
        return eqx.tree_at(lambda m: m.feedback, self, tuple(w.T for w in self.weights[1:]))

    def expected_input(self) -> tuple[tuple[int, ...], str]:
        return (self.sizes[0],), f" with n_in = {self.sizes[0]}"

    # -- dynamics ------------------------------------------------------------------

    def _rho(self, s):
        return get_activation(self.activation)(s)

    def _check_x(self, x):
        if jnp.shape(x) != (self.sizes[0],):
            raise ValueError(
                f"VectorFieldMLP: expected one input of shape ({self.sizes[0]},), got "
                f"{jnp.shape(x)}; methods act on one example, vmap them over a batch."
            )

    def init_state(self, x: Float[Array, " n_in"]) -> State:
        self._check_x(x)
        dtype = jnp.result_type(x, self.weights[0])
        return tuple(jnp.zeros(b.shape, dtype) for b in self.biases)

    def vector_field(self, s: State, x: Float[Array, " n_in"]) -> State:
        """μ(θ, x, s), layer by layer (see the class docstring)."""
        self._check_x(x)
        a = (x, *(self._rho(sl) for sl in s))
        out = []
        for j in range(self.n_layers):
            drive = self.weights[j] @ a[j] + self.biases[j]
            if j + 1 < self.n_layers:
                drive = drive + self.feedback[j] @ a[j + 2]
            out.append(_derivative(self._rho, s[j]) * drive - s[j])
        return tuple(out)

    def energy(self, s: State, x: Float[Array, " n_in"]) -> Scalar:
        """The Hopfield energy of the symmetrised weights (W_l + B_lᵀ)/2 (a diagnostic
        unless B_l = W_lᵀ, when μ = −∂E/∂s)."""
        self._check_x(x)
        a = (x, *(self._rho(sl) for sl in s))
        sym = (self.weights[0],) + tuple(
            0.5 * (w + b.T) for w, b in zip(self.weights[1:], self.feedback, strict=True)
        )
        coupling = sum(a[i + 1] @ (w @ a[i]) for i, w in enumerate(sym))
        bias = sum(b @ al for b, al in zip(self.biases, a[1:], strict=True))
        return 0.5 * sum(jnp.sum(sl * sl) for sl in s) - coupling - bias

    def cost(self, s: State, y: Array) -> Scalar:
        out = s[-1]
        if jnp.issubdtype(jnp.result_type(y), jnp.integer):
            t = jax.nn.one_hot(y, self.n_outputs, dtype=out.dtype)
        else:
            t = jnp.asarray(y).astype(out.dtype)
        return 0.5 * jnp.sum((out - t) ** 2)

    def predict(self, s: State) -> Array:
        return s[-1]

    def step(self, s: State, x: Array, y: Array, beta: Any) -> State:
        """s ← s + ε (μ(θ, x, s) − β ∂C/∂s)."""
        mu = self.vector_field(s, x)
        dcost = jax.grad(lambda out: self.cost((*s[:-1], out), y))(s[-1])
        mu = (*mu[:-1], mu[-1] - beta * dcost)
        return tuple(sl + self.step_size * m for sl, m in zip(s, mu, strict=True))


__all__ = ["VectorFieldMLP"]
