"""TensorFlow augmentation ops (cvt_flax.data.augment_tf): eager and inside tf.data, 1 and 3 channels."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from cvt_flax.data import augment_tf as aug  # noqa: E402

SEED = tf.constant([3, 7], tf.int64)


def _image(h=20, w=24, c=3, seed=0):
    rng = np.random.RandomState(seed)
    # A smooth gradient plus noise: varied histogram, not constant.
    base = np.linspace(0, 255, h * w).reshape(h, w, 1)
    img = np.clip(base + rng.normal(0, 20, (h, w, c)), 0, 255).astype(np.uint8)
    return tf.constant(img)


def _check_uint8(out, shape):
    assert out.dtype == tf.uint8
    assert tuple(out.shape) == shape


@pytest.mark.parametrize("c", [1, 3])
def test_every_randaugment_op_eager(c):
    x = tf.cast(_image(c=c), tf.float32)
    for i, name in enumerate(aug.RANDAUGMENT_OPS):
        for mag, sign in ((0.0, 1.0), (10.0, -1.0), (5.0, 1.0)):
            out = aug.apply_randaugment_op(x, i, tf.constant(mag), sign)
            assert tuple(out.shape) == tuple(x.shape), name
            arr = out.numpy()
            assert np.all(np.isfinite(arr)) and arr.min() >= 0 and arr.max() <= 255, name
    # A few exact checks.
    np.testing.assert_array_equal(aug.apply_randaugment_op(x, "Invert", 5.0).numpy(), 255 - x.numpy())
    np.testing.assert_allclose(aug.apply_randaugment_op(x, "Rotate", 0.0).numpy(), x.numpy(), atol=1e-3)
    np.testing.assert_allclose(aug.apply_randaugment_op(x, "TranslateX", 0.0).numpy(), x.numpy(), atol=1e-3)
    np.testing.assert_allclose(aug.apply_randaugment_op(x, "Brightness", 0.0).numpy(), x.numpy(), atol=1e-3)
    eq = aug.apply_randaugment_op(x, "Equalize", 5.0).numpy()
    assert eq.max() >= x.numpy().max() - 1  # spreads the histogram
    ac = aug.apply_randaugment_op(x, "AutoContrast", 5.0).numpy()
    assert ac.min() == 0 and ac.max() == 255
    post = aug.apply_randaugment_op(x, "Posterize", 10.0).numpy()
    assert np.all(post.astype(np.int32) % 16 == 0)


def test_equalize_matches_pil():
    from PIL import Image, ImageOps

    for c, mode in ((1, "L"), (3, "RGB")):
        img = _image(c=c, seed=2).numpy()
        ref = np.asarray(ImageOps.equalize(Image.fromarray(img.squeeze(-1) if c == 1 else img, mode)))
        out = aug.apply_randaugment_op(tf.cast(img, tf.float32), "Equalize", 5.0).numpy()
        np.testing.assert_array_equal(out.reshape(ref.shape), ref)


@pytest.mark.parametrize("c", [1, 3])
def test_geometric_and_pixel_ops_eager(c):
    img = _image(c=c)
    _check_uint8(aug.pad_crop(img, SEED, 16, 4), (16, 16, c))
    _check_uint8(aug.random_resized_crop(img, SEED, 12, scale=(0.08, 1.0)), (12, 12, c))
    _check_uint8(aug.random_flip(img, SEED), (20, 24, c))
    _check_uint8(aug.resize(img, 32), (32, 32, c))
    _check_uint8(aug.center_crop(img, 16, 0.875), (16, 16, c))
    _check_uint8(aug.randaugment(img, SEED, 2, 9), (20, 24, c))
    _check_uint8(aug.color_jitter(img, SEED, 0.4), (20, 24, c))
    x = aug.normalize(img, (0.5,) * c, (0.25,) * c)
    assert x.dtype == tf.float32 and x.shape == (20, 24, c)
    np.testing.assert_allclose(x.numpy(), (img.numpy() / 255.0 - 0.5) / 0.25, atol=1e-5)
    erased = aug.random_erasing(x, SEED, 1.0)
    assert erased.shape == x.shape and erased.dtype == tf.float32
    changed = np.any(erased.numpy() != x.numpy(), axis=-1)
    assert 0.0 < changed.mean() <= 1 / 3 + 0.05
    # The erased pixels form one rectangle.
    rows, cols = np.nonzero(changed)
    assert changed.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_ops_are_pure_functions_of_the_seed():
    img = _image()
    for fn in (
        lambda s: aug.randaugment(img, s, 2, 9),
        lambda s: aug.random_resized_crop(img, s, 12),
        lambda s: aug.pad_crop(img, s, 16, 4),
        lambda s: aug.random_erasing(aug.normalize(img, (0.5,) * 3, (0.5,) * 3), s, 1.0),
    ):
        a, b = fn(SEED).numpy(), fn(SEED).numpy()
        np.testing.assert_array_equal(a, b)
    outs = [aug.randaugment(img, tf.constant([0, i], tf.int64), 2, 9).numpy() for i in range(8)]
    assert len({o.tobytes() for o in outs}) > 1


def test_pad_crop_is_a_shifted_window():
    img = _image(16, 16, 3)
    out = aug.pad_crop(img, SEED, 16, 4).numpy()
    padded = np.pad(img.numpy(), ((4, 4), (4, 4), (0, 0)))
    assert any(np.array_equal(out, padded[t : t + 16, s : s + 16]) for t in range(9) for s in range(9))


def test_convert_channels():
    rgb = _image(c=3)
    assert aug.convert_channels(rgb, 1).shape == (20, 24, 1)
    assert aug.convert_channels(aug.convert_channels(rgb, 1), 3).shape == (20, 24, 3)
    assert aug.convert_channels(rgb, 0).shape == (20, 24, 3)


@pytest.mark.parametrize("c", [1, 3])
def test_inside_tf_data_map(c):
    images = np.stack([_image(20, 24, c, seed=i).numpy() for i in range(6)])
    ds = tf.data.Dataset.from_tensor_slices(images).enumerate()

    def fn(i, img):
        seed = tf.stack([tf.constant(1, tf.int64), i])
        s = tf.random.experimental.stateless_split(seed, 6)
        # Hide the static size: ops must work on dynamic shapes as tf.data gives them.
        img = tf.ensure_shape(tf.reshape(img, tf.shape(img)), [None, None, c])
        a = aug.random_resized_crop(img, s[0], 16)
        b = aug.pad_crop(img, s[1], 16, 2)
        a = aug.random_flip(a, s[2])
        a = aug.randaugment(a, s[3], 2, 9)
        a = aug.color_jitter(a, s[4], 0.3)
        x = aug.random_erasing(aug.normalize(a, (0.5,) * c, (0.5,) * c), s[5], 0.5)
        return {"x": x, "b": b, "e": aug.center_crop(img, 16, 0.875)}

    out = list(ds.map(fn, num_parallel_calls=2, deterministic=True).as_numpy_iterator())
    assert len(out) == 6
    for o in out:
        assert o["x"].shape == (16, 16, c) and o["x"].dtype == np.float32 and np.all(np.isfinite(o["x"]))
        assert o["b"].shape == (16, 16, c) and o["b"].dtype == np.uint8
        assert o["e"].shape == (16, 16, c)
    again = list(ds.map(fn).as_numpy_iterator())
    for o, p in zip(out, again, strict=True):
        np.testing.assert_array_equal(o["x"], p["x"])


@pytest.mark.parametrize("c", [1, 3])
def test_jax_ops_match_tf_ops(c):
    """The device pipeline's JAX ops compute what the TF ops compute."""
    import jax.numpy as jnp

    from cvt_flax.data import augment_jax

    assert augment_jax.RANDAUGMENT_OPS == aug.RANDAUGMENT_OPS
    img = np.random.RandomState(0).randint(0, 256, (16, 12, c)).astype(np.float32)
    for i, name in enumerate(aug.RANDAUGMENT_OPS):
        ours = np.asarray(augment_jax.apply_randaugment_op(jnp.asarray(img), i, 7.0, -1.0))
        theirs = aug.apply_randaugment_op(tf.constant(img), i, 7.0, -1.0).numpy()
        np.testing.assert_allclose(ours, theirs, atol=0.01, err_msg=name)
