"""Compare a gradient estimate with a reference, leaf by leaf and overall."""

from __future__ import annotations

import math

import equinox as eqx
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree


class Alignment(eqx.Module):
    """Agreement of two vectors (or pytrees flattened to one vector).

    - cosine ⟨ĝ, g⟩ / (‖ĝ‖ ‖g‖) and `angle` = arccos(cosine) in degrees;
    - `rel_error` ‖ĝ - g‖ / ‖g‖ (normalised by the reference);
    - `norm_ratio` ‖ĝ‖ / ‖g‖;
    - `sign_agreement`: fraction of entries with sign(ĝ_i) = sign(g_i), over the
      entries where g_i != 0.
    """

    cosine: float
    angle: float
    rel_error: float
    norm_ratio: float
    sign_agreement: float
    size: int


def _align(est: np.ndarray, ref: np.ndarray) -> Alignment:
    est = np.asarray(est, np.float64).ravel()
    ref = np.asarray(ref, np.float64).ravel()
    ne, nr = np.linalg.norm(est), np.linalg.norm(ref)
    cos = float(est @ ref / (ne * nr)) if ne > 0 and nr > 0 else float("nan")
    angle = math.degrees(math.acos(min(1.0, max(-1.0, cos)))) if cos == cos else float("nan")
    rel = float(np.linalg.norm(est - ref) / nr) if nr > 0 else float("nan")
    ratio = float(ne / nr) if nr > 0 else float("nan")
    mask = ref != 0
    sign = float(np.mean(np.sign(est[mask]) == np.sign(ref[mask]))) if mask.any() else float("nan")
    return Alignment(cos, angle, rel, ratio, sign, int(ref.size))


class AlignmentReport(eqx.Module):
    """Per-leaf and overall [`Alignment`][]; `str(report)` is a table."""

    per_leaf: dict[str, Alignment]
    overall: Alignment

    def table(self) -> str:
        head = f"{'leaf':<40} {'size':>8} {'cosine':>9} {'angle°':>8} {'rel.err':>10} "
        head += f"{'‖ĝ‖/‖g‖':>8} {'sign':>6}"
        rows = [head, "-" * len(head)]
        items = list(self.per_leaf.items()) + [("overall", self.overall)]
        for name, a in items:
            rows.append(
                f"{name[:40]:<40} {a.size:>8d} {a.cosine:>9.5f} {a.angle:>8.3f} "
                f"{a.rel_error:>10.3e} {a.norm_ratio:>8.4f} {a.sign_agreement:>6.3f}"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def gradient_alignment(estimate: PyTree, reference: PyTree) -> AlignmentReport:
    """Compare `estimate` with `reference` (two pytrees of one structure).

    Leaves that are `None` in either are skipped (e.g. non-trainable fields after
    `eqx.filter`). Complex leaves are compared by their real part.

    Returns:
        An [`AlignmentReport`][] with one [`Alignment`][] per leaf (keyed by its path)
        and one for all leaves concatenated.
    """
    est_leaves = jtu.tree_leaves_with_path(estimate)
    ref_leaves = jtu.tree_leaves_with_path(reference)
    if [p for p, _ in est_leaves] != [p for p, _ in ref_leaves]:
        raise ValueError(
            "gradient_alignment: estimate and reference have different pytree structures: "
            f"{jtu.tree_structure(estimate)} vs {jtu.tree_structure(reference)}."
        )
    per_leaf, all_e, all_r = {}, [], []
    for (path, e), (_, r) in zip(est_leaves, ref_leaves, strict=True):
        e, r = np.real(np.asarray(e)), np.real(np.asarray(r))
        if e.shape != r.shape:
            raise ValueError(
                f"gradient_alignment: leaf {jtu.keystr(path)} has shape {e.shape} in the "
                f"estimate and {r.shape} in the reference."
            )
        per_leaf[jtu.keystr(path) or "<root>"] = _align(e, r)
        all_e.append(e.ravel())
        all_r.append(r.ravel())
    if not all_e:
        raise ValueError("gradient_alignment: no array leaves to compare.")
    overall = _align(np.concatenate(all_e), np.concatenate(all_r))
    return AlignmentReport(per_leaf, overall)


def per_step_alignment(estimate: PyTree, reference: PyTree) -> list[Alignment]:
    """The overall [`Alignment`][] at each step t of two pytrees whose leaves share a
    leading step axis (the step-by-step traces: EP's increments against BPTT's or
    recurrent backprop's)."""
    steps = jtu.tree_leaves(estimate)[0].shape[0]

    def at(tree, t):
        return jtu.tree_map(lambda a: a[t], tree)

    return [gradient_alignment(at(estimate, t), at(reference, t)).overall for t in range(steps)]


def per_step_summary(state: list[Alignment], param: list[Alignment]) -> dict[str, np.ndarray]:
    """Per-step relative errors and sign agreements of the state and parameter
    alignments of a step-by-step trace, as arrays over the steps."""
    return {
        "state_rel_error": np.array([a.rel_error for a in state]),
        "state_sign": np.array([a.sign_agreement for a in state]),
        "param_rel_error": np.array([a.rel_error for a in param]),
        "param_sign": np.array([a.sign_agreement for a in param]),
    }


def angle(a, b) -> float:
    """Angle in degrees between two arrays (or pytrees), as `gradient_alignment` computes it."""
    return gradient_alignment(a, b).overall.angle


__all__ = [
    "Alignment",
    "AlignmentReport",
    "angle",
    "gradient_alignment",
    "per_step_alignment",
    "per_step_summary",
]
