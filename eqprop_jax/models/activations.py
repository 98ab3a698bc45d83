"""The activation functions of the Equilibrium Propagation papers.

Each is a plain function of a `jnp` array. `tanh` and `sigmoid4` are holomorphic,
so they also accept complex input (holomorphic EP, Laborieux & Zenke 2022); the
piecewise-linear ones are real only.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array


def sigmoid4(x: Array) -> Array:
    r"""σ(x) = 1 / (1 + e^{-4(x - 1/2)}) (Ernoult et al. 2019, P-1h and P-2h).

    Its slope at x = 1/2 is 1, so it stands in for the hard sigmoid with a smooth,
    holomorphic function. Written with `exp` rather than `jax.nn.sigmoid` so that it
    stays holomorphic on complex input.
    """
    return 1 / (1 + jnp.exp(-4 * (x - 0.5)))


def sigmoid(x: Array) -> Array:
    r"""The logistic function σ(x) = 1 / (1 + e^{-x}) (holomorphic)."""
    return 1 / (1 + jnp.exp(-x))


def tanh(x: Array) -> Array:
    r"""tanh(x) (holomorphic)."""
    return jnp.tanh(x)


def hard_sigmoid(x: Array) -> Array:
    r"""ρ(x) = clip(x, 0, 1) (Scellier & Bengio 2017; Ernoult et al. 2019 P-conv)."""
    _require_real(x, "hard_sigmoid")
    return jnp.clip(x, 0, 1)


def clip_half(x: Array) -> Array:
    r"""ρ(x) = clip(x / 2, 0, 1) (Laborieux et al. 2021, CIFAR-10 convnets)."""
    _require_real(x, "clip_half")
    return jnp.clip(x / 2, 0, 1)


def identity(x: Array) -> Array:
    """ρ(x) = x (linear networks; holomorphic)."""
    return x


def _require_real(x, name):
    if jnp.iscomplexobj(x):
        raise TypeError(
            f"activation {name!r} is not holomorphic and cannot take complex input; use "
            "'tanh', 'sigmoid' or 'sigmoid4' for holomorphic EP."
        )


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "sigmoid4": sigmoid4,
    "sigmoid": sigmoid,
    "tanh": tanh,
    "hard_sigmoid": hard_sigmoid,
    "clip_half": clip_half,
    "identity": identity,
}

HOLOMORPHIC = frozenset({"sigmoid4", "sigmoid", "tanh", "identity"})

# The interval a state may be clipped to by gradient dynamics (Scellier & Bengio
# 2017 keep s in [0, 1]: outside it the hard sigmoid is flat and the state drifts).
STATE_RANGE: dict[str, tuple[float, float] | None] = {
    "hard_sigmoid": (0.0, 1.0),
    "clip_half": (0.0, 2.0),
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """The activation called `name` (one of `ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}."
        ) from None
