"""The fully connected continuous Hopfield network of the first EP paper."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

from .activations import HOLOMORPHIC, STATE_RANGE, get_activation
from .base import AbstractEnergyModel


def _symmetric_uniform(key, n: int, bound: float, dtype) -> Array:
    """A symmetric n×n matrix with zero diagonal, off-diagonal entries U(±bound)."""
    a = jax.random.uniform(key, (n, n), dtype, -bound, bound)
    upper = jnp.triu(a, 1)
    return upper + upper.T


class FullyConnectedHopfield(AbstractEnergyModel):
    r"""A continuous Hopfield network with every pair of units coupled (Scellier &
    Bengio 2017, "Equilibrium Propagation: Bridging the Gap between Energy-Based Models
    and Backpropagation", section 2: the model before it is specialised to layers).

    Units: n_in input units, clamped to x; free units s = (h, o), `n_hidden` hidden
    units h then `n_outputs` output units o. The energy is

        E(s, x) = ½ ‖s‖² − ½ ρ(s)ᵀ W ρ(s) − ρ(s)ᵀ U x − bᵀ ρ(s),

    W symmetric with a zero diagonal (every free unit talks to every other: hidden to
    hidden, hidden to output and output to output), U the couplings from the inputs,
    which enter as ρ(x) = x as in [`eqprop_jax.HopfieldMLP`][] (for pixels in [0, 1]
    the hard sigmoid is the identity anyway). The cost nudges the outputs only,
    C = ½ ‖o − t‖², t = onehot(y) (or a float target vector).

    The state follows the gradient flow of F = E + βC, one explicit Euler step per
    `step`:

        s ← s − ε ∂F/∂s,   ∂F/∂s = s − ρ'(s) ⊙ (W ρ(s) + U x + b) + β ∂C/∂s.

    With the hard sigmoid the state is clipped to [0, 1] after each step, as in the
    authors' code; ρ' is then taken from inside that interval at its closed ends (see
    [`eqprop_jax.HopfieldMLP`][]). EP's estimate of ∂L/∂W is then the local,
    Hebbian-like rule −½[ρ(s^β)ρ(s^β)ᵀ − ρ(s⁰)ρ(s⁰)ᵀ]/β of the paper, off the diagonal.

    **Parametrisation.** The energy uses the symmetric part of the stored `weights`
    with its diagonal zeroed, so any array gives a valid energy and every gradient of
    `weights` (EP's, recurrent backprop's, BPTT's) is symmetric with a zero diagonal:
    plain gradient updates keep a symmetric, zero-diagonal W so. `project()` puts
    the stored array itself back in that set (it does not change the energy).

    Args:
        n_in: number of input units.
        n_hidden: number of hidden units (0 allowed: inputs couple straight to outputs,
            with lateral output couplings).
        n_outputs: number of output units (classes).
        key: PRNG key: W and U uniform(±weight_scale·√(6/(fan_in + fan_out))), W
            symmetrised with a zero diagonal; biases zero.
        activation: a name from `eqprop_jax.models.activations.ACTIVATIONS`
            (default: the paper's hard sigmoid).
        step_size: ε, in (0, 1] (the paper's 0.5).
        weight_scale: factor on the initial weights.
        dtype: real floating dtype of the parameters (default: JAX's default float).
    """

    weights: Float[Array, "n n"]
    input_weights: Float[Array, "n n_in"]
    biases: Float[Array, " n"]
    n_hidden: int = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    step_size: float = eqx.field(static=True)

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        n_outputs: int,
        *,
        key: PRNGKeyArray,
        activation: str = "hard_sigmoid",
        step_size: float = 0.5,
        weight_scale: float = 1.0,
        dtype: Any = None,
    ):
        sizes = (n_in, n_hidden, n_outputs)
        if not all(isinstance(n, int | np.integer) and not isinstance(n, bool) for n in sizes):
            raise TypeError(f"FullyConnectedHopfield: unit counts must be integers, got {sizes}.")
        if n_in < 1 or n_hidden < 0 or n_outputs < 1:
            raise ValueError(
                "FullyConnectedHopfield: need n_in >= 1, n_hidden >= 0 and n_outputs >= 1, "
                f"got {sizes}."
            )
        get_activation(activation)
        if not 0 < step_size <= 1:
            raise ValueError(
                f"FullyConnectedHopfield: `step_size` must lie in (0, 1], got {step_size}."
            )
        dtype = jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"FullyConnectedHopfield: `dtype` must be a real floating dtype, got {dtype}."
            )
        n = int(n_hidden) + int(n_outputs)
        kw, ku = jax.random.split(key)
        self.weights = _symmetric_uniform(kw, n, weight_scale * np.sqrt(3.0 / n), dtype)
        bound = weight_scale * np.sqrt(6.0 / (n + n_in))
        self.input_weights = jax.random.uniform(ku, (n, n_in), dtype, -bound, bound)
        self.biases = jnp.zeros((n,), dtype)
        self.n_hidden = int(n_hidden)
        self.activation = activation
        self.step_size = float(step_size)

    # -- the contract -----------------------------------------------------------------

    @property
    def n_in(self) -> int:
        """Number of input units."""
        return self.input_weights.shape[1]

    @property
    def n_outputs(self) -> int:
        """Number of output units (classes)."""
        return self.biases.shape[0] - self.n_hidden

    @property
    def holomorphic(self) -> bool:
        """True with a holomorphic activation (`tanh`, `sigmoid`, `sigmoid4`, `identity`)."""
        return self.activation in HOLOMORPHIC

    @property
    def flow_step_size(self) -> float:
        """ε: `step` is one Euler step of the gradient flow ds/dt = −∂F/∂s."""
        return self.step_size

    def expected_input(self) -> tuple[tuple[int, ...], str]:
        return (self.n_in,), f" with n_in = {self.n_in}"

    def project(self) -> FullyConnectedHopfield:
        """The stored W replaced by its symmetric part with a zero diagonal (the matrix
        the energy uses, so the energy does not change)."""
        return eqx.tree_at(lambda m: m.weights, self, self.coupling())

    # -- the energy model -----------------------------------------------------------

    def coupling(self) -> Float[Array, "n n"]:
        """W as the energy uses it: (W + Wᵀ)/2 with a zero diagonal."""
        w = 0.5 * (self.weights + self.weights.T)
        return w * (1 - jnp.eye(w.shape[0], dtype=w.dtype))

    def _rho(self, s: Array) -> Array:
        return get_activation(self.activation)(s)

    def _check_x(self, x: Array) -> None:
        if jnp.shape(x) != (self.n_in,):
            raise ValueError(
                f"FullyConnectedHopfield: expected one input of shape ({self.n_in},), got "
                f"{jnp.shape(x)}; methods act on one example, vmap them over a batch."
            )

    def _target(self, y: Array, dtype) -> Array:
        if jnp.issubdtype(jnp.result_type(y), jnp.integer):
            return jax.nn.one_hot(y, self.n_outputs, dtype=dtype)
        return jnp.asarray(y).astype(dtype)

    def init_state(self, x: Float[Array, " n_in"]) -> Float[Array, " n"]:
        self._check_x(x)
        return jnp.zeros(self.biases.shape, jnp.result_type(x, self.weights))

    def energy(self, s: Float[Array, " n"], x: Float[Array, " n_in"]) -> Scalar:
        self._check_x(x)
        r = self._rho(s)
        return (
            0.5 * jnp.sum(s * s)
            - 0.5 * r @ (self.coupling() @ r)
            - r @ (self.input_weights @ x)
            - self.biases @ r
        )

    def cost(self, s: Float[Array, " n"], y: Array) -> Scalar:
        out = self.predict(s)
        return 0.5 * jnp.sum((out - self._target(y, out.dtype)) ** 2)

    def predict(self, s: Float[Array, " n"]) -> Float[Array, " n_outputs"]:
        """The output units o."""
        return s[self.n_hidden :]

    def step(self, s: Float[Array, " n"], x: Array, y: Array, beta: Any) -> Float[Array, " n"]:
        """s ← s − ε ∂F/∂s (clipped to the hard sigmoid's range; see the class docstring)."""
        self._check_x(x)
        drive = self.coupling() @ self._rho(s) + self.input_weights @ x + self.biases
        rng = STATE_RANGE.get(self.activation)
        clipped = rng is not None and not jnp.iscomplexobj(s)
        if clipped:
            # ρ is linear on the range the state is clipped to, whose ends the state
            # reaches: take the slope from inside there (jnp.clip's derivative is ½).
            lo, hi = rng
            mid = jnp.full_like(s, (lo + hi) / 2)
            slope = jax.jvp(self._rho, (mid,), (jnp.ones_like(s),))[1]
            d_rho = jnp.where((s >= lo) & (s <= hi), slope, 0)
        else:
            d_rho = jax.jvp(self._rho, (s,), (jnp.ones_like(s),))[1]
        grad = s - d_rho * drive
        out = self.predict(s)
        grad = grad.at[self.n_hidden :].add(beta * (out - self._target(y, out.dtype)))
        new = s - self.step_size * grad
        return jnp.clip(new, *rng) if clipped else new


__all__ = ["FullyConnectedHopfield"]
