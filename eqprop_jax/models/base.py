"""The model contracts: what estimators, training and diagnostics may rely on.

- [`AbstractModel`][eqprop_jax.AbstractModel]: a classifier of one example, with its
  output count, its input check and its admissible set of parameters.
- [`AbstractEnergyModel`][eqprop_jax.AbstractEnergyModel]: a state s that settles at
  a minimum (or fixed point) of F = E + βC: EP, C-EP, RBP, BPTT, the traces.
- [`AbstractVectorFieldModel`][eqprop_jax.AbstractVectorFieldModel]: dynamics
  ds/dt = F(s) that need not be a gradient (asymmetric weights): vector-field EP.

Every method acts on one example; estimators and training `jax.vmap` over the batch.
No estimator, loop or diagnostic probes a model with `getattr`: what it uses is
declared here.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar

from ..equilibrium import Solution
from ..equilibrium.adjoints import AbstractAdjoint
from ..equilibrium.fixed_point import fixed_point
from ..equilibrium.solvers.base import AbstractSolver
from ..equilibrium.solvers.picard import Picard
from ._checks import check_classifier_input

State = PyTree[Array]


class AbstractModel(eqx.Module):
    """A trainable classifier of one example.

    - `n_outputs`: the number of classes (the output count; labels are 0..n_outputs-1
      or float targets of that size).
    - `check_input(x, y, batched=True)`: raise a clear `ValueError` naming the problem
      if a batch (or one example) cannot be fed to the model; called eagerly, before
      any tracing, by estimators and training. A model that declares
      `expected_input()` (the shape of one example and a hint for the message) gets
      the standard check (shape, dtype, NaN, label range, target shape) from it.
    - `project()`: the model moved back into its admissible parameter set after an
      update (e.g. conductances >= 0); the default is the model itself.
    - `readout_fields`: the fields that hold a readout outside the numbered layers;
      per-layer learning rates count them as the layer after the last
      ([`eqprop_jax.train.layer_indices`][]). Default: none.
    """

    readout_fields: ClassVar[tuple[str, ...]] = ()

    @property
    @abc.abstractmethod
    def n_outputs(self) -> int:
        """The number of classes."""

    def expected_input(self) -> tuple[tuple[int, ...], str] | None:
        """(the shape of one input example, a hint appended to shape errors), or None
        (the default) for a model that takes any input."""
        return None

    def check_input(self, x: Array, y: Array | None = None, *, batched: bool = True) -> None:
        """Raise a `ValueError` if `x`/`y` cannot be fed to this model: input shape and
        dtype, NaN/inf, label range or target shape, against `expected_input()`.
        Without it everything is accepted; estimators range-check integer labels
        against `n_outputs` themselves (also under `jit`)."""
        spec = self.expected_input()
        if spec is None:
            return
        shape, hint = spec
        check_classifier_input(
            type(self).__name__,
            x,
            y,
            tuple(shape),
            self.n_outputs,
            batched=batched,
            shape_hint=hint,
        )

    def project(self):
        """The model in its admissible set (identity unless a subclass constrains it)."""
        return self


class AbstractEnergyModel(AbstractModel):
    r"""A model whose state s settles at a minimum (or fixed point) of F = E + βC.

    All methods act on **one example** (no batch axis); estimators and training
    `jax.vmap` over the batch. The state `s` is a pytree (usually a tuple of layer
    arrays). `β` may be complex (holomorphic EP): implementations must not cast it
    to real.

    - `energy(s, x)`: E(s, x; θ). For the discrete-time "prototypical" models of
      Ernoult et al. 2019 it is E = -Φ, so that EP's formula is the same for all.
    - `cost(s, y)`: C(s, y; θ), the nudging cost (it may hold parameters, e.g. a
      cross-entropy readout outside the dynamics, Laborieux et al. 2021).
    - `step(s, x, y, beta)`: one relaxation update towards argmin_s E + βC (a
      gradient-flow step, s <- σ(-∂F/∂s), a block coordinate sweep, ...). Its fixed
      point is the equilibrium s^β.
    - `loss(s, y)`: the objective L whose gradient the estimators estimate
      (default: `cost`).
    - `total_energy(s, x, y, beta)`: F = E + βC; EP's estimate is
      ĝ = [∂F/∂θ(s^{β2}, β2) - ∂F/∂θ(s^{β1}, β1)] / (β2 - β1), which also covers
      parameters that only appear in C.
    """

    @abc.abstractmethod
    def init_state(self, x: Array) -> State:
        """The starting state for input `x` (usually zeros)."""

    @abc.abstractmethod
    def energy(self, s: State, x: Array) -> Scalar:
        """E(s, x; θ)."""

    @abc.abstractmethod
    def cost(self, s: State, y: Array) -> Scalar:
        """C(s, y; θ)."""

    @abc.abstractmethod
    def step(self, s: State, x: Array, y: Array, beta: Any) -> State:
        """One relaxation update of the state towards argmin E + βC."""

    @abc.abstractmethod
    def predict(self, s: State) -> Array:
        """Class scores (logits or output activities) read from an equilibrium state."""

    def loss(self, s: State, y: Array) -> Scalar:
        return self.cost(s, y)

    @property
    def holomorphic(self) -> bool:
        """Whether `step` and `total_energy` are holomorphic in (s, β), so that complex
        nudges (holomorphic EP, Laborieux & Zenke 2022) are valid. Default: False."""
        return False

    @property
    def flow_step_size(self) -> float | None:
        """ε if `step` is one explicit Euler step of the gradient flow
        ds/dt = −∂F/∂s, i.e. s ← s − ε ∂F/∂s (then a step is ε units of time, as the
        GDU trace needs); None for other dynamics (discrete-time, coordinate sweeps)."""
        return None

    def total_energy(self, s: State, x: Array, y: Array, beta: Any) -> Scalar:
        return self.energy(s, x) + beta * self.cost(s, y)

    def relax(
        self,
        x: Array,
        y: Array,
        beta: Any = 0.0,
        s0: State | None = None,
        *,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
    ) -> Solution:
        """The equilibrium s^β from `s0` (default `init_state(x)`) by iterating `step`.

        `solver` defaults to `Picard(tol=0, max_steps=50)` (fixed number of steps);
        a complex `beta` makes the state complex.
        """
        s0 = self.init_state(x) if s0 is None else s0
        if jnp.iscomplexobj(jnp.asarray(beta)):
            s0 = to_complex(s0)
        solver = Picard(tol=0.0, max_steps=50) if solver is None else solver
        return fixed_point(
            lambda s, args: self.step(s, args[0], args[1], args[2]),
            s0,
            (x, y, beta),
            solver=solver,
            adjoint=adjoint,
        )


def to_complex(tree: PyTree) -> PyTree:
    """Cast every floating leaf of `tree` to the matching complex dtype."""

    def cast(a):
        a = jnp.asarray(a)
        if jnp.iscomplexobj(a):
            return a
        return a.astype(jnp.result_type(a.dtype, jnp.complex64))

    return jax.tree_util.tree_map(cast, tree)


class AbstractVectorFieldModel(AbstractEnergyModel):
    r"""Dynamics ds/dt = μ(θ, x, s) − β ∂C/∂s that need not derive from an energy
    (Scellier, Goyal, Binas, Mesnard & Bengio 2018, "Generalization of equilibrium
    propagation to vector field dynamics").

    `vector_field(s, x)` is μ(θ, x, s), the free dynamics; `step` integrates the nudged
    ones, whose zero is the equilibrium. `energy` is that of the symmetric network the
    field tilts (a diagnostic), so the model is also an energy model and `relax` works.
    Vector-field EP's estimate is ν = ∂/∂θ ⟨Δs/β, μ(θ, x, s⁰)⟩.
    """

    @abc.abstractmethod
    def vector_field(self, s: State, x: Array) -> State:
        """μ(θ, x, s) at state s."""
