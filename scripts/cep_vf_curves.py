"""Continual EP and vector-field EP against EP on MNIST 784-512-10: error and gradient angle.

Trains one method through `eqprop_jax.train.fit`, one epoch at a time (resuming from
the run's checkpoint: `_common.fit_by_epoch`), and after every epoch measures, on
fixed training batches, the angle between the method's update and the implicit
gradient of the loss at the free fixed point (recurrent backprop, Krylov adjoint,
tight solve). Methods:

- `ep`: EP (positive nudge) on the P-1h net (preset `ernoult2019-p1h`'s model);
- `cep`: continual EP (Ernoult et al. 2020) on the same net: weights move at every
  nudged step with rate η, the same η as the SGD step (see `ContinualEP`);
- `vf-<deg>`: vector-field EP (Scellier et al. 2018) on a `VectorFieldMLP` whose
  feedback weights start at <deg> degrees from the transposed forward ones (0: the
  symmetric, energy-based case, where VF-EP is EP).

    python scripts/cep_vf_curves.py --method cep --epochs 10 --out /work/runs/cep
    python scripts/plot_curves.py ... (test error); the angles are in angles.jsonl

Writes `metrics.jsonl` (fit's) and `angles.jsonl` (epoch, angle median/p90 over the
batches, feedback angle for VF nets) in --out.

`--eta-scan S [S ...]` (method `cep` only) trains nothing: on the net in --out's
checkpoint (or the initial net when there is none) it measures, on the same batches,
the angle of C-EP with every rate scaled by S to EP (same β, T, K) and to the implicit
gradient, and writes `eta_scan.json`. C-EP's estimate tends to EP's as η → 0 (the
weights barely move during the nudged phase); the scan shows how far the run's η is
from that limit.

    python scripts/cep_vf_curves.py --method cep --out /work/runs/cep --eta-scan 1 0.1 0.01
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _common import angle_deg, fit_by_epoch, load_images

from eqprop_jax.data import steps_per_epoch
from eqprop_jax.equilibrium import BiCGStab, Implicit
from eqprop_jax.equilibrium.solvers.picard import Picard
from eqprop_jax.estimators.continual_ep import ContinualEP
from eqprop_jax.estimators.ep import EquilibriumProp
from eqprop_jax.estimators.rbp import RecurrentBackprop
from eqprop_jax.estimators.vector_field_ep import VectorFieldEP
from eqprop_jax.models.vector_field import VectorFieldMLP
from eqprop_jax.presets import get_preset
from eqprop_jax.train import TrainConfig
from eqprop_jax.train.checkpoint import CHECKPOINT, load_checkpoint
from eqprop_jax.train.optim import layer_indices, trainable


def build(args, key):
    """(model, estimator, per-layer learning rates) of a method."""
    rates = (args.lr_in, args.lr_out)
    if args.method in ("ep", "cep"):
        preset = get_preset("ernoult2019-p1h")
        model = preset.model(key, (784,), 10)
        if args.method == "ep":
            est = EquilibriumProp(
                beta=args.beta, variant="positive", free_steps=args.T, nudged_steps=args.K
            )
        else:
            eta = jax.tree_util.tree_map(lambda i: rates[i], layer_indices(trainable(model)))
            est = ContinualEP(
                beta=args.beta, learning_rate=eta, free_steps=args.T, nudged_steps=args.K
            )
        return model, est, rates
    if not args.method.startswith("vf-"):
        raise SystemExit(f"unknown method {args.method!r}: ep, cep or vf-<degrees>.")
    angle = float(args.method[3:])
    model = VectorFieldMLP(
        (784, 512, 10),
        key=key,
        feedback_angle=angle,
        activation=args.activation,
        step_size=args.step_size,
    )
    est = VectorFieldEP(beta=args.beta, variant="positive", free_steps=args.T, nudged_steps=args.K)
    # The feedback B_1 carries the output layer down, as W_1ᵀ: it gets W_1's rate.
    lr = {r"\.weights\[0\]|\.biases\[0\]": args.lr_in, "*": args.lr_out}
    return model, est, lr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True, help="ep, cep or vf-<degrees>")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--beta", type=float, default=0.2)
    p.add_argument("--T", type=int, default=40, help="free steps")
    p.add_argument("--K", type=int, default=15, help="nudged steps")
    p.add_argument("--lr-in", type=float, default=0.006, help="input→hidden rate")
    p.add_argument("--lr-out", type=float, default=0.003, help="hidden→output rate")
    p.add_argument("--activation", default="sigmoid4", help="VF nets only")
    p.add_argument("--step-size", type=float, default=0.5, help="VF nets only")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--angle-batches", type=int, default=20)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None, help="the IDX folder (default: shared data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--eta-scan",
        type=float,
        nargs="+",
        default=None,
        metavar="S",
        help="cep only: angles of C-EP at rates scaled by S (no training)",
    )
    args = p.parse_args(argv)
    if args.eta_scan and args.method != "cep":
        raise SystemExit("--eta-scan needs --method cep.")

    data = load_images(args.dataset, args.data_dir).flat()
    model, est, lr = build(args, jax.random.fold_in(jax.random.PRNGKey(args.seed), 7))
    # Float32 like training: the solver's and the adjoint's tolerances follow the dtype
    # (1e-6). A tighter one cannot be met in float32, and the adjoint would then return
    # NaN (its on_failure default) for the batch.
    reference = RecurrentBackprop(adjoint=Implicit(BiCGStab(200)), solver=Picard(max_steps=5000))
    rng = np.random.default_rng(1000 + args.seed)
    picks = rng.permutation(len(data.x_train))[: args.angle_batches * args.batch_size]
    picks = picks.reshape(args.angle_batches, args.batch_size)
    est_grad = eqx.filter_jit(lambda m, x, y, k: est(m, x, y, key=k)[1])
    ref_grad = eqx.filter_jit(lambda m, x, y: reference(m, x, y)[1])

    def angles(m):
        out = []
        for i, b in enumerate(picks):
            x, y = jnp.asarray(data.x_train[b]), jnp.asarray(data.y_train[b])
            out.append(angle_deg(est_grad(m, x, y, jax.random.PRNGKey(i)), ref_grad(m, x, y)))
        a = np.asarray(out)
        if not np.all(np.isfinite(a)):
            print(f"  {np.sum(~np.isfinite(a))} of {len(a)} angles not finite", flush=True)
        return a

    out = Path(args.out)
    if args.eta_scan:
        return eta_scan(args, data, model, est, lr, picks, ref_grad, out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "angles.jsonl"
    done = len(log.read_text().splitlines()) if log.exists() else 0
    if done == 0:
        a = angles(model)
        row = {
            "epoch": 0,
            "angle_median": float(np.nanmedian(a)),
            "angle_p90": float(np.nanquantile(a, 0.9)),
            "angle_nonfinite": int(np.sum(~np.isfinite(a))),
        }
        if isinstance(model, VectorFieldMLP):
            row["feedback_angles"] = model.feedback_angles()
        log.write_text(json.dumps(row) + "\n")
        done = 1
    info = {"script": "cep_vf_curves.py", "args": vars(args), "started": time.ctime()}
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        lr=lr,
        eval_solver=Picard(tol=0.0, max_steps=args.T),
        max_steps_per_epoch=args.max_steps_per_epoch,
        progress=False,
    )

    def after_epoch(result):
        a = angles(result.model)
        row = {
            "epoch": result.history[-1]["epoch"],
            "angle_median": float(np.nanmedian(a)),
            "angle_p90": float(np.nanquantile(a, 0.9)),
            "angle_nonfinite": int(np.sum(~np.isfinite(a))),
        }
        if isinstance(result.model, VectorFieldMLP):
            row["feedback_angles"] = result.model.feedback_angles()
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"epoch {row['epoch']}: angle to the implicit gradient {row}", flush=True)
        return {}

    fit_by_epoch(
        model,
        est,
        data,
        cfg,
        out_dir=out,
        after_epoch=after_epoch,
        start_epoch=done,
        run_info=info,
    )
    return 0


def eta_scan(args, data, model, est, lr, picks, ref_grad, out: Path) -> int:
    """Angles of C-EP at scaled rates to EP and to the implicit gradient (see --eta-scan)."""
    where = "initial net"
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        # The checkpoint holds (model, optimiser state) of the run's own optimiser.
        spe = steps_per_epoch(len(data.x_train), args.batch_size, args.max_steps_per_epoch)
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr)
        params = eqx.filter(model, eqx.is_inexact_array)
        opt_state = cfg.optimizer_settings(spe)(params).init(params)
        (model, _), info = load_checkpoint(ckpt, (model, opt_state))
        where = f"{ckpt} (epoch {info.get('epoch')})"
    ep = EquilibriumProp(beta=args.beta, variant="positive", free_steps=args.T, nudged_steps=args.K)
    ep_grad = eqx.filter_jit(lambda m, x, y: ep(m, x, y)[1])
    batches = [(jnp.asarray(data.x_train[b]), jnp.asarray(data.y_train[b])) for b in picks]
    ep_g = [ep_grad(model, x, y) for x, y in batches]
    ref_g = [ref_grad(model, x, y) for x, y in batches]
    # The rates travel as arrays, so every scale runs the one compiled C-EP step.
    cep_grad = eqx.filter_jit(lambda c, m, x, y: c(m, x, y)[1])
    rows = []
    for scale in args.eta_scan:
        eta = jax.tree_util.tree_map(
            lambda r, s=scale: jnp.asarray(r * s, jnp.float32), est.learning_rate
        )
        cep = ContinualEP(beta=args.beta, learning_rate=eta, free_steps=args.T, nudged_steps=args.K)
        to_ep, to_ref = [], []
        for (x, y), g_ep, g_ref in zip(batches, ep_g, ref_g, strict=True):
            g = cep_grad(cep, model, x, y)
            to_ep.append(angle_deg(g, g_ep))
            to_ref.append(angle_deg(g, g_ref))
        rows.append(
            {
                "scale": scale,
                "to_ep_median": float(np.median(to_ep)),
                "to_ep_max": float(np.max(to_ep)),
                "to_implicit_median": float(np.median(to_ref)),
            }
        )
        print(
            f"eta x {scale:g}: C-EP to EP {rows[-1]['to_ep_median']:.3g} deg (max "
            f"{rows[-1]['to_ep_max']:.3g}), to the implicit gradient "
            f"{rows[-1]['to_implicit_median']:.3g} deg",
            flush=True,
        )
    ep_ref = float(np.median([angle_deg(a, b) for a, b in zip(ep_g, ref_g, strict=True)]))
    print(f"EP to the implicit gradient: {ep_ref:.3g} deg ({where})", flush=True)
    result = {"net": where, "ep_to_implicit_median": ep_ref, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "eta_scan.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
