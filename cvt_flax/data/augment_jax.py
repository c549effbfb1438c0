"""JAX image augmentation kernels for the device pipeline (no TensorFlow).

Per-image functions take a PRNG key and a float32 ``[H, W, C]`` image with values in [0, 255] (C = 1 or 3)
and are meant to be ``jax.vmap``-ed over a batch inside ``jax.jit``. The policy (step order, op set, magnitudes,
ranges) lives in :mod:`cvt_flax.data.policy`, shared with the TensorFlow kernels of
:mod:`cvt_flax.data.augment_tf`; the random streams are JAX's own. `KERNELS` hands these kernels to
`cvt_flax.data.policy.apply_train_policy`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from cvt_flax.data import policy
from cvt_flax.data.policy import (
    CROP_ATTEMPTS,
    CROP_MAX_SCALE,
    CROP_RATIO,
    ERASING_ATTEMPTS,
    ERASING_RATIO,
    ERASING_SCALE,
    FILL_VALUE,
    GEOMETRIC_OPS,
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


def convert_channels(x: jax.Array, channels: int) -> jax.Array:
    """[..., C] -> [..., channels]: 1 -> 3 tiles, 3 -> 1 takes the luminance (rounded, as uint8 would be)."""
    c = x.shape[-1]
    if c == channels or channels == 0:
        return x
    if channels == 3 and c == 1:
        return jnp.repeat(x, 3, axis=-1)
    if channels == 1 and c == 3:
        return jnp.round(jnp.sum(x * jnp.asarray(LUMA, x.dtype), axis=-1, keepdims=True))
    raise ValueError(f"Cannot convert {c}-channel images to {channels} channels; set config.num_channels to 0, 1 or 3.")


def resize(x: jax.Array, size: int) -> jax.Array:
    """Resizes [H, W, C] (or [B, H, W, C]) to ``size x size`` (bilinear, antialiased); no-op when already so."""
    if x.shape[-3] == size and x.shape[-2] == size:
        return x
    shape = (*x.shape[:-3], size, size, x.shape[-1])
    return jnp.clip(jnp.round(jax.image.resize(x, shape, "linear", antialias=True)), 0.0, 255.0)


def pad_crop(key: jax.Array, x: jax.Array, size: int, padding: int) -> jax.Array:
    """Resize to ``size`` if needed, zero-pad by ``padding``, random ``size x size`` crop."""
    x = resize(x, size)
    if padding <= 0:
        return x
    x = jnp.pad(x, ((padding, padding), (padding, padding), (0, 0)))
    ky, kx = jax.random.split(key)
    top = jax.random.randint(ky, (), 0, 2 * padding + 1)
    left = jax.random.randint(kx, (), 0, 2 * padding + 1)
    return jax.lax.dynamic_slice(x, (top, left, 0), (size, size, x.shape[-1]))


def random_resized_crop(
    key: jax.Array,
    x: jax.Array,
    size: int,
    scale: tuple[float, float] = (0.08, CROP_MAX_SCALE),
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = CROP_ATTEMPTS,
) -> jax.Array:
    """Random resized crop (torchvision): the first of ``attempts`` boxes that fits (else all), resized."""
    h, w, c = x.shape
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1]) * h * w
    r = jnp.exp(jax.random.uniform(k_ratio, (attempts,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    cw = jnp.round(jnp.sqrt(area * r))
    ch = jnp.round(jnp.sqrt(area / r))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = jnp.argmax(ok)
    found = jnp.any(ok)
    ch = jnp.where(found, ch[first], h)
    cw = jnp.where(found, cw[first], w)
    top = jnp.floor(jax.random.uniform(k_top) * (h - ch + 1))
    left = jnp.floor(jax.random.uniform(k_left) * (w - cw + 1))
    sy, sx = size / ch, size / cw
    out = jax.image.scale_and_translate(
        x,
        (size, size, c),
        (0, 1),
        jnp.stack([sy, sx]),
        jnp.stack([-top * sy, -left * sx]),
        method="linear",
        antialias=True,
    )
    return jnp.clip(jnp.round(out), 0.0, 255.0)


def random_flip(key: jax.Array, x: jax.Array) -> jax.Array:
    """Horizontal flip with probability 0.5."""
    return jnp.where(jax.random.bernoulli(key), x[:, ::-1], x)


# ----------------------------------------------------------------------------- RandAugment ops


def _gray(x: jax.Array) -> jax.Array:
    if x.shape[-1] == 3:
        return jnp.sum(x * jnp.asarray(LUMA, x.dtype), axis=-1, keepdims=True)
    return x[..., :1]


def _blend(degenerate: jax.Array, x: jax.Array, factor: jax.Array) -> jax.Array:
    return jnp.clip(degenerate + factor * (x - degenerate), 0.0, 255.0)


def _autocontrast(x: jax.Array) -> jax.Array:
    lo = jnp.min(x, axis=(0, 1), keepdims=True)
    hi = jnp.max(x, axis=(0, 1), keepdims=True)
    scale = jnp.where(hi > lo, 255.0 / jnp.maximum(hi - lo, 1e-3), 1.0)
    offset = jnp.where(hi > lo, lo, 0.0)
    return jnp.clip((x - offset) * scale, 0.0, 255.0)


def _equalize_channel(ch: jax.Array) -> jax.Array:
    v = jnp.clip(jnp.round(ch), 0, 255).astype(jnp.int32)
    hist = jnp.bincount(v.ravel(), length=256)
    last = 255 - jnp.argmax(hist[::-1] > 0)
    step = (jnp.sum(hist) - hist[last]) // 255
    lut = (jnp.cumsum(hist) + step // 2) // jnp.maximum(step, 1)
    lut = jnp.clip(jnp.concatenate([jnp.zeros([1], lut.dtype), lut[:-1]]), 0, 255)
    return jnp.where(step > 0, lut[v], v).astype(jnp.float32)


def _equalize(x: jax.Array) -> jax.Array:
    return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(x)


def _posterize(x: jax.Array, bits: jax.Array) -> jax.Array:
    shift = (8 - bits).astype(jnp.int32)
    xi = jnp.clip(jnp.round(x), 0, 255).astype(jnp.int32)
    return ((xi >> shift) << shift).astype(jnp.float32)


def _sharpness(x: jax.Array, factor: jax.Array) -> jax.Array:
    h, w, _ = x.shape
    k = jnp.asarray(SHARPNESS_KERNEL) / SHARPNESS_KERNEL_SUM
    p = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    smooth = sum(k[i, j] * p[i : i + h, j : j + w] for i in range(3) for j in range(3))
    smooth = jnp.round(jnp.clip(smooth, 0.0, 255.0))
    rows = jnp.arange(h)[:, None, None]
    cols = jnp.arange(w)[None, :, None]
    border = (rows == 0) | (rows == h - 1) | (cols == 0) | (cols == w - 1)
    return _blend(jnp.where(border, x, smooth), x, factor)


def _affine(x: jax.Array, m: jax.Array) -> jax.Array:
    """Warps by a 3x3 output->input matrix on (x, y) pixel coordinates; bilinear, grey fill."""
    h, w, _ = x.shape
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    xi = m[0, 0] * xx + m[0, 1] * yy + m[0, 2]
    yi = m[1, 0] * xx + m[1, 1] * yy + m[1, 2]

    def warp(ch: jax.Array) -> jax.Array:
        return jax.scipy.ndimage.map_coordinates(ch, [yi, xi], order=1, mode="constant", cval=FILL_VALUE)

    return jax.vmap(warp, in_axes=-1, out_axes=-1)(x)


def _centered(x: jax.Array, m: jax.Array) -> jax.Array:
    h, w, _ = x.shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    to_c = jnp.asarray([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
    from_c = jnp.asarray([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    return to_c @ m @ from_c


def _mat(a: jax.Array, b: jax.Array, c: jax.Array, d: jax.Array, tx: jax.Array, ty: jax.Array) -> jax.Array:
    z, o = jnp.zeros_like(a), jnp.ones_like(a)
    return jnp.stack([jnp.stack([a, b, tx]), jnp.stack([c, d, ty]), jnp.stack([z, z, o])])


def _geometric_matrix(x: jax.Array, name: str, magnitude: jax.Array, sign: jax.Array) -> jax.Array:
    """Output->input 3x3 matrix of a geometric RandAugment op."""
    m = jnp.asarray(magnitude, jnp.float32) / MAX_MAGNITUDE
    sign = jnp.asarray(sign, jnp.float32)
    z, o = jnp.float32(0.0), jnp.float32(1.0)
    if name == "Rotate":
        t = sign * m * MAX_ROTATE_DEG * math.pi / 180.0
        return _centered(x, _mat(jnp.cos(t), -jnp.sin(t), jnp.sin(t), jnp.cos(t), z, z))
    if name == "ShearX":
        return _centered(x, _mat(o, sign * m * MAX_SHEAR, z, o, z, z))
    if name == "ShearY":
        return _centered(x, _mat(o, z, sign * m * MAX_SHEAR, o, z, z))
    if name == "TranslateX":
        return _mat(o, z, z, o, sign * m * MAX_TRANSLATE * x.shape[1], z)
    if name == "TranslateY":
        return _mat(o, z, z, o, z, sign * m * MAX_TRANSLATE * x.shape[0])
    raise ValueError(f"{name!r} is not a geometric op; those are {GEOMETRIC_OPS}.")


def apply_randaugment_op(x: jax.Array, op: int | str, magnitude: jax.Array, sign: jax.Array | float = 1.0) -> jax.Array:
    """Applies one RandAugment op (see `RANDAUGMENT_OPS`) to a float [H, W, C] image in [0, 255]."""
    name = RANDAUGMENT_OPS[op] if isinstance(op, int) else op
    if name in GEOMETRIC_OPS:
        return _affine(x, _geometric_matrix(x, name, magnitude, sign))
    m = jnp.asarray(magnitude, jnp.float32) / MAX_MAGNITUDE
    sign = jnp.asarray(sign, jnp.float32)
    if name == "AutoContrast":
        return _autocontrast(x)
    if name == "Equalize":
        return _equalize(x)
    if name == "Invert":
        return 255.0 - x
    if name == "Posterize":
        return _posterize(x, 8 - (m * MAX_POSTERIZE_SHIFT).astype(jnp.int32))
    if name == "Solarize":
        return jnp.where(x >= SOLARIZE_MAX_THRESHOLD - m * SOLARIZE_MAX_THRESHOLD, 255.0 - x, x)
    if name == "SolarizeAdd":
        return jnp.where(x < SOLARIZE_ADD_THRESHOLD, jnp.minimum(x + m * MAX_SOLARIZE_ADD, 255.0), x)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = 1.0 + sign * m * MAX_ENHANCE
        if name == "Color":
            return _blend(jnp.broadcast_to(_gray(x), x.shape), x, factor)
        if name == "Contrast":
            return _blend(jnp.mean(jnp.round(_gray(x))), x, factor)
        if name == "Brightness":
            return _blend(jnp.zeros_like(x), x, factor)
        return _sharpness(x, factor)
    raise ValueError(f"Unknown RandAugment op {name!r}; known: {RANDAUGMENT_OPS}.")


def randaugment(
    key: jax.Array,
    x: jax.Array,
    num_layers: int,
    magnitude: float,
    *,
    prob: float = RANDAUGMENT_PROB,
    magnitude_std: float = RANDAUGMENT_MAGNITUDE_STD,
) -> jax.Array:
    """RandAugment (timm ``rand-m{magnitude}-mstd0.5-inc1`` style) of a float [H, W, C] image in [0, 255].

    Under ``vmap`` the op choice becomes a select over all ops (every op is computed), which is fine for the small
    images the device pipeline is meant for.
    """
    if num_layers <= 0:
        return x
    n = len(RANDAUGMENT_OPS)
    geometric = [i for i, name in enumerate(RANDAUGMENT_OPS) if name in GEOMETRIC_OPS]
    others = [i for i in range(n) if i not in geometric]

    def layer(y: jax.Array, k: jax.Array) -> tuple[jax.Array, None]:
        k_op, k_apply, k_mag, k_sign = jax.random.split(k, 4)
        idx = jax.random.randint(k_op, (), 0, n)
        idx = jnp.where(jax.random.uniform(k_apply) < prob, idx, n)  # n: identity
        mag = jnp.clip(magnitude + magnitude_std * jax.random.normal(k_mag), 0.0, MAX_MAGNITUDE)
        sign = jnp.where(jax.random.bernoulli(k_sign), -1.0, 1.0)
        # Geometric ops share one warp (their matrices are selected); under vmap a switch computes every
        # branch, so this keeps the per-image work and the compiled program small.
        mats = jnp.stack([_geometric_matrix(y, RANDAUGMENT_OPS[i], mag, sign) for i in geometric])
        pos = jnp.argmax(jnp.asarray(geometric) == idx)
        is_geo = jnp.any(jnp.asarray(geometric) == idx)
        warped = _affine(y, mats[pos])
        branch = jnp.sum(jnp.where(jnp.asarray(others) == idx, jnp.arange(len(others)), 0))
        branch = jnp.where(jnp.any(jnp.asarray(others) == idx), branch, len(others))
        fns = [lambda z, i=i: apply_randaugment_op(z, i, mag, sign) for i in others] + [lambda z: z]
        out = jnp.where(is_geo, warped, jax.lax.switch(branch, fns, y))
        return jnp.round(jnp.clip(out, 0.0, 255.0)), None

    # A scan over the layers: one traced/compiled layer whatever num_layers is.
    return jax.lax.scan(layer, x, jax.random.split(key, num_layers))[0]


def color_jitter(key: jax.Array, x: jax.Array, strength: float) -> jax.Array:
    """Brightness, contrast, saturation factors uniform in [1 - s, 1 + s] (saturation skipped for 1 channel)."""
    if strength <= 0:
        return x
    kb, kc, ks = jax.random.split(key, 3)
    lo, hi = policy.jitter_range(strength)
    x = _blend(jnp.zeros_like(x), x, jax.random.uniform(kb, minval=lo, maxval=hi))
    x = _blend(jnp.mean(_gray(x)), x, jax.random.uniform(kc, minval=lo, maxval=hi))
    if x.shape[-1] == 3:
        x = _blend(jnp.broadcast_to(_gray(x), x.shape), x, jax.random.uniform(ks, minval=lo, maxval=hi))
    return jnp.round(x)


def normalize(x: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """[0, 255] -> ``(x / 255 - mean) / std`` (float32)."""
    return (x.astype(jnp.float32) / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_erasing(
    key: jax.Array,
    x: jax.Array,
    prob: float,
    *,
    scale: tuple[float, float] = ERASING_SCALE,
    ratio: tuple[float, float] = ERASING_RATIO,
    attempts: int = ERASING_ATTEMPTS,
) -> jax.Array:
    """Random erasing as timm's RandomErasing (pixel mode, one box) on a NORMALISED image, with probability ``prob``."""
    if prob <= 0:
        return x
    h, w, _ = x.shape
    kp, ka, kr, kt, kl, kf = jax.random.split(key, 6)
    area = jax.random.uniform(ka, (attempts,), minval=scale[0], maxval=scale[1]) * h * w
    r = jnp.exp(jax.random.uniform(kr, (attempts,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    eh = jnp.round(jnp.sqrt(area * r)).astype(jnp.int32)
    ew = jnp.round(jnp.sqrt(area / r)).astype(jnp.int32)
    ok = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = jnp.argmax(ok)
    eh, ew = eh[first], ew[first]
    top = jnp.floor(jax.random.uniform(kt) * (h - eh + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(kl) * (w - ew + 1)).astype(jnp.int32)
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    box = box & jnp.any(ok) & (jax.random.uniform(kp) < prob)
    return jnp.where(box[:, :, None], jax.random.normal(kf, x.shape, x.dtype), x)


class _Kernels:
    """`cvt_flax.data.policy.Kernels` over this module's functions (already key-first)."""

    @staticmethod
    def split(rng: jax.Array, num: int) -> jax.Array:
        return jax.random.split(rng, num)

    @staticmethod
    def pad_crop(rng: jax.Array, image: jax.Array, size: int, padding: int) -> jax.Array:
        return pad_crop(rng, image, size, padding)

    @staticmethod
    def random_resized_crop(
        rng: jax.Array,
        image: jax.Array,
        size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        attempts: int,
    ) -> jax.Array:
        return random_resized_crop(rng, image, size, scale=scale, ratio=ratio, attempts=attempts)

    @staticmethod
    def resize(image: jax.Array, size: int) -> jax.Array:
        return resize(image, size)

    @staticmethod
    def random_flip(rng: jax.Array, image: jax.Array) -> jax.Array:
        return random_flip(rng, image)

    @staticmethod
    def randaugment(
        rng: jax.Array, image: jax.Array, num_layers: int, magnitude: float, prob: float, magnitude_std: float
    ) -> jax.Array:
        return randaugment(rng, image, num_layers, magnitude, prob=prob, magnitude_std=magnitude_std)

    @staticmethod
    def color_jitter(rng: jax.Array, image: jax.Array, strength: float) -> jax.Array:
        return color_jitter(rng, image, strength)

    @staticmethod
    def normalize(image: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
        return normalize(image, mean, std)

    @staticmethod
    def random_erasing(
        rng: jax.Array,
        image: jax.Array,
        prob: float,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        attempts: int,
    ) -> jax.Array:
        return random_erasing(rng, image, prob, scale=scale, ratio=ratio, attempts=attempts)


# The kernels `cvt_flax.data.policy.apply_train_policy` runs on the device (looked up at trace time).
KERNELS: Any = _Kernels()
