"""Registry of named CvT variants.

Official variants (``cvt_13``, ``cvt_21``, ``cvt_w24``) copy the ``MODEL.SPEC`` of
microsoft/CvT's ``experiments/imagenet/cvt/*.yaml``. Low-resolution variants
(``*_32``) are ours, for 32x32 (CIFAR) and 28x28 (Fashion-MNIST) inputs, and
``cvt_tiny`` exists for tests.

    >>> from cvt_flax import models
    >>> model = models.create_model("cvt_13", num_classes=1000)
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from cvt_flax.models.cvt import CvT
from cvt_flax.models.spec import CvTSpec


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named architecture.

    Attributes:
      name: Registry name.
      spec: The architecture.
      image_size: The input side length the variant is meant for.
      description: One line for tables and error messages.
    """

    name: str
    spec: CvTSpec
    image_size: int
    description: str


_REGISTRY: dict[str, Variant] = {}


def register(name: str, image_size: int, description: str) -> Callable[[Callable[[], CvTSpec]], Callable[[], CvTSpec]]:
    """Decorator registering a function that returns a `CvTSpec` under ``name``."""

    def wrap(fn: Callable[[], CvTSpec]) -> Callable[[], CvTSpec]:
        if name in _REGISTRY:
            raise ValueError(f"Variant {name!r} is registered twice.")
        _REGISTRY[name] = Variant(name, fn(), image_size, description)
        return fn

    return wrap


@register("cvt_13", 224, "CvT-13 (official, ImageNet 224/384)")
def cvt_13() -> CvTSpec:
    """CvT-13: 1-2-10 blocks, widths 64-192-384 (``cvt-13-224x224.yaml``)."""
    return CvTSpec()


@register("cvt_21", 224, "CvT-21 (official, ImageNet 224/384)")
def cvt_21() -> CvTSpec:
    """CvT-21: 1-4-16 blocks, widths 64-192-384 (``cvt-21-224x224.yaml``)."""
    return CvTSpec(depth=(1, 4, 16))


@register("cvt_w24", 384, "CvT-W24 (official, ImageNet-22k 384)")
def cvt_w24() -> CvTSpec:
    """CvT-W24: 2-2-20 blocks, widths 192-768-1024 (``cvt-w24-384x384.yaml``)."""
    return CvTSpec(
        dim_embed=(192, 768, 1024),
        num_heads=(3, 12, 16),
        depth=(2, 2, 20),
        drop_path_rate=(0.0, 0.0, 0.3),
    )


def _low_res(depth: tuple[int, ...], **kw: Any) -> CvTSpec:
    """The low-resolution stem shared by the ``*_32`` variants.

    Official CvT embeds 7x7/stride-4 patches, then halves the token grid twice:
    a 32x32 image leaves 8x8, 4x4 and finally 2x2 tokens in stage 3, where ten of
    CvT-13's thirteen blocks live. Four tokens are too few to attend over, and a
    7x7 stride-4 stem discards most of a 32x32 image's detail; that is one cause
    of the 34% a straight CvT-13 reached on CIFAR-100. Here the stem is a 3x3
    stride-1 conv (no information lost at the first embedding), and the next two
    embeddings halve the grid as officially: 32x32 -> 32x32, 16x16, 8x8 tokens (28
    -> 28, 14, 7 for Fashion-MNIST), the same 8x8 last-stage grid that CIFAR ViTs
    with 4x4 patches use. Keys/values are still squeezed (stride 2) in the first
    two stages, where tokens are many, but not in the last, where 64 tokens are
    already cheap and a 4x4 key grid would throw away spatial detail.
    """
    base = dict(
        patch_size=(3, 3, 3),
        patch_stride=(1, 2, 2),
        patch_padding=(1, 1, 1),
        stride_kv=(2, 2, 1),
        depth=depth,
    )
    base.update(kw)
    return CvTSpec(**base)


@register("cvt_13_32", 32, "CvT-13 widths/depths, low-resolution stem (32x32)")
def cvt_13_32() -> CvTSpec:
    """CvT-13 blocks and widths with the low-resolution stem (see `_low_res`)."""
    return _low_res((1, 2, 10))


@register("cvt_21_32", 32, "CvT-21 widths/depths, low-resolution stem (32x32)")
def cvt_21_32() -> CvTSpec:
    """CvT-21 blocks and widths with the low-resolution stem (see `_low_res`)."""
    return _low_res((1, 4, 16))


@register("cvt_6_32", 32, "small CvT, low-resolution stem (32x32), for quick runs")
def cvt_6_32() -> CvTSpec:
    """A 1-1-4 block CvT with widths 64-128-256 and the low-resolution stem.

    About a fifth of `cvt_13_32`'s compute, for short GPU budgets (e.g. a
    Fashion-MNIST run in minutes).
    """
    return _low_res((1, 1, 4), dim_embed=(64, 128, 256), num_heads=(1, 2, 4))


@register("cvt_mini", 32, "CPU-sized CvT (stride-2 stem, widths 32-64-128)")
def cvt_mini() -> CvTSpec:
    """A CPU-sized CvT: 3x3 stride-2 stem, 1-1-2 blocks, widths 32-64-128.

    28x28 inputs give 14x14, 7x7 and 4x4 token grids; about 15M multiply-adds per
    image, so an epoch of Fashion-MNIST takes minutes on two CPU cores.
    """
    return CvTSpec(
        patch_size=(3, 3, 3),
        patch_stride=(2, 2, 2),
        patch_padding=(1, 1, 1),
        dim_embed=(32, 64, 128),
        num_heads=(1, 2, 4),
        depth=(1, 1, 2),
        stride_kv=(2, 1, 1),
        drop_path_rate=(0.0, 0.0, 0.05),
    )


@register("cvt_tiny", 32, "tiny CvT for tests")
def cvt_tiny() -> CvTSpec:
    """A tiny CvT for tests: every code path (dw_bn, cls token, drop path), little compute."""
    return CvTSpec(
        patch_size=(3, 3, 3),
        patch_stride=(2, 2, 2),
        patch_padding=(1, 1, 1),
        dim_embed=(16, 32, 48),
        num_heads=(1, 2, 3),
        depth=(1, 1, 2),
        mlp_ratio=(2.0, 2.0, 2.0),
        drop_path_rate=(0.0, 0.0, 0.1),
    )


def list_models() -> list[str]:
    """Names of all registered variants."""
    return sorted(_REGISTRY)


def get_variant(name: str) -> Variant:
    """Looks up a variant by name.

    Raises:
      ValueError: naming the registered variants (and the closest match).
    """
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown CvT variant {name!r}.{hint} Registered variants: {', '.join(list_models())}.")
    return _REGISTRY[key]


def get_spec(name: str, **overrides: Any) -> CvTSpec:
    """The `CvTSpec` of variant ``name`` with any fields overridden."""
    spec = get_variant(name).spec
    return spec.replace(**overrides) if overrides else spec


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype: Any) -> Any:
    """Accepts a dtype or its name (``'bfloat16'``)."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}.")
        return _DTYPES[dtype]
    return dtype


def create_model(
    name: str | CvTSpec,
    num_classes: int = 1000,
    *,
    act: str = "quick_gelu",
    init_method: str = "trunc_norm",
    attention_impl: str = "explicit",
    depthwise_impl: str = "conv",
    remat: bool = False,
    scan_blocks: bool = False,
    head_init_std: float = 0.02,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    **spec_overrides: Any,
) -> CvT:
    """Builds a `CvT` module.

    Args:
      name: A registered variant name (see `list_models`) or a `CvTSpec`.
      num_classes: Classifier outputs (0: return pooled features).
      act: ``quick_gelu`` (official) or ``gelu`` (HuggingFace port).
      init_method: ``trunc_norm`` (official default) or ``xavier``: the blocks' Linear initialisation.
      attention_impl: ``explicit``, ``xla`` or ``cudnn``.
      depthwise_impl: ``conv`` or ``shift`` (faster on CPU; same parameters).
      remat: Rematerialise blocks in the backward pass.
      scan_blocks: Each stage's blocks as one ``lax.scan`` (same parameters; compiled once per stage).
      head_init_std: Std of the head init (0 for a zero head).
      dtype: Compute dtype or its name.
      param_dtype: Parameter dtype or its name.
      **spec_overrides: `CvTSpec` fields to override (e.g. ``in_chans=1``,
        ``drop_path_rate=(0, 0, 0.2)``).

    Returns:
      The Flax module (uninitialised).
    """
    spec = name if isinstance(name, CvTSpec) else get_spec(name)
    if spec_overrides:
        spec = spec.replace(**spec_overrides)
    return CvT(
        spec=spec,
        num_classes=num_classes,
        act=act,
        init_method=init_method,
        attention_impl=attention_impl,
        depthwise_impl=depthwise_impl,
        remat=remat,
        scan_blocks=scan_blocks,
        head_init_std=head_init_std,
        dtype=as_dtype(dtype),
        param_dtype=as_dtype(param_dtype),
    )
