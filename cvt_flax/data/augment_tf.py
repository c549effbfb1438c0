"""TensorFlow image augmentation kernels with stateless randomness (for tf.data).

Every random op takes a ``seed``: an int32/int64 tensor of shape [2] (see
`tf.random.experimental.stateless_split`), so an example's augmentation is a
pure function of its seed. That is what makes the tf.data pipeline
resume-exact. Ops take uint8 ``[H, W, C]`` images of any size with ``C`` 1 or
3 (unless stated otherwise) and work eagerly and inside ``Dataset.map``.

The policy (step order, RandAugment's op set and magnitudes, crop and erasing
ranges) lives in :mod:`cvt_flax.data.policy`, shared with the JAX kernels of
:mod:`cvt_flax.data.augment_jax`; `KERNELS` hands these kernels to
`cvt_flax.data.policy.apply_train_policy`.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

from cvt_flax.data import policy
from cvt_flax.data.policy import (
    CROP_ATTEMPTS,
    CROP_MAX_SCALE,
    CROP_RATIO,
    ERASING_ATTEMPTS,
    ERASING_RATIO,
    ERASING_SCALE,
    FILL_VALUE,
    LUMA,
    MAX_ENHANCE,
    MAX_MAGNITUDE,
    MAX_POSTERIZE_SHIFT,
    MAX_ROTATE_DEG,
    MAX_SHEAR,
    MAX_SOLARIZE_ADD,
    MAX_TRANSLATE,
    RANDAUGMENT_MAGNITUDE_STD,
    RANDAUGMENT_OPS,
    RANDAUGMENT_PROB,
    SHARPNESS_KERNEL,
    SHARPNESS_KERNEL_SUM,
    SOLARIZE_ADD_THRESHOLD,
    SOLARIZE_MAX_THRESHOLD,
)


def _seeds(seed: tf.Tensor, n: int) -> tf.Tensor:
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=n)


def to_uint8(x: tf.Tensor) -> tf.Tensor:
    """Rounds and clips a float image to uint8."""
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def convert_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """Converts a uint8 image to ``channels`` (1: luminance of RGB; 3: grey tiled; other counts unchanged)."""
    c = image.shape[-1]
    if c == channels or channels == 0:
        return image
    if channels == 3 and c == 1:
        return tf.tile(image, [1, 1, 3])
    if channels == 1 and c == 3:
        return tf.image.rgb_to_grayscale(image)
    raise ValueError(f"Cannot convert {c}-channel images to {channels} channels; set config.num_channels to 0, 1 or 3.")


def resize(image: tf.Tensor, size: int | tuple[int, int]) -> tf.Tensor:
    """Resizes a uint8 image to ``size`` (bilinear, antialiased when shrinking); returns uint8."""
    hw = (size, size) if isinstance(size, int) else size
    out = tf.image.resize(tf.cast(image, tf.float32), hw, method="bilinear", antialias=True)
    return to_uint8(out)


def resize_if_needed(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes to ``size x size`` unless the image already is that size (static or dynamic check)."""
    h, w = image.shape[0], image.shape[1]
    if h is not None and w is not None:
        return image if (h, w) == (size, size) else resize(image, size)
    shape = tf.shape(image)
    return tf.cond(
        tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size)),
        lambda: tf.ensure_shape(image, [size, size, image.shape[-1]]),
        lambda: resize(image, size),
    )


def center_crop(image: tf.Tensor, size: int, crop_ratio: float) -> tf.Tensor:
    """ImageNet-style eval crop: resize the shorter side to ``floor(size / crop_ratio)``, crop the centre."""
    scale_size = int(math.floor(size / crop_ratio))
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    factor = scale_size / tf.reduce_min(shape)
    hw = tf.cast(tf.maximum(tf.round(shape * factor), float(size)), tf.int32)
    image = to_uint8(tf.image.resize(tf.cast(image, tf.float32), hw, method="bilinear", antialias=True))
    top = (hw[0] - size) // 2
    left = (hw[1] - size) // 2
    return tf.ensure_shape(image[top : top + size, left : left + size], [size, size, image.shape[-1]])


def pad_crop(image: tf.Tensor, seed: tf.Tensor, size: int, padding: int) -> tf.Tensor:
    """CIFAR-style crop: resize to ``size`` if needed, zero-pad by ``padding``, random ``size x size`` crop."""
    image = resize_if_needed(image, size)
    if padding > 0:
        image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    return tf.image.stateless_random_crop(image, [size, size, image.shape[-1]], seed=seed)


def random_resized_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, CROP_MAX_SCALE),
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = CROP_ATTEMPTS,
) -> tf.Tensor:
    """Inception-style crop: a random box of area fraction in ``scale`` and aspect in ``ratio``, resized to ``size``."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=attempts,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, crop_size)
    return tf.ensure_shape(resize(crop, size), [size, size, image.shape[-1]])


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random horizontal flip (probability 0.5)."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


# ----------------------------------------------------------------------------- colour ops (float in, float out)


def _gray(x: tf.Tensor) -> tf.Tensor:
    """Luminance [H, W, 1] of a float image (the image itself when it has one channel)."""
    if x.shape[-1] == 3:
        return tf.reduce_sum(x * tf.constant(LUMA, x.dtype), axis=-1, keepdims=True)
    return x[..., :1]


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ImageEnhance: ``degenerate + factor * (image - degenerate)``, clipped to [0, 255]."""
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _autocontrast(x: tf.Tensor) -> tf.Tensor:
    lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
    hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-3), 1.0)
    offset = tf.where(hi > lo, lo, 0.0)
    return tf.clip_by_value((x - offset) * scale, 0.0, 255.0)


def _equalize_channel(ch: tf.Tensor) -> tf.Tensor:
    """PIL ImageOps.equalize of one int32 channel [H, W]."""
    hist = tf.histogram_fixed_width(ch, [0, 255], nbins=256)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

    def lut() -> tf.Tensor:
        table = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
        table = tf.clip_by_value(tf.concat([[0], table[:-1]], 0), 0, 255)
        return tf.gather(table, ch)

    return tf.cond(step > 0, lut, lambda: ch)


def _equalize(x: tf.Tensor) -> tf.Tensor:
    ch = tf.transpose(tf.cast(tf.round(x), tf.int32), [2, 0, 1])
    out = tf.map_fn(_equalize_channel, ch, fn_output_signature=tf.int32)
    return tf.cast(tf.transpose(out, [1, 2, 0]), tf.float32)


def _posterize(x: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    shift = tf.cast(8 - bits, tf.int32)
    xi = tf.cast(tf.round(x), tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(xi, shift), shift), tf.float32)


def _sharpness(x: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ImageEnhance.Sharpness: blend with a 3x3 smoothed image (borders kept)."""
    c = x.shape[-1]
    k = tf.constant(SHARPNESS_KERNEL) / SHARPNESS_KERNEL_SUM
    k = tf.tile(k[:, :, None, None], [1, 1, c, 1])
    smooth = tf.nn.depthwise_conv2d(x[None], k, [1, 1, 1, 1], padding="VALID")[0]
    smooth = tf.round(tf.clip_by_value(smooth, 0.0, 255.0))
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    inner = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    mask = tf.pad(tf.ones([tf.maximum(h - 2, 0), tf.maximum(w - 2, 0), c]), [[1, 1], [1, 1], [0, 0]])
    degenerate = mask * inner + (1.0 - mask) * x
    return _blend(degenerate, x, factor)


def _affine(x: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """Warps by a 3x3 output->input matrix (pixel coordinates, x then y), bilinear, grey fill."""
    flat = tf.reshape(matrix, [9])[:8] / matrix[2, 2]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None],
        transforms=flat[None],
        output_shape=tf.shape(x)[:2],
        fill_value=FILL_VALUE,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return out[0]


def _centered(x: tf.Tensor, m: tf.Tensor) -> tf.Tensor:
    """Conjugates ``m`` so that it acts about the image centre."""
    h = tf.cast(tf.shape(x)[0], tf.float32)
    w = tf.cast(tf.shape(x)[1], tf.float32)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    to_c = tf.stack([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
    from_c = tf.stack([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    return to_c @ m @ from_c


def _rotate(x: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
    t = degrees * math.pi / 180.0
    c, s = tf.cos(t), tf.sin(t)
    m = tf.stack([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return _affine(x, _centered(x, m))


def _shear(x: tf.Tensor, shear: tf.Tensor, axis: int) -> tf.Tensor:
    if axis == 0:  # ShearX: x_in = x + shear * y
        m = tf.stack([[1.0, shear, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    else:
        m = tf.stack([[1.0, 0.0, 0.0], [shear, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return _affine(x, _centered(x, m))


def _translate(x: tf.Tensor, frac: tf.Tensor, axis: int) -> tf.Tensor:
    side = tf.cast(tf.shape(x)[1 - axis], tf.float32)
    d = frac * side
    if axis == 0:
        m = tf.stack([[1.0, 0.0, d], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    else:
        m = tf.stack([[1.0, 0.0, 0.0], [0.0, 1.0, d], [0.0, 0.0, 1.0]])
    return _affine(x, m)


def apply_randaugment_op(x: tf.Tensor, op: int | str, magnitude: tf.Tensor, sign: tf.Tensor | float = 1.0) -> tf.Tensor:
    """Applies one RandAugment op to a float [H, W, C] image in [0, 255].

    Args:
      x: Float32 image, values in [0, 255].
      op: Index into `RANDAUGMENT_OPS`, or the op's name.
      magnitude: Magnitude in [0, 10] (float scalar).
      sign: +1 or -1 for the signed ops (rotate, shear, translate, colour enhancements).

    Returns:
      The float32 image, values in [0, 255].
    """
    name = RANDAUGMENT_OPS[op] if isinstance(op, int) else op
    m = tf.cast(magnitude, tf.float32) / MAX_MAGNITUDE
    sign = tf.cast(sign, tf.float32)
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255.0 - x
    if name == "Rotate":
        return _rotate(x, sign * m * MAX_ROTATE_DEG)
    if name == "Posterize":
        return _posterize(x, 8 - tf.cast(m * MAX_POSTERIZE_SHIFT, tf.int32))
    if name == "Solarize":
        threshold = SOLARIZE_MAX_THRESHOLD - m * SOLARIZE_MAX_THRESHOLD
        return tf.where(x >= threshold, 255.0 - x, x)
    if name == "SolarizeAdd":
        return tf.where(x < SOLARIZE_ADD_THRESHOLD, tf.minimum(x + m * MAX_SOLARIZE_ADD, 255.0), x)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = 1.0 + sign * m * MAX_ENHANCE
        if name == "Color":
            return _blend(tf.broadcast_to(_gray(x), tf.shape(x)), x, factor)
        if name == "Contrast":
            return _blend(tf.reduce_mean(tf.round(_gray(x))), x, factor)
        if name == "Brightness":
            return _blend(tf.zeros_like(x), x, factor)
        return _sharpness(x, factor)
    if name in ("ShearX", "ShearY"):
        return _shear(x, sign * m * MAX_SHEAR, 0 if name == "ShearX" else 1)
    if name in ("TranslateX", "TranslateY"):
        return _translate(x, sign * m * MAX_TRANSLATE, 0 if name == "TranslateX" else 1)
    raise ValueError(f"Unknown RandAugment op {name!r}; known: {RANDAUGMENT_OPS}.")


def randaugment(
    image: tf.Tensor,
    seed: tf.Tensor,
    num_layers: int,
    magnitude: float,
    *,
    prob: float = RANDAUGMENT_PROB,
    magnitude_std: float = RANDAUGMENT_MAGNITUDE_STD,
) -> tf.Tensor:
    """RandAugment (timm ``rand-m{magnitude}-mstd{std}-inc1`` style) of a uint8 [H, W, C] image.

    Args:
      image: uint8 image, C = 1 or 3, any size.
      seed: Stateless seed, shape [2].
      num_layers: Ops applied in sequence (0: identity).
      magnitude: Magnitude 0-10.
      prob: Probability of applying each drawn op.
      magnitude_std: Std of the Gaussian noise added to the magnitude per op.

    Returns:
      The augmented uint8 image (same shape).
    """
    if num_layers <= 0:
        return image
    x = tf.cast(image, tf.float32)
    seeds = _seeds(seed, 4 * num_layers)
    for layer in range(num_layers):
        s_op, s_apply, s_mag, s_sign = (seeds[4 * layer + i] for i in range(4))
        idx = tf.random.stateless_uniform([], s_op, 0, len(RANDAUGMENT_OPS), dtype=tf.int32)
        mag = float(magnitude)
        if magnitude_std > 0:
            mag = mag + magnitude_std * tf.random.stateless_normal([], s_mag)
        mag = tf.clip_by_value(tf.cast(mag, tf.float32), 0.0, MAX_MAGNITUDE)
        sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
        # The last branch is the identity: taken when the drawn op is not applied.
        idx = tf.where(tf.random.stateless_uniform([], s_apply) < prob, idx, len(RANDAUGMENT_OPS))
        branches = [
            (lambda i=i, x=x, mag=mag, sign=sign: tf.ensure_shape(apply_randaugment_op(x, i, mag, sign), x.shape))
            for i in range(len(RANDAUGMENT_OPS))
        ]
        branches.append(lambda x=x: x)
        x = tf.round(tf.clip_by_value(tf.switch_case(idx, branches), 0.0, 255.0))
    return to_uint8(x)


def color_jitter(image: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
    """Brightness, contrast and saturation jitter with factors uniform in [1 - s, 1 + s] (torchvision style).

    Saturation is skipped for 1-channel images. Returns uint8.
    """
    if strength <= 0:
        return image
    s_b, s_c, s_s = (_seeds(seed, 3)[i] for i in range(3))
    lo, hi = policy.jitter_range(strength)
    x = tf.cast(image, tf.float32)
    x = _blend(tf.zeros_like(x), x, tf.random.stateless_uniform([], s_b, lo, hi))
    x = _blend(tf.reduce_mean(_gray(x)), x, tf.random.stateless_uniform([], s_c, lo, hi))
    if x.shape[-1] == 3:
        x = _blend(tf.broadcast_to(_gray(x), tf.shape(x)), x, tf.random.stateless_uniform([], s_s, lo, hi))
    return to_uint8(x)


def normalize(image: tf.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tf.Tensor:
    """uint8 -> float32 ``(x / 255 - mean) / std``."""
    x = tf.cast(image, tf.float32) / 255.0
    return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def random_erasing(
    image: tf.Tensor,
    seed: tf.Tensor,
    prob: float,
    *,
    scale: tuple[float, float] = ERASING_SCALE,
    ratio: tuple[float, float] = ERASING_RATIO,
    attempts: int = ERASING_ATTEMPTS,
) -> tf.Tensor:
    """Random erasing (timm, ``mode='pixel'``, one box) of a NORMALISED float image, with probability ``prob``.

    Up to ``attempts`` boxes of area fraction in ``scale`` and log-uniform aspect in ``ratio`` are drawn; the first
    that fits is filled with per-pixel N(0, 1) noise.
    """
    if prob <= 0:
        return image
    s_p, s_area, s_ratio, s_top, s_left, s_fill = (_seeds(seed, 6)[i] for i in range(6))
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    area = tf.random.stateless_uniform([attempts], s_area, scale[0], scale[1]) * hf * wf
    log_r = tf.random.stateless_uniform([attempts], s_ratio, math.log(ratio[0]), math.log(ratio[1]))
    r = tf.exp(log_r)
    eh = tf.cast(tf.round(tf.sqrt(area * r)), tf.int32)
    ew = tf.cast(tf.round(tf.sqrt(area / r)), tf.int32)
    ok = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    found = tf.reduce_any(ok)
    first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
    eh, ew = eh[first], ew[first]
    top = tf.random.stateless_uniform([], s_top, 0, tf.maximum(h - eh, 0) + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], s_left, 0, tf.maximum(w - ew, 0) + 1, dtype=tf.int32)
    rows = tf.range(h)[:, None]
    cols = tf.range(w)[None, :]
    box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    apply = found & (tf.random.stateless_uniform([], s_p) < prob)
    box = box & apply
    noise = tf.random.stateless_normal(shape, s_fill, dtype=image.dtype)
    return tf.where(box[:, :, None], noise, image)


class _Kernels:
    """`cvt_flax.data.policy.Kernels` over this module's functions (which take the image first, then the seed)."""

    @staticmethod
    def split(rng: tf.Tensor, num: int) -> tf.Tensor:
        return _seeds(rng, num)

    @staticmethod
    def pad_crop(rng: tf.Tensor, image: tf.Tensor, size: int, padding: int) -> tf.Tensor:
        return pad_crop(image, rng, size, padding)

    @staticmethod
    def random_resized_crop(
        rng: tf.Tensor,
        image: tf.Tensor,
        size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        attempts: int,
    ) -> tf.Tensor:
        return random_resized_crop(image, rng, size, scale=scale, ratio=ratio, attempts=attempts)

    @staticmethod
    def resize(image: tf.Tensor, size: int) -> tf.Tensor:
        return tf.ensure_shape(resize(image, size), [size, size, image.shape[-1]])

    @staticmethod
    def random_flip(rng: tf.Tensor, image: tf.Tensor) -> tf.Tensor:
        return random_flip(image, rng)

    @staticmethod
    def randaugment(
        rng: tf.Tensor, image: tf.Tensor, num_layers: int, magnitude: float, prob: float, magnitude_std: float
    ) -> tf.Tensor:
        return randaugment(image, rng, num_layers, magnitude, prob=prob, magnitude_std=magnitude_std)

    @staticmethod
    def color_jitter(rng: tf.Tensor, image: tf.Tensor, strength: float) -> tf.Tensor:
        return color_jitter(image, rng, strength)

    @staticmethod
    def normalize(image: tf.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tf.Tensor:
        return normalize(image, mean, std)

    @staticmethod
    def random_erasing(
        rng: tf.Tensor,
        image: tf.Tensor,
        prob: float,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        attempts: int,
    ) -> tf.Tensor:
        return random_erasing(image, rng, prob, scale=scale, ratio=ratio, attempts=attempts)


# The kernels `cvt_flax.data.policy.apply_train_policy` runs in tf.data (looked up when the map function is traced).
KERNELS: Any = _Kernels()
