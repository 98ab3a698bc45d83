"""scikit-learn's handwritten digits: the embedded default dataset (no download)."""

from __future__ import annotations

import numpy as np

from .dataset import DataError, Dataset, to_unit_images


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """The 1,797 real 8x8 digit images shipped inside scikit-learn (UCI optdigits test set).

    Pixels (0..16) are scaled to [0, 1]. The train/test split is a stratified
    permutation fixed by `seed`, so one seed always gives the same split.
    """
    if not 0 < test_fraction < 1:
        raise DataError(f"digits: test_fraction must lie in (0, 1), got {test_fraction}.")
    try:
        from sklearn.datasets import load_digits as _sk_load
    except ImportError as e:
        raise DataError(
            "digits: scikit-learn is not installed; install it with "
            "`pip install 'eqprop_jax[data]'`."
        ) from e
    raw = _sk_load()
    images = np.asarray(raw.images)
    labels = np.asarray(raw.target, np.int32)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test_idx.append(rng.permutation(idx)[: int(round(test_fraction * len(idx)))])
    test_mask = np.zeros(len(labels), bool)
    test_mask[np.concatenate(test_idx)] = True
    train_idx = rng.permutation(np.flatnonzero(~test_mask))
    test_idx = rng.permutation(np.flatnonzero(test_mask))
    x = to_unit_images(images, 16.0)
    return Dataset("digits", x[train_idx], labels[train_idx], x[test_idx], labels[test_idx], 10)
