"""`eqprop_jax.data.batching`: epoch orders, full batches, and random crop and flip.

Each property is checked against a direct construction: a permutation is compared with
`np.arange`, batches with slices of the order, crops with every shift of the padded image.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqprop_jax.data import batch_indices, epoch_order, random_crop_flip, steps_per_epoch


def test_epoch_order_and_batches():
    key = jax.random.PRNGKey(3)
    o0, o0b, o1 = epoch_order(key, 0, 50), epoch_order(key, 0, 50), epoch_order(key, 1, 50)
    np.testing.assert_array_equal(np.sort(o0), np.arange(50))
    np.testing.assert_array_equal(o0, o0b)
    assert not np.array_equal(o0, o1)
    assert steps_per_epoch(50, 16) == 3 and steps_per_epoch(50, 16, max_steps=2) == 2
    np.testing.assert_array_equal(batch_indices(o0, 2, 16), o0[32:48])
    with pytest.raises(ValueError, match="larger than"):
        steps_per_epoch(10, 16)


@pytest.mark.parametrize("channels_first", [False, True])
def test_random_crop_flip_is_a_shifted_possibly_flipped_crop(channels_first):
    p = 2
    x = jax.random.uniform(jax.random.PRNGKey(0), (6, 5, 5, 2))
    xin = jnp.moveaxis(x, -1, 1) if channels_first else x
    out = random_crop_flip(jax.random.PRNGKey(1), xin, padding=p, channels_first=channels_first)
    out = np.asarray(jnp.moveaxis(out, 1, -1) if channels_first else out)
    padded = np.pad(np.asarray(x), ((0, 0), (p, p), (p, p), (0, 0)))
    kinds = set()
    for i in range(len(x)):
        matches = [
            (dy, dx, flip)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            for flip in (False, True)
            if np.array_equal(out[i], padded[i, dy : dy + 5, dx : dx + 5][:, :: -1 if flip else 1])
        ]
        assert matches, f"image {i} is not a crop of its padded input"
        kinds.add(matches[0])
    assert len(kinds) > 1  # not the same transform for every image


def test_an_epochs_batches_are_disjoint_and_cover_the_full_batches():
    # 50 examples in batches of 16: 3 full batches; the last 2 examples of the order
    # are dropped, so every step has one shape.
    order = epoch_order(jax.random.PRNGKey(0), 4, 50)
    spe = steps_per_epoch(50, 16)
    batches = [batch_indices(order, i, 16) for i in range(spe)]
    assert all(len(b) == 16 for b in batches)
    seen = np.concatenate(batches)
    assert len(np.unique(seen)) == 16 * spe
    np.testing.assert_array_equal(seen, order[: 16 * spe])


def test_steps_per_epoch_drops_the_remainder_and_caps_at_max_steps():
    assert steps_per_epoch(48, 16) == 3 and steps_per_epoch(47, 16) == 2
    assert steps_per_epoch(16, 16) == 1
    # A cap above the epoch's length changes nothing; a cap below it shortens the epoch.
    assert steps_per_epoch(50, 16, max_steps=10) == 3
    assert steps_per_epoch(500, 16, max_steps=4) == 4


def test_an_epoch_order_can_be_rebuilt_from_key_and_epoch_alone():
    # What a resumed run relies on: epoch e's order depends on (key, e) only, not on
    # which epochs were drawn before it.
    key = jax.random.PRNGKey(11)
    first = [epoch_order(key, e, 30) for e in range(4)]
    again = epoch_order(key, 3, 30)
    np.testing.assert_array_equal(first[3], again)
    assert len({tuple(o.tolist()) for o in first}) == 4
    other = epoch_order(jax.random.PRNGKey(12), 3, 30)
    assert not np.array_equal(other, again)


def test_random_crop_flip_without_padding_only_mirrors():
    x = jax.random.uniform(jax.random.PRNGKey(2), (8, 4, 3, 1))
    out = np.asarray(random_crop_flip(jax.random.PRNGKey(5), x, padding=0))
    xs = np.asarray(x)
    mirrored = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, xs, strict=True)]
    same = [np.array_equal(o, xi) for o, xi in zip(out, xs, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert any(mirrored) and any(same)  # 8 fair coins: both sides with probability 1 - 2^-7


def test_random_crop_flip_is_a_pure_function_of_its_key_and_jits():
    x = jax.random.uniform(jax.random.PRNGKey(0), (4, 6, 6, 3), dtype=jnp.float32)
    key = jax.random.PRNGKey(9)
    eager = random_crop_flip(key, x)
    jitted = jax.jit(random_crop_flip, static_argnames="padding")(key, x, padding=4)
    assert eager.shape == x.shape and eager.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    assert not np.array_equal(
        np.asarray(random_crop_flip(jax.random.PRNGKey(10), x)), np.asarray(eager)
    )


@pytest.mark.parametrize("shape", [(5, 5, 2), (2, 3, 5, 5, 2)])
def test_random_crop_flip_refuses_other_than_4d_batches(shape):
    with pytest.raises(ValueError, match="4-d image batches"):
        random_crop_flip(jax.random.PRNGKey(0), jnp.zeros(shape))
