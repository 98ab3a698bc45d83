"""Several gradient estimators against one reference, on one batch: data, not a report.

`compare_estimators` runs each estimator the way a training step does (its
`pre_step`, e.g. DTP's feedback training, then the estimate) and compares its
gradient with the reference's through [`gradient_alignment`][], leaf by leaf
(per layer) and overall: cosine, angle, relative error ‖ĝ − g‖/‖g‖, norm ratio and
sign agreement. Printing and plotting are the caller's (the command line's `align`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, PRNGKeyArray, PyTree

from ..estimators.base import Estimator
from .alignment import AlignmentReport, gradient_alignment


class Comparison(eqx.Module):
    """What [`compare_estimators`][] measured.

    - `reports[name]`: the [`AlignmentReport`][] of that estimator's gradient against
      the reference (`.per_leaf` per layer, `.overall`);
    - `losses[name]`, `seconds[name]`: its loss and wall time (compilation included);
    - `reference_loss`, `reference_grads`: the reference's loss and gradient (pass the
      gradient back as `reference=` to compare more estimators without recomputing it).
    """

    reports: dict[str, AlignmentReport]
    losses: dict[str, float]
    seconds: dict[str, float]
    reference_loss: float | None
    reference_grads: PyTree

    def as_dict(self) -> dict[str, dict]:
        """Plain data for JSON: per estimator its time and the overall and per-leaf
        alignments (angle, cosine, rel_error, norm_ratio, sign_agreement)."""

        def row(a):
            return {
                "angle": a.angle,
                "cosine": a.cosine,
                "rel_error": a.rel_error,
                "norm_ratio": a.norm_ratio,
                "sign_agreement": a.sign_agreement,
            }

        return {
            name: {
                "time_s": self.seconds[name],
                "overall": row(rep.overall),
                "per_leaf": {k: row(v) for k, v in rep.per_leaf.items()},
            }
            for name, rep in self.reports.items()
        }

    def table(self) -> str:
        """One row per estimator: the overall alignment."""
        head = f"{'estimator':<16} {'angle°':>8} {'cosine':>9} {'rel.err':>10} "
        head += f"{'‖ĝ‖/‖g‖':>8} {'sign':>6}"
        rows = [head, "-" * len(head)]
        for name, rep in self.reports.items():
            a = rep.overall
            rows.append(
                f"{name:<16} {a.angle:>8.3f} {a.cosine:>9.5f} {a.rel_error:>10.3e} "
                f"{a.norm_ratio:>8.4f} {a.sign_agreement:>6.3f}"
            )
        return "\n".join(rows)


@eqx.filter_jit
def _estimate(estimator, model, x, y, key):
    model = estimator.pre_step(model, x, y, key=key)
    loss, grads, _ = estimator(model, x, y, key=key)
    return loss, grads


def compare_estimators(
    model: PyTree,
    estimators: Mapping[str, Estimator],
    x: Array,
    y: Array,
    *,
    reference: Estimator | PyTree,
    key: PRNGKeyArray | None = None,
) -> Comparison:
    """Each of `estimators` on the batch (x, y), compared with `reference`.

    Args:
        model: the model every estimator starts from.
        estimators: name -> [`Estimator`][]; each runs `pre_step` then its estimate,
            with the same `key`.
        reference: an [`Estimator`][] (run like the others; e.g. implicit RBP for an
            energy model, [`eqprop_jax.Backprop`][] for a feedforward one), or a
            gradient pytree already computed (e.g. `Comparison.reference_grads`).
        key: PRNG key for estimators that draw noise (default `PRNGKey(0)`).

    Returns:
        A [`Comparison`][]. Raises `ValueError` when the reference gradient is not
        finite (its solve failed), since every alignment would be meaningless.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    for name, est in estimators.items():
        if not isinstance(est, Estimator):
            raise TypeError(
                f"compare_estimators: {name!r} is not an Estimator, got {type(est).__name__}."
            )
    ref_loss = None
    if isinstance(reference, Estimator):
        ref_loss, reference = _estimate(reference, model, x, y, key)
        ref_loss = float(ref_loss)
    if not all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree_util.tree_leaves(reference)):
        raise ValueError(
            "compare_estimators: the reference gradient has NaN/inf entries (its solve "
            "failed); nothing can be compared with it."
        )
    reports, losses, seconds = {}, {}, {}
    for name, est in estimators.items():
        t0 = time.perf_counter()
        loss, grads = _estimate(est, model, x, y, key)
        grads = jax.block_until_ready(grads)
        seconds[name] = time.perf_counter() - t0
        losses[name] = float(loss)
        reports[name] = gradient_alignment(grads, reference)
    return Comparison(reports, losses, seconds, ref_loss, reference)


__all__ = ["Comparison", "compare_estimators"]
