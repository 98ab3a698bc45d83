"""P-1h (Ernoult et al. 2019) with one preset setting changed: which one breaks it.

Trains the `ernoult2019-p1h` preset through `eqprop_jax.train.fit` with its update
order, initialisation or BPTT truncation replaced, e.g. the paper's synchronous
updates, or BPTT through all T = 40 steps:

    python scripts/p1h_ablation.py --update sync --estimator ep-positive \\
        --out /work/runs/p1h-sync-ep
    python scripts/p1h_ablation.py --init glorot --update sync --bptt-steps 40 \\
        --estimator bptt --out /work/runs/p1h-old-bptt

Writes `metrics.jsonl` and `checkpoint.npz` in --out (resume with --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
from _common import load_images

from eqprop_jax.presets import _hopfield, get_preset
from eqprop_jax.train import fit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--update", choices=("sync", "async"), default="async")
    p.add_argument("--init", choices=("torch", "glorot"), default="torch")
    p.add_argument("--bptt-steps", type=int, default=16, help="steps BPTT differentiates")
    p.add_argument("--estimator", default="ep-positive")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None, help="the IDX folder (default: shared data)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)

    base = get_preset("ernoult2019-p1h")
    preset = dataclasses.replace(
        base,
        build_model=_hopfield(
            (784, 512, 10),
            init=args.init,
            dynamics="prototypical",
            activation="sigmoid4",
            update=args.update,
        ),
        # The preset's BPTT with another truncation (its steps stay the preset's T).
        estimators={
            **base.estimators,
            "bptt": functools.partial(base.estimators["bptt"], truncate=args.bptt_steps),
        },
    )
    data = load_images(args.dataset, args.data_dir).flat()
    cfg = dataclasses.replace(
        preset.train,
        epochs=args.epochs,
        seed=args.seed,
        eval_solver=preset.eval_solver(),
        progress=False,
    )
    # The same key as `eqprop-jax train`, so runs that differ only in the estimator
    # start from one initialisation.
    key = jax.random.fold_in(jax.random.PRNGKey(args.seed), 7)
    model = preset.model(key, data.x_train.shape[1:], data.num_classes)
    info = {"script": "p1h_ablation.py", "args": vars(args), "started": time.ctime()}
    fit(
        model,
        preset.make_estimator(args.estimator),
        data,
        cfg,
        out_dir=args.out,
        resume=args.resume,
        run_info=info,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
