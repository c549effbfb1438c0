"""Mixup and CutMix in pure JAX (timm ``Mixup`` semantics, batch mode), for use inside the jitted train step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Proposals per Gamma draw: Marsaglia-Tsang accepts each with probability >= 0.95 for shape >= 1 (smaller shapes
# are boosted to shape + 1), so all 16 fail with probability < 1e-20.
GAMMA_PROPOSALS = 16


def log_gamma_sample(rng: jax.Array, alpha: float) -> jax.Array:
    """``log X`` for ``X ~ Gamma(alpha, 1)``: Marsaglia-Tsang with a fixed number of proposals, no loop.

    ``jax.random.gamma`` draws with a ``while`` loop of rejections, which compiles slowly for GPUs and TPUs
    (two Beta draws took 10 s of the H100 target's compile; this takes a fraction of a second). Here
    `GAMMA_PROPOSALS` proposals are drawn at once and the first accepted one is kept; shapes below 1 use
    ``Gamma(a) = Gamma(a + 1) * U ** (1 / a)``, in log space so that small shapes do not underflow.
    """
    k_norm, k_accept, k_boost = jax.random.split(rng, 3)
    a = float(alpha) + 1.0 if alpha < 1 else float(alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / np.sqrt(9.0 * d)
    x = jax.random.normal(k_norm, (GAMMA_PROPOSALS,), jnp.float32)
    u = jax.random.uniform(k_accept, (GAMMA_PROPOSALS,), jnp.float32, minval=np.finfo(np.float32).tiny)
    v = (1.0 + c * x) ** 3
    safe_v = jnp.where(v > 0, v, 1.0)
    accept = (v > 0) & (jnp.log(u) < 0.5 * x**2 + d - d * safe_v + d * jnp.log(safe_v))
    log_x = jnp.log(d) + jnp.log(safe_v[jnp.argmax(accept)])  # the first accepted (all rejected: ~never)
    if alpha < 1:
        boost = jax.random.uniform(k_boost, (), jnp.float32, minval=np.finfo(np.float32).tiny)
        log_x = log_x + jnp.log(boost) / float(alpha)
    return log_x


def beta_sample(rng: jax.Array, a: float, b: float) -> jax.Array:
    """A scalar ``Beta(a, b)`` draw, ``X / (X + Y)`` with Gamma draws `log_gamma_sample` (no loop to compile)."""
    k_a, k_b = jax.random.split(rng)
    return jax.nn.sigmoid(log_gamma_sample(k_a, a) - log_gamma_sample(k_b, b))


def cutmix_box(rng: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """CutMix box (timm ``rand_bbox``): area about ``(1 - lam) * H * W``, centred at a uniform point, clipped.

    Args:
      rng: PRNG key.
      lam: Sampled lambda (scalar).
      height: Image height.
      width: Image width.

    Returns:
      (mask [H, W] bool, True inside the box; corrected lambda ``1 - box_area / (H * W)``).
    """
    k_y, k_x = jax.random.split(rng)
    cut_rat = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut_rat).astype(jnp.int32)
    cut_w = jnp.floor(width * cut_rat).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    y0 = jnp.clip(cy - cut_h // 2, 0, height)
    y1 = jnp.clip(cy + cut_h // 2, 0, height)
    x0 = jnp.clip(cx - cut_w // 2, 0, width)
    x1 = jnp.clip(cx + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
    return mask, 1.0 - area / float(height * width)


def mix_batch(rng: jax.Array, images: jax.Array, targets: jax.Array, aug_config: Any) -> tuple[jax.Array, jax.Array]:
    """Mixup / CutMix of a batch with its reverse (timm batch mode; one lambda per batch).

    With probability ``mix_prob`` the batch is mixed: by CutMix with probability ``cutmix_switch_prob`` when both
    alphas are positive (only the enabled one otherwise), else by Mixup. Mixup: ``lam * x + (1 - lam) * x[::-1]``
    with ``lam ~ Beta(mixup_alpha, mixup_alpha)`` (`beta_sample`). CutMix: a box of ``x[::-1]`` pasted into ``x``, with
    ``lam ~ Beta(cutmix_alpha, cutmix_alpha)`` corrected to the box's actual area. Targets become
    ``lam * t + (1 - lam) * t[::-1]``. Identity when both alphas are 0 (or ``mix_prob`` is 0).

    Args:
      rng: PRNG key.
      images: [B, H, W, C] float images (any float dtype; kept).
      targets: [B, num_classes] one-hot (or already smoothed) targets.
      aug_config: ``config.aug`` (``mixup_alpha``, ``cutmix_alpha``, ``mix_prob``, ``cutmix_switch_prob``; their
        defaults live in ``configs/default.py``), or a dict with those four keys. Python values: they select the
        code path at trace time.

    Returns:
      (mixed images, soft targets float32 [B, num_classes]).
    """
    mixup_alpha = float(aug_config["mixup_alpha"])
    cutmix_alpha = float(aug_config["cutmix_alpha"])
    prob = float(aug_config["mix_prob"])
    switch_prob = float(aug_config["cutmix_switch_prob"])
    targets = targets.astype(jnp.float32)
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
        return images, targets
    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
    _, height, width = images.shape[:3]
    flipped = images[::-1]
    apply = jax.random.uniform(k_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)

    lam_mix = beta_sample(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
    lam_cut = beta_sample(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
    box, lam_cut = cutmix_box(k_box, lam_cut, height, width)

    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
    mixed = (lam_mix * images.astype(jnp.float32) + (1.0 - lam_mix) * flipped.astype(jnp.float32)).astype(images.dtype)
    cut = jnp.where(box[None, :, :, None], flipped, images)
    out = jnp.where(apply, jnp.where(use_cutmix, cut, mixed), images)
    return out, lam * targets + (1.0 - lam) * targets[::-1]
