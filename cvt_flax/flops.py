"""Multiply-add counts of CvT models, in the paper's convention.

The paper (Table 2: 4.5G CvT-13, 7.1G CvT-21, 60.86G CvT-W24 at 384) reports
multiply-accumulates ("FLOPs" = MACs) counted as microsoft/CvT does: every conv
and linear layer costs ``weights x output positions`` (a multiply-add counted
once), attention costs ``2 x T_q x T_kv x dim`` (``Attention.compute_macs``), and
norms, activations, softmax and BatchNorm cost nothing.
"""

from __future__ import annotations

import math
from typing import Any

from cvt_flax.models.spec import CvTSpec, conv_out_size


def _pool_out_ceil(n: int, k: int, s: int, p: int) -> int:
    out = -(-(n + 2 * p - k) // s) + 1
    if (out - 1) * s >= n + p:
        out -= 1
    return out


def _proj_grid(method: str, h: int, w: int, c: int, k: int, stride: int, pad: int) -> tuple[int, int, float]:
    """Output grid of a conv projection and its weights per output position."""
    if method == "dw_bn":
        return conv_out_size(h, k, stride, pad), conv_out_size(w, k, stride, pad), float(k * k * c)
    if method == "avg":
        return _pool_out_ceil(h, k, stride, pad), _pool_out_ceil(w, k, stride, pad), 0.0
    return h, w, 0.0


def count_macs(
    spec: CvTSpec | str,
    image_size: int | tuple[int, int] = 224,
    num_classes: int = 1000,
    *,
    breakdown: bool = False,
) -> Any:
    """Multiply-adds per image of a CvT (paper convention).

    Args:
      spec: A `CvTSpec` or a registered variant name.
      image_size: Input side, or ``(height, width)``.
      num_classes: Classifier outputs (0: no head).
      breakdown: Return a dict per component instead of the total.

    Returns:
      Total MACs per image (float), or a dict of components when ``breakdown``.
    """
    if isinstance(spec, str):
        from cvt_flax.models.registry import get_spec

        spec = get_spec(spec)
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    spec.token_grid(h, w)  # validates the size
    parts = {"embed": 0.0, "conv_proj": 0.0, "qkv": 0.0, "attention": 0.0, "out_proj": 0.0, "mlp": 0.0, "head": 0.0}
    c_in = spec.in_chans
    for i in range(spec.num_stages):
        k, s, p = spec.patch_size[i], spec.patch_stride[i], spec.patch_padding[i]
        h, w = conv_out_size(h, k, s, p), conv_out_size(w, k, s, p)
        c = spec.dim_embed[i]
        parts["embed"] += (k * k * c_in * c + c) * h * w
        cls = 1 if spec.cls_token[i] else 0
        t = h * w + cls
        method = spec.qkv_proj_method[i]
        kq = spec.kernel_qkv[i]

        q_method = "linear" if method == "avg" else method
        hq, wq, conv_q = _proj_grid(q_method, h, w, c, kq, spec.stride_q[i], spec.padding_q[i])
        hk, wk, conv_kv = _proj_grid(method, h, w, c, kq, spec.stride_kv[i], spec.padding_kv[i])
        t_q, t_kv = hq * wq + cls, hk * wk + cls
        lin = c * c + (c if spec.qkv_bias[i] else 0)
        hidden = int(c * spec.mlp_ratio[i])
        per_block = {
            "conv_proj": conv_q * hq * wq + 2 * conv_kv * hk * wk,
            "qkv": lin * (t_q + 2 * t_kv),
            "attention": 2.0 * t_q * t_kv * c,
            "out_proj": (c * c + c) * t,
            "mlp": ((c * hidden + hidden) + (hidden * c + c)) * t,
        }
        for key, value in per_block.items():
            parts[key] += value * spec.depth[i]
        c_in = c
    if num_classes:
        parts["head"] = float(spec.dim_embed[-1] * num_classes + num_classes)
    if breakdown:
        return parts
    return float(math.fsum(parts.values()))


def train_flops_per_image(
    spec: CvTSpec | str, image_size: int | tuple[int, int] = 224, num_classes: int = 1000
) -> float:
    """Floating-point operations of one training step per image (forward + backward).

    ``2 x MACs`` for the forward pass, twice that for the backward: ``6 x MACs``,
    the usual convention for model FLOP utilisation (MFU).
    """
    return 6.0 * count_macs(spec, image_size, num_classes)


def inference_flops_per_image(
    spec: CvTSpec | str, image_size: int | tuple[int, int] = 224, num_classes: int = 1000
) -> float:
    """Floating-point operations of one forward pass per image (``2 x MACs``)."""
    return 2.0 * count_macs(spec, image_size, num_classes)
