"""Backpropagation through time: autodiff through a fixed number of relaxation steps."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..equilibrium import Solution, Stats
from .base import Estimator
from .checks import check_batch, check_steps
from .phases import fixed_steps_result, max_abs_change, nan_if_nonfinite, phase_aux


class BPTT(Estimator):
    r"""dL(s_T)/dθ by autodiff through T = `steps` free relaxation steps from `init_state`.

    s_{t+1} = step(s_t, x, y, β=0), unrolled with `lax.scan`, and the loss read at s_T:
    the reference of Ernoult et al. 2019, whose EP updates match BPTT's step by step.
    With `truncate=K` the first T − K steps run without gradient and only the last K
    are differentiated (their "truncated BPTT", K = EP's nudged steps).

    `aux`: "state" (s_T, batched), "predictions", "stats" ([`eqprop_jax.Stats`][]
    with `steps` = T and `residual` = max |s_T − s_{T−1}|, unscaled) and "result"
    (`max_steps`, or `nonfinite` where s_T holds NaN or inf; see
    [`eqprop_jax.estimators.Estimator`][]).
    """

    steps: int = eqx.field(static=True)
    truncate: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        check_steps("BPTT", steps=self.steps)
        if self.truncate is not None and not (
            isinstance(self.truncate, int) and 1 <= self.truncate <= self.steps
        ):
            raise ValueError(
                f"BPTT: `truncate` must lie in [1, steps={self.steps}], got {self.truncate!r}."
            )

    def __call__(
        self, model, x: Array, y: Array, *, key: PRNGKeyArray | None = None
    ) -> tuple[Array, PyTree, dict]:
        y = check_batch("BPTT", model, x, y)
        n_grad = self.steps if self.truncate is None else self.truncate

        def run(m, xi, yi):
            def body(s, _):
                return m.step(s, xi, yi, 0.0), None

            s = m.init_state(xi)
            if n_grad < self.steps:
                s = lax.stop_gradient(lax.scan(body, s, length=self.steps - n_grad)[0])
            s_prev = s
            if n_grad > 1:
                s_prev = lax.scan(body, s, length=n_grad - 1)[0]
            s = m.step(s_prev, xi, yi, 0.0)
            return m.loss(s, yi), (s, max_abs_change(s, s_prev))

        def batch_loss(m):
            losses, aux = jax.vmap(run, in_axes=(None, 0, 0))(m, x, y)
            return jnp.mean(losses), aux

        (loss, (s, change)), grads = eqx.filter_value_and_grad(batch_loss, has_aux=True)(model)
        n = jnp.shape(x)[0]
        stats = Stats(jnp.full((n,), self.steps, jnp.int32), lax.stop_gradient(change))
        free = Solution(s, jax.vmap(fixed_steps_result)(s), stats)
        aux = {"state": s, "predictions": jax.vmap(model.predict)(s), **phase_aux(free)}
        loss, grads = nan_if_nonfinite(loss, grads, aux)
        return loss, grads, aux
