"""Mixup / CutMix (cvt_flax.data.mix_batch): identity, soft targets, CutMix box area, determinism, jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_flax import data
from cvt_flax.data.mix import cutmix_box

B, S, C, K = 8, 16, 3, 10


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    images = jnp.asarray(rng.normal(size=(B, S, S, C)).astype(np.float32))
    labels = np.arange(B) % K  # distinct from their mirror (label i vs B-1-i) for B <= K
    return images, jax.nn.one_hot(labels, K), labels


def _aug(**kw):
    cfg = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mix_prob": 1.0, "cutmix_switch_prob": 0.5}
    cfg.update(kw)
    return cfg


@functools.lru_cache
def _jitted(items):
    return jax.jit(lambda r, x, t: data.mix_batch(r, x, t, dict(items)))


def mix(rng, images, targets, aug):
    """The jitted mix_batch (one compilation per aug config; eager dispatch is slow on a busy CPU)."""
    return _jitted(tuple(sorted(aug.items())))(rng, images, targets)


def test_identity_when_alphas_zero():
    images, targets, _ = _batch()
    out, t = data.mix_batch(jax.random.key(0), images, targets, _aug())
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(t, targets)
    out, t = data.mix_batch(jax.random.key(0), images, targets, _aug(mixup_alpha=0.8, mix_prob=0.0))
    np.testing.assert_array_equal(out, images)


@pytest.mark.parametrize("kw", [{"mixup_alpha": 0.8}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}])
def test_targets_are_distributions_and_deterministic(kw):
    images, targets, _ = _batch()
    fn = functools.partial(mix, aug=_aug(**kw))
    for seed in range(4):
        out, t = fn(jax.random.key(seed), images, targets)
        assert out.shape == images.shape and out.dtype == images.dtype
        assert t.shape == (B, K) and t.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(t).sum(-1), 1.0, rtol=1e-6)
        assert np.all(np.asarray(t) >= 0)
        out2, t2 = fn(jax.random.key(seed), images, targets)
        np.testing.assert_array_equal(out, out2)
        np.testing.assert_array_equal(t, t2)


def test_mixup_is_convex_combination_with_flip():
    images, targets, labels = _batch()
    out, t = mix(jax.random.key(3), images, targets, _aug(mixup_alpha=0.8))
    lam = float(t[0, labels[0]])
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-5)


def test_cutmix_box_area_matches_lambda():
    images, targets, labels = _batch()
    seen_mixed = False
    for seed in range(6):
        out, t = mix(jax.random.key(seed), images, targets, _aug(cutmix_alpha=1.0))
        lam = float(t[0, labels[0]])
        from_flip = np.all(np.isclose(np.asarray(out[0]), np.asarray(images[-1])), axis=-1)
        from_self = np.all(np.isclose(np.asarray(out[0]), np.asarray(images[0])), axis=-1)
        assert np.all(from_flip | from_self)
        np.testing.assert_allclose(from_flip.mean(), 1.0 - lam, atol=1e-6)
        # The pasted region is one rectangle.
        rows, cols = np.nonzero(from_flip)
        if rows.size:
            seen_mixed = True
            assert from_flip.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert seen_mixed


def test_cutmix_box_helper():
    mask, lam = jax.jit(cutmix_box, static_argnums=(2, 3))(jax.random.key(0), jnp.float32(0.75), 32, 32)
    assert mask.shape == (32, 32)
    np.testing.assert_allclose(1.0 - float(mask.mean()), float(lam), atol=1e-6)


def test_mix_prob_zero_point_five_sometimes_identity():
    images, targets, _ = _batch()
    same = 0
    for seed in range(12):
        out, _ = mix(jax.random.key(seed), images, targets, _aug(mixup_alpha=0.8, mix_prob=0.5))
        same += bool(np.array_equal(out, images))
    assert 0 < same < 12


def test_sharded_global_arrays():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    images, targets, _ = _batch()
    images, targets = jax.device_put(images, sharding), jax.device_put(targets, sharding)
    aug = _aug(mixup_alpha=0.8, cutmix_alpha=1.0)
    out, t = mix(jax.random.key(1), images, targets, aug)
    assert out.sharding.is_equivalent_to(sharding, 4)
    ref, tref = mix(jax.random.key(1), np.asarray(images), np.asarray(targets), aug)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    np.testing.assert_allclose(t, tref, rtol=1e-6)
