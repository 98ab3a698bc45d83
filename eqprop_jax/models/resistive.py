r"""Deep resistive networks: conductances, ideal diodes and an exact coordinate-descent sweep.

Kendall et al. 2020 ("Training end-to-end analog neural networks with equilibrium
propagation") build networks whose weights are conductances g ≥ 0 and whose
nonlinearities are diodes; Scellier 2024 ("A fast algorithm to simulate nonlinear
resistive networks") simulates them exactly: the steady state minimises the power
dissipated under the diodes' bounds (a convex QP), and in a layered network block
coordinate descent solves each layer in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree, Scalar

from ..equilibrium import Solution
from ..equilibrium.adjoints import AbstractAdjoint
from ..equilibrium.solvers.base import AbstractSolver
from .base import AbstractEnergyModel

Interval = tuple[float, float]


def _is_tracer(a: Any) -> bool:
    return isinstance(a, jax.core.Tracer)


def _check_interval(name: str, bounds: Interval) -> Interval:
    if len(bounds) != 2:
        raise ValueError(f"ResistiveNetwork: `{name}` must be a (lower, upper) pair, got {bounds}.")
    lo, hi = float(bounds[0]), float(bounds[1])
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"ResistiveNetwork: `{name}` bounds hold NaN: {bounds}.")
    if lo > hi:
        raise ValueError(
            f"ResistiveNetwork: `{name}` lower bound {lo} is above its upper bound {hi}."
        )
    return lo, hi


def _check_conductances(name: str, g: Array, shape: tuple[int, ...]) -> None:
    if tuple(g.shape) != shape:
        raise ValueError(f"ResistiveNetwork: {name} must have shape {shape}, got {g.shape}.")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"ResistiveNetwork: {name} must be a real floating array, got {g.dtype}.")
    if _is_tracer(g):
        return
    a = np.asarray(g)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"ResistiveNetwork: {name} holds NaN or inf conductances.")
    if np.any(a < 0):
        raise ValueError(
            f"ResistiveNetwork: {name} holds negative conductances (min {a.min():.3g}); "
            "conductances must be >= 0 (see `ResistiveNetwork.project`)."
        )


def _concrete_real(beta: Any) -> float | None:
    """β as a Python float when it is a concrete real scalar, else None (traced or complex)."""
    if _is_tracer(beta) or jnp.iscomplexobj(beta) or jnp.ndim(beta) != 0:
        return None
    return float(beta)


def _pinv_apply(s: Any, w: Any, xp: Any) -> Any:
    """S⁺ W for a conductance block S that is PSD ("diag": a vector, else dense).

    A node (or a group of nodes) tied to nothing that is grounded gives a zero
    eigenvalue; S's null space is then orthogonal to W's columns (the whole matrix is
    PSD), so the pseudo-inverse is the right elimination and the flat direction simply
    drops out.
    """
    if s.ndim == 1:
        pos = s > 0
        return xp.where(pos, 1.0 / xp.where(pos, s, 1.0), 0.0)[:, None] * w
    lam, q = xp.linalg.eigh(s)
    keep = lam > s.shape[0] * xp.finfo(lam.dtype).eps * xp.max(xp.abs(lam))
    inv = xp.where(keep, 1.0 / xp.where(keep, lam, 1.0), 0.0)
    return q @ (inv[:, None] * (q.T @ w))


def _pair_power(g: Array, u: Array, v: Array) -> Array:
    r"""½ Σ_ij g_ij (u_i − v_j)², the power in the conductances between two layers.

    The value is computed as written; its derivatives come from the expansion

        ½ Σ_i u_i² (g 1)_i + ½ Σ_j (1ᵀ g)_j v_j² − uᵀ g v,

    whose gradient in g, ½ u² 1ᵀ + ½ 1 v²ᵀ − u vᵀ, summed over a batch (and EP's
    nudge points) is three matrix products. Differentiating the broadcast form
    instead makes XLA:CPU reduce a (batch, points, n_pre, n_post) array: 6 ms of a
    DRN-XS step's 6.4 at batch 4 (784x2-100-10x2), against 0.02 ms for the
    products, and it sums 1.25M float32 terms where the products sum 8. On that
    net's centered EP gradient (input gain 100 and 480) the expansion's float32 error
    to a float64 reference was 2.5e-5 against 2.9e-3 for the broadcast form.
    """
    exact = 0.5 * jnp.sum(g * (u[:, None] - v[None, :]) ** 2)
    expanded = 0.5 * (u**2 @ jnp.sum(g, axis=1) + jnp.sum(g, axis=0) @ v**2) - u @ g @ v
    return expanded + lax.stop_gradient(exact - expanded)


def output_conductance_matrix(
    weights: Sequence[Any], biases: Sequence[Any], xp: Any = jnp
) -> Float[Array, "n_out n_out"]:
    r"""S, the Kron reduction of a layered network's conductance matrix onto its output layer.

    With every source grounded (inputs and rails at 0 V) and no diode clipping, the
    power is ½ VᵀHV, H the network's (grounded) Laplacian. Minimising over the hidden
    voltages leaves ½ V_outᵀ S V_out, S = H_oo − H_oh H_hh⁻¹ H_ho: the conductance matrix
    the outputs see. The layers form a chain, so the elimination runs layer by layer,

        S_0 = diag(d_0),    S_k = diag(d_k) − W_kᵀ S_{k−1}⁺ W_k,

    d_k the total conductance at each node of free layer k and W_k the conductances
    from layer k−1 to layer k. The first step is diagonal, so for one hidden layer S
    costs O(n_h n_out²); every further hidden layer of width n costs an n×n
    eigendecomposition. `xp` is `jax.numpy` (traceable) or `numpy` (eager, float64).
    """
    num = len(weights)
    d = []
    for k in range(num):
        dk = xp.sum(weights[k], axis=0) + xp.sum(biases[k], axis=0)
        if k + 1 < num:
            dk = dk + xp.sum(weights[k + 1], axis=1)
        d.append(dk)
    s = d[0]
    for k in range(1, num):
        w = weights[k]
        s = xp.diag(d[k]) - w.T @ _pinv_apply(s, w, xp)
    return xp.diag(s) if s.ndim == 1 else 0.5 * (s + s.T)


class ResistiveNetwork(AbstractEnergyModel):
    r"""A layered deep resistive network (DRN) of conductances and ideal diodes.

    Layers: the input layer holds 2·n_in voltage sources (+g_in·x, −g_in·x), so that
    non-negative conductances can still realise both signs (Kendall et al. 2020);
    then hidden layers whose first half of nodes is *excitatory* (a diode to ground
    keeps V ≥ 0) and second half *inhibitory* (V ≤ 0); then an output layer of two
    nodes per class (no diodes by default), read as o_k = V_{k+} − V_{k−}. Each
    non-input node is tied to a rail at +V_b and a rail at −V_b through its bias
    conductances. Every conductance is ≥ 0.

    The state s = (V_1, ..., V_L) holds the free node voltages (hidden layers, then
    the output layer). The energy is the power dissipated,

        E(s, x) = P(V) = ½ Σ_l Σ_ij G^l_ij (V^l_i − V^{l+1}_j)²
                       + ½ Σ_j [b⁺_j (V_j − V_b)² + b⁻_j (V_j + V_b)²],

    and the cost is C = ½ Σ_o (V_o − T_o)² with targets T = (+y/2, −y/2)·v_t for the
    two halves of the output layer (so the prediction o aims at v_t·y). Nudging with
    β ≥ 0 is a conductance β tying each output node to its target voltage: F = P + βC
    is again a power. The steady state minimises F over the box the diodes allow —
    a convex QP; Kirchhoff's current law ∂F/∂V_j = 0 holds at every node off its
    bounds.

    **Negative nudges** (the −β phase of centered or negative EP) are a negative
    conductance −|β| at each output. F = P + βC is kept as the nudged energy: it is
    EP's definition, the `total_energy` every estimator differentiates, and what the
    authors' code minimises (Scellier 2024, no special case for β < 0). It is convex
    only while |β| is below the smallest eigenvalue λ_min(S) of the conductance
    matrix S the outputs see
    ([`eqprop_jax.models.resistive.output_conductance_matrix`][], diodes off; a
    clipped diode only fixes a node, which cannot make F less convex). Past that
    bound F has no minimiser (without diodes it falls without bound along an output
    direction), and a coordinate step, the stationary point of a 1-D parabola that
    may open downwards, sits on a saddle: the sweeps never settle and the estimate
    depends on how many ran. A convex stand-in (a current source sized from the free
    state, or a positive conductance to a target reflected through it) would be a
    different estimator, tied to the starting state. So `relax` **refuses** such a
    nudge: eagerly a `ValueError` naming the output node and the bound, under `jit`
    a run-time error (`eqx.error_if`) naming the node.
    [`ResistiveNetwork.max_negative_nudge`][] gives the bound: for a DRN, about the
    outputs' own conductances Σ_i g_ij + b⁺_j + b⁻_j, less what the hidden layer passes
    on (0.20 against 0.22 S at the weakest output of a (4, 3, 2) net at its default
    init, so centered EP's β = 1 is refused there; 4.4–4.7 S for DRN-XS at seeds 0–3).

    `step` is one exact block coordinate-descent sweep (Scellier 2024): with every
    other voltage fixed, F is a 1-D quadratic in V_j minimised at the conductance-
    weighted mean of its neighbours, then clipped to the diode bounds,

        V_j ← clip((Σ_i g_ij V_i + I_j) / Σ_i g_ij, lo_j, hi_j),

    and since a layered net is bipartite, all even layers are updated together, then
    all odd layers (state index: first hidden layer = 0). The sweep's fixed point is
    the QP's minimiser, so `relax` (Picard on `step`) serves EquilibriumProp, and
    `fixed_point` on the same sweep serves RecurrentBackprop and BPTT.

    Parameters (the model's floating arrays): `weights[l]` of shape (n_l, n_{l+1})
    and `biases[l]` of shape (2, n_{l+1}) (rows: to +V_b, to −V_b). Keep them ≥ 0
    after each optimiser update with `model = model.project()` (or
    [`eqprop_jax.models.resistive.clip_conductances`][] on any pytree holding
    networks); `relax` refuses negative conductances.

    Args:
        layer_sizes: (n_in, hidden..., n_classes): n_in input features (the input
            layer has 2·n_in nodes), hidden layer widths, number of classes (the
            output layer has 2·n_classes nodes).
        key: PRNG key for the initial conductances (uniform on [0, gain/√fan_in],
            i.e. Scellier's half-Kaiming init after clamping at 0, without the zeros).
        weights, biases: explicit conductances instead of a random init.
        input_gain: g_in, the input amplification.
        bias_voltage: V_b, the rail voltage.
        target_voltage: v_t, the amplitude of the target for the output difference.
        diodes: put the excitatory/inhibitory bounds on the hidden nodes; `False`
            gives a linear network.
        excitatory, inhibitory, output_bounds: the (lower, upper) voltage bounds of
            excitatory hidden, inhibitory hidden and output nodes.
        weight_gain, bias_gain: init scales.
        dtype: dtype of the random init.
    """

    weights: tuple[Float[Array, "n_pre n_post"], ...]
    biases: tuple[Float[Array, "2 n"], ...]
    layer_sizes: tuple[int, ...] = eqx.field(static=True)
    input_gain: float = eqx.field(static=True)
    bias_voltage: float = eqx.field(static=True)
    target_voltage: float = eqx.field(static=True)
    diodes: bool = eqx.field(static=True)
    excitatory: Interval = eqx.field(static=True)
    inhibitory: Interval = eqx.field(static=True)
    output_bounds: Interval = eqx.field(static=True)

    def __init__(
        self,
        layer_sizes: Sequence[int],
        *,
        key: PRNGKeyArray | None = None,
        weights: Sequence[Array] | None = None,
        biases: Sequence[Array] | None = None,
        input_gain: float = 1.0,
        bias_voltage: float = 1.0,
        target_voltage: float = 1.0,
        diodes: bool = True,
        excitatory: Interval = (0.0, math.inf),
        inhibitory: Interval = (-math.inf, 0.0),
        output_bounds: Interval = (-math.inf, math.inf),
        weight_gain: float = 1.0,
        bias_gain: float = 0.1,
        dtype: Any = jnp.float32,
    ):
        sizes = tuple(int(n) for n in layer_sizes)
        if len(sizes) < 2 or any(n < 1 for n in sizes):
            raise ValueError(
                "ResistiveNetwork: `layer_sizes` must be (n_in, hidden..., n_classes) with "
                f"positive entries, got {tuple(layer_sizes)}."
            )
        self.layer_sizes = sizes
        self.input_gain = float(input_gain)
        self.bias_voltage = float(bias_voltage)
        self.target_voltage = float(target_voltage)
        self.diodes = bool(diodes)
        self.excitatory = _check_interval("excitatory", excitatory)
        self.inhibitory = _check_interval("inhibitory", inhibitory)
        self.output_bounds = _check_interval("output_bounds", output_bounds)
        nodes = self.nodes
        w_shapes = [(a, b) for a, b in zip(nodes[:-1], nodes[1:], strict=True)]
        b_shapes = [(2, n) for n in nodes[1:]]
        if weights is None or biases is None:
            if key is None:
                raise ValueError(
                    "ResistiveNetwork: give `key` (random init) or both `weights` and `biases`."
                )
            keys = jax.random.split(key, 2 * len(w_shapes))
        if weights is None:
            weights = [
                jax.random.uniform(k, s, dtype, 0.0, weight_gain / math.sqrt(s[0]))
                for k, s in zip(keys[: len(w_shapes)], w_shapes, strict=True)
            ]
        if biases is None:
            biases = [
                jax.random.uniform(k, s, dtype, 0.0, bias_gain)
                for k, s in zip(keys[len(w_shapes) :], b_shapes, strict=True)
            ]
        weights, biases = (
            tuple(jnp.asarray(w) for w in weights),
            tuple(jnp.asarray(b) for b in biases),
        )
        if len(weights) != len(w_shapes) or len(biases) != len(b_shapes):
            raise ValueError(
                f"ResistiveNetwork: layer_sizes {sizes} need {len(w_shapes)} weight and "
                f"{len(b_shapes)} bias arrays, got {len(weights)} and {len(biases)}."
            )
        for i, (w, s) in enumerate(zip(weights, w_shapes, strict=True)):
            _check_conductances(f"weights[{i}]", w, s)
        for i, (b, s) in enumerate(zip(biases, b_shapes, strict=True)):
            _check_conductances(f"biases[{i}]", b, s)
        self.weights, self.biases = weights, biases

    # ---------------------------------------------------------------- structure
    @property
    def nodes(self) -> tuple[int, ...]:
        """Number of nodes per layer, input and output layers doubled."""
        s = self.layer_sizes
        return (2 * s[0], *s[1:-1], 2 * s[-1])

    @property
    def n_outputs(self) -> int:
        """Number of classes (the output layer has two nodes per class)."""
        return self.layer_sizes[-1]

    @property
    def holomorphic(self) -> bool:
        """True for a linear network (`diodes=False`, unbounded outputs): the power and
        the coordinate sweep are then polynomials and rational maps of (V, β), so
        complex nudges (holomorphic EP) are valid. Diode clipping has no complex form."""
        return not any(self._bounded(k) for k in range(len(self.weights)))

    def bounds(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """Per free layer, the (lower, upper) voltage bounds the diodes impose."""
        out = []
        for k, n in enumerate(self.nodes[1:]):
            if k == len(self.nodes) - 2:
                lo, hi = np.full(n, self.output_bounds[0]), np.full(n, self.output_bounds[1])
            elif self.diodes:
                n_exc = (n + 1) // 2
                lo = np.concatenate(
                    [np.full(n_exc, self.excitatory[0]), np.full(n - n_exc, self.inhibitory[0])]
                )
                hi = np.concatenate(
                    [np.full(n_exc, self.excitatory[1]), np.full(n - n_exc, self.inhibitory[1])]
                )
            else:
                lo, hi = np.full(n, -np.inf), np.full(n, np.inf)
            out.append((lo, hi))
        return tuple(out)

    def output_node_name(self, j: int) -> str:
        """'output node j (class k, + side)': which class pair, and which half, node j is."""
        k = self.n_outputs
        side = "+" if j < k else "−"
        return f"output node {j} (class {j % k}, {side} side)"

    def max_negative_nudge(self) -> Scalar:
        r"""λ_min(S): the largest |β| a negative nudge may take, F = P + βC staying convex.

        S is the outputs' conductance matrix
        ([`eqprop_jax.models.resistive.output_conductance_matrix`][]). F is
        strictly convex for every β > −λ_min(S), whatever the diodes do, and for
        β < −λ_min(S) it is not convex (without diodes: not bounded below). Never
        larger than the smallest total conductance Σ_i g_ij + b⁺_j + b⁻_j at an
        output node. Traceable.
        """
        return self._convexity(jnp)[0]

    def _convexity(self, xp: Any) -> tuple[Any, Any]:
        """(λ_min(S), the output node that dominates its eigenvector)."""
        if xp is np:
            w = [np.asarray(a, np.float64) for a in self.weights]
            b = [np.asarray(a, np.float64) for a in self.biases]
        else:
            # eigh has no half-precision kernels; the bound is checked in at least float32.
            up = jnp.promote_types(self.weights[0].dtype, jnp.float32)
            w = [a.astype(up) for a in self.weights]
            b = [a.astype(up) for a in self.biases]
        lam, vec = xp.linalg.eigh(output_conductance_matrix(w, b, xp))
        return lam[0], xp.argmax(xp.abs(vec[:, 0]))

    def check_nudge(self, x: Array, beta: Any) -> Array:
        """Refuse a negative β at or past −[`max_negative_nudge`][] (see the class docstring).

        Concrete β and conductances: a `ValueError` naming the output node and the bound.
        Otherwise returns `x` wrapped in a run-time check (`eqx.error_if`) that names the
        node. `relax` calls it; estimators may call it first, before any solve.
        """
        if jnp.iscomplexobj(beta):
            # Holomorphic EP: a linear net's complex linear solve; its status says
            # whether the sweeps converged.
            return x
        b = _concrete_real(beta)
        if b is not None and b >= 0:
            return x
        params = (*self.weights, *self.biases)
        if not any(_is_tracer(a) for a in params):
            lam, node = self._convexity(np)
            lam, node = float(lam), int(node)
            own = float(
                np.sum(np.asarray(self.weights[-1], np.float64)[:, node])
                + np.sum(np.asarray(self.biases[-1], np.float64)[:, node])
            )
            msg = (
                "ResistiveNetwork: {what} makes the dissipated power "
                "F = P + βC non-convex, so the network has no steady state (a coordinate "
                "step would sit on a saddle). The outputs' smallest effective conductance, "
                f"λ_min(S) = {lam:.6g} S, lies along {self.output_node_name(node)}, whose "
                f"own conductances sum to {own:.6g} S: a negative nudge needs "
                f"β > {-lam:.6g}. Use a smaller |β|, the positive variant, or larger output "
                "conductances (`model.max_negative_nudge()` gives the bound)."
            )
            if b is not None:
                if b <= -lam:
                    raise ValueError(msg.format(what=f"the nudge β = {b:.6g}"))
                return x
            what = f"a nudge β ≤ {-lam:.6g}"
            return eqx.error_if(x, beta <= -lam, msg.format(what=what))
        lam, node = self._convexity(jnp)
        msgs = [
            f"ResistiveNetwork: a negative nudge β makes the dissipated power F = P + βC "
            f"non-convex along {self.output_node_name(j)}: β must stay above "
            "−λ_min(S), S the outputs' conductance matrix (`model.max_negative_nudge()` "
            "gives it; it is at most that node's own total conductance). Use a smaller "
            "|β|, the positive variant, or larger output conductances."
            for j in range(self.nodes[-1])
        ]
        return eqx.branched_error_if(x, beta <= -lam, node, msgs)

    def _bounded(self, k: int) -> bool:
        lo, hi = self.bounds()[k]
        return bool(np.any(np.isfinite(lo)) or np.any(np.isfinite(hi)))

    def input_voltages(self, x: Float[Array, " n_in"]) -> Float[Array, " 2*n_in"]:
        """The input layer's source voltages (+g_in·x, −g_in·x)."""
        self._check_x(x)
        return self.input_gain * jnp.concatenate([x, -x])

    def targets(self, y: Array) -> Float[Array, " 2*n_classes"]:
        """Target voltages T = (+y/2, −y/2)·v_t; `y` is one-hot (or soft), or an int label."""
        y = jnp.asarray(y)
        k = self.n_outputs
        if y.ndim == 0 and jnp.issubdtype(y.dtype, jnp.integer):
            y = jax.nn.one_hot(y, k)
        if y.shape != (k,):
            raise ValueError(
                f"ResistiveNetwork: a target must be an int label or have shape ({k},), "
                f"got shape {y.shape}."
            )
        half = 0.5 * self.target_voltage * y
        return jnp.concatenate([half, -half])

    def _check_x(self, x: Array) -> None:
        n_in = self.layer_sizes[0]
        if jnp.ndim(x) != 1 or jnp.shape(x)[0] != n_in:
            raise ValueError(
                f"ResistiveNetwork: input width must be {n_in} (one example, shape ({n_in},)); "
                f"got shape {jnp.shape(x)}. Estimators vmap over the batch axis."
            )

    def expected_input(self) -> tuple[tuple[int, ...], str]:
        return (self.layer_sizes[0],), (
            f" (n_in = {self.layer_sizes[0]} input features; the input layer has "
            f"{2 * self.layer_sizes[0]} nodes)"
        )

    def check_state(self, s: Sequence[Array]) -> None:
        """Raise if `s` has the wrong layer shapes, or (eagerly) holds NaN/inf voltages."""
        shapes = tuple((n,) for n in self.nodes[1:])
        got = tuple(jnp.shape(v) for v in s)
        if got != shapes:
            raise ValueError(f"ResistiveNetwork: state layer shapes must be {shapes}, got {got}.")
        for k, v in enumerate(s):
            if not _is_tracer(v) and not np.all(np.isfinite(np.asarray(v))):
                raise ValueError(f"ResistiveNetwork: state layer {k} holds NaN or inf voltages.")

    # ---------------------------------------------------------------- energy
    def init_state(self, x: Float[Array, " n_in"]) -> tuple[Array, ...]:
        """Zero volts, clipped into the diodes' bounds."""
        self._check_x(x)
        dtype = jnp.result_type(x, *self.weights)
        return tuple(
            jnp.clip(jnp.zeros(len(lo), dtype), lo.astype(dtype), hi.astype(dtype))
            for lo, hi in self.bounds()
        )

    def energy(self, s: Sequence[Array], x: Float[Array, " n_in"]) -> Scalar:
        """The power P(V) dissipated in the conductances (see the class docstring)."""
        layers = (self.input_voltages(x), *s)
        p = 0.0
        for g, v_pre, v_post in zip(self.weights, layers[:-1], layers[1:], strict=True):
            p = p + _pair_power(g, v_pre, v_post)
        vb = self.bias_voltage
        for b, v in zip(self.biases, s, strict=True):
            p = p + 0.5 * jnp.sum(b[0] * (v - vb) ** 2 + b[1] * (v + vb) ** 2)
        return p

    def cost(self, s: Sequence[Array], y: Array) -> Scalar:
        """C = ½ Σ_o (V_o − T_o)²: the power in unit conductances tying outputs to targets."""
        return 0.5 * jnp.sum((s[-1] - self.targets(y)) ** 2)

    def predict(self, s: Sequence[Array]) -> Array:
        """Class scores o_k = V_{k+} − V_{k−}."""
        k = self.n_outputs
        return s[-1][:k] - s[-1][k:]

    # ---------------------------------------------------------------- dynamics
    def _layer_update(self, k: int, layers: Sequence[Array], y: Array, beta: Any) -> Array:
        """argmin over layer k (state index) of F with the other layers fixed, then clipped."""
        w_in = self.weights[k]
        a = jnp.sum(w_in, axis=0) + self.biases[k][0] + self.biases[k][1]
        b = layers[k] @ w_in + self.bias_voltage * (self.biases[k][0] - self.biases[k][1])
        if k + 1 < len(self.weights):
            w_out = self.weights[k + 1]
            a = a + jnp.sum(w_out, axis=1)
            b = b + w_out @ layers[k + 2]
        else:
            a = a + beta
            b = b + beta * self.targets(y)
        old = layers[k + 1]
        # A node with no conductance at all has a flat energy: it keeps its voltage.
        connected = a != 0
        v = jnp.where(connected, b / jnp.where(connected, a, 1), old)
        if self._bounded(k):
            if jnp.iscomplexobj(v):
                raise TypeError(
                    "ResistiveNetwork: diode bounds need real voltages; a complex β "
                    "(holomorphic EP) needs `diodes=False` and unbounded outputs."
                )
            lo, hi = self.bounds()[k]
            v = jnp.clip(v, jnp.asarray(lo, v.dtype), jnp.asarray(hi, v.dtype))
        return v.astype(old.dtype)

    def step(self, s: Sequence[Array], x: Array, y: Array, beta: Any) -> tuple[Array, ...]:
        """One exact block coordinate-descent sweep: even layers, then odd layers."""
        layers = [self.input_voltages(x), *s]
        num = len(s)
        for parity in (0, 1):
            for k in range(parity, num, 2):
                layers[k + 1] = self._layer_update(k, layers, y, beta)
        return tuple(layers[1:])

    def relax(
        self,
        x: Array,
        y: Array,
        beta: Any = 0.0,
        s0: Sequence[Array] | None = None,
        *,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint | None = None,
    ) -> Solution:
        """`AbstractEnergyModel.relax` after checking the input, the state, the conductances and β.

        Checks run eagerly on concrete arrays; under `jit` the NaN, sign and convexity
        checks become runtime errors (`eqx.error_if`). A negative β at or past
        −[`max_negative_nudge`][] is refused (see the class docstring).
        """
        self._check_x(x)
        if s0 is not None:
            self.check_state(s0)
            s0 = tuple(
                eqx.error_if(v, ~jnp.all(jnp.isfinite(v)), "ResistiveNetwork: s0 holds NaN/inf.")
                for v in s0
            )
        if not _is_tracer(x) and not np.all(np.isfinite(np.asarray(x))):
            raise ValueError("ResistiveNetwork: the input x holds NaN or inf voltages.")
        x = eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), "ResistiveNetwork: input x holds NaN/inf.")
        for i, w in enumerate(self.weights):
            _check_conductances(f"weights[{i}]", w, w.shape)
        for i, b in enumerate(self.biases):
            _check_conductances(f"biases[{i}]", b, b.shape)
        neg = jnp.array(False)
        for g in (*self.weights, *self.biases):
            neg = neg | jnp.any(g < 0)
        x = eqx.error_if(x, neg, "ResistiveNetwork: negative conductances; call model.project().")
        x = self.check_nudge(x, beta)
        return AbstractEnergyModel.relax(self, x, y, beta, s0, solver=solver, adjoint=adjoint)

    # ---------------------------------------------------------------- training
    def project(self) -> ResistiveNetwork:
        """The same network with every conductance clipped at 0 (call after each update)."""
        return eqx.tree_at(
            lambda m: (m.weights, m.biases),
            self,
            (
                tuple(jnp.maximum(w, 0) for w in self.weights),
                tuple(jnp.maximum(b, 0) for b in self.biases),
            ),
        )


def clip_conductances(tree: PyTree) -> PyTree:
    """Apply [`ResistiveNetwork.project`][] to every network inside `tree`.

    Use after `eqx.apply_updates(model, updates)` in a training loop, so that every
    conductance stays ≥ 0 (projected SGD, as in Scellier 2024's code).
    """
    is_net = lambda t: isinstance(t, ResistiveNetwork)
    return jax.tree_util.tree_map(lambda t: t.project() if is_net(t) else t, tree, is_leaf=is_net)


def local_ep_gradient(
    model: ResistiveNetwork,
    x: Float[Array, " n_in"],
    s1: Sequence[Array],
    s2: Sequence[Array],
    beta1: Any,
    beta2: Any,
) -> ResistiveNetwork:
    r"""EP's gradient estimate from voltage drops alone, one conductance at a time.

    ∂P/∂g_ij = ½ (ΔV_ij)², so EP's estimate (Scellier & Bengio 2017; Kendall et al.
    2020) for each conductance is

        ĝ_ij = [(ΔV_ij^{β2})² − (ΔV_ij^{β1})²] / (2 (β2 − β1)),

    with ΔV_ij the voltage across g_ij at the equilibria s1 = s^{β1}, s2 = s^{β2}
    (for a bias conductance, the drop to its rail). The SGD update is Δg = −η ĝ,
    i.e. Δg_ij ∝ −[(ΔV^β)² − (ΔV^0)²]/(2β) for the positive variant (β1 = 0, β2 = β).
    No derivative of the energy is taken: each conductance sees only its own drop.

    The difference of squares is computed as (ΔV² − ΔV¹)(ΔV² + ΔV¹), the first factor
    from the change of each node's voltage between the phases. Subtracting the squares
    themselves loses the signal in float32 once the drops are large (tens to hundreds
    of volts at input gains 50–500, which a nudge changes by millivolts): on a
    784-100-10 net and 16 MNIST images, the input conductances' estimate came out
    0.3% off its float64 value that way, 7e-8 factored.

    Returns a model-shaped pytree (as `eqx.filter(model, eqx.is_inexact_array)`,
    for one example) whose `weights` and `biases` hold ĝ.
    """
    one = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], (x, tuple(s1), tuple(s2)))
    return batch_local_ep_gradient(model, *one, beta1, beta2)


def batch_local_ep_gradient(
    model: ResistiveNetwork,
    x: Float[Array, "batch n_in"],
    s1: Sequence[Array],
    s2: Sequence[Array],
    beta1: Any,
    beta2: Any,
) -> ResistiveNetwork:
    r"""The batch mean of [`local_ep_gradient`][] (states with a leading batch axis).

    Per conductance the product of the two factors expands into

        (δa_i − δb_j)(σa_i − σb_j) = δa_i σa_i + δb_j σb_j − δa_i σb_j − σa_i δb_j,

    (δ the change of a node's voltage between the phases, σ its sum), so the batch
    mean is two vectors and two matrix products, each term already of the size of
    the result (no difference of large squares). Averaging the per-example (n_pre,
    n_post) products instead makes XLA:CPU reduce a (batch, n_pre, n_post) array
    at a few GFLOP/s: 6 ms of a 784x2-100-10x2 step at batch 4, against 0.05 ms.
    """
    vin = jax.vmap(model.input_voltages)(x)
    vb = model.bias_voltage
    n = x.shape[0]
    scale = 1.0 / (2 * (beta2 - beta1))
    pre1, pre2 = (vin, *s1[:-1]), (vin, *s2[:-1])

    def weight_term(a1, a2, b1, b2):
        da, sa, db, sb = a2 - a1, a2 + a1, b2 - b1, b2 + b1
        cross = (da.T @ sb + sa.T @ db) / n
        return scale * (
            jnp.mean(da * sa, axis=0)[:, None] + jnp.mean(db * sb, axis=0)[None, :] - cross
        )

    gw = tuple(
        weight_term(a1, a2, b1, b2) for a1, a2, b1, b2 in zip(pre1, pre2, s1, s2, strict=True)
    )
    gb = tuple(
        scale * jnp.mean((v2 - v1)[:, None] * jnp.stack([v2 + v1 - 2 * vb, v2 + v1 + 2 * vb], 1), 0)
        for v1, v2 in zip(s1, s2, strict=True)
    )
    grads = eqx.filter(model, eqx.is_inexact_array)
    return eqx.tree_at(lambda m: (m.weights, m.biases), grads, (gw, gb))
