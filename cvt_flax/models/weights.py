"""CvT weight names: ours, the official microsoft/CvT ones and HuggingFace's, and the model's head and stem.

What timm keeps next to a model (``checkpoint_filter_fn``, ``pretrained_cfg``) lives here, beside the model:

* `CLASSIFIER` and `FIRST_CONV`: the parameter paths of the classifier head and the stem convolution (what
  fine-tuning re-initialises and what a channel mismatch shows in);
* the key tables official <-> HuggingFace (`hf_key_to_official`, `official_key_to_hf` and their state-dict
  versions) and Flax path <-> official key with the layout transposes (`expected_shapes`, `flax_to_official`,
  `to_flax`);
* `HF_CONFIG_KEYS`: HuggingFace ``CvtConfig`` fields <-> `CvTSpec` fields, both ways (`spec_from_hf_config`,
  `hf_config_from_spec`).

`cvt_flax.convert` reads checkpoint files and infers architectures with these; the torch benchmark builds its
HuggingFace model from `hf_config_from_spec`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cvt_flax.models.spec import CvTSpec

# The classifier head (a top-level module) and the stem convolution, as '/'-joined parameter paths.
CLASSIFIER = "head"
FIRST_CONV = "stage0/patch_embed/proj"


def is_classifier(path: str) -> bool:
    """Whether a '/'-joined variable path (``params/head/kernel``, ``head/bias``) belongs to the classifier."""
    parts = path.split("/")
    if parts[0] in ("params", "batch_stats"):
        parts = parts[1:]
    return bool(parts) and parts[0] == CLASSIFIER


def _listing(items: Sequence[str], limit: int = 25) -> str:
    items = list(items)
    shown = ", ".join(f"`{i}`" for i in items[:limit])
    return shown + (f" … and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------
# Key names: HuggingFace <-> official.
# ---------------------------------------------------------------------------

# Module paths inside a block (official, HuggingFace). The parameter leaf
# (weight, bias, running_mean, ...) is the same in both.
_BLOCK_MODULES: list[tuple[str, str]] = [
    ("norm1", "layernorm_before"),
    ("norm2", "layernorm_after"),
    ("attn.proj", "attention.output.dense"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
]
for _short, _long in (("q", "query"), ("k", "key"), ("v", "value")):
    _conv = f"attention.attention.convolution_projection_{_long}.convolution_projection"
    _BLOCK_MODULES += [
        (f"attn.conv_proj_{_short}.conv", f"{_conv}.convolution"),
        (f"attn.conv_proj_{_short}.bn", f"{_conv}.normalization"),
        (f"attn.proj_{_short}", f"attention.attention.projection_{_long}"),
    ]
_STAGE_MODULES: list[tuple[str, str]] = [
    ("patch_embed.proj", "embedding.convolution_embeddings.projection"),
    ("patch_embed.norm", "embedding.convolution_embeddings.normalization"),
]
_TOP_MODULES: list[tuple[str, str]] = [("norm", "layernorm"), ("head", "classifier")]

_OFFICIAL_KEY = re.compile(r"^stage(\d+)\.(?:blocks\.(\d+)\.)?(.+)\.(\w+)$")
_HF_KEY = re.compile(r"^(?:cvt\.)?encoder\.stages\.(\d+)\.(?:layers\.(\d+)\.)?(.+)\.(\w+)$")
_OFFICIAL_CLS = re.compile(r"^stage(\d+)\.cls_token$")
_HF_CLS = re.compile(r"^(?:cvt\.)?encoder\.stages\.(\d+)\.cls_token$")


def hf_key_to_official(key: str) -> str | None:
    """Official microsoft/CvT name of a HuggingFace ``CvtForImageClassification`` key (None if unknown)."""
    if m := _HF_CLS.match(key):
        return f"stage{m.group(1)}.cls_token"
    if m := _HF_KEY.match(key):
        stage, block, module, leaf = m.groups()
        table = _BLOCK_MODULES if block is not None else _STAGE_MODULES
        for official, hf in table:
            if module == hf:
                prefix = f"stage{stage}." + (f"blocks.{block}." if block is not None else "")
                return f"{prefix}{official}.{leaf}"
        return None
    module, _, leaf = key.rpartition(".")
    for official, hf in _TOP_MODULES:
        if module == hf:
            return f"{official}.{leaf}"
    return None


def official_key_to_hf(key: str) -> str | None:
    """HuggingFace name of an official microsoft/CvT key (None if unknown)."""
    if m := _OFFICIAL_CLS.match(key):
        return f"cvt.encoder.stages.{m.group(1)}.cls_token"
    if m := _OFFICIAL_KEY.match(key):
        stage, block, module, leaf = m.groups()
        table = _BLOCK_MODULES if block is not None else _STAGE_MODULES
        for official, hf in table:
            if module == official:
                prefix = f"cvt.encoder.stages.{stage}." + (f"layers.{block}." if block is not None else "")
                return f"{prefix}{hf}.{leaf}"
        return None
    module, _, leaf = key.rpartition(".")
    for official, hf in _TOP_MODULES:
        if module == official:
            return f"{hf}.{leaf}"
    return None


def hf_to_official_keys(state_dict: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """Renames a HuggingFace CvT state dict to the official microsoft/CvT key names.

    Args:
      state_dict: HuggingFace ``CvtForImageClassification`` (or ``CvtModel``) state dict.
      strict: Raise on keys that have no official counterpart; otherwise keep
        them under their HuggingFace name.

    Returns:
      A new dict with official key names (values untouched).

    Raises:
      ValueError: naming the keys that could not be renamed (strict mode).
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = hf_key_to_official(key)
        if new is None:
            unknown.append(key)
            new = key
        out[new] = value
    if strict and unknown:
        raise ValueError(
            f"{len(unknown)} key(s) are not HuggingFace CvT parameter names: {_listing(unknown)}. "
            "Pass a CvtForImageClassification/CvtModel state dict."
        )
    return out


def official_to_hf_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Renames an official microsoft/CvT state dict to HuggingFace names (inverse of `hf_to_official_keys`).

    Raises:
      ValueError: naming keys that have no HuggingFace counterpart.
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        new = official_key_to_hf(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not official CvT parameter names: {_listing(unknown)}.")
    return out


def detect_source(keys: Sequence[str]) -> str:
    """Guesses the checkpoint format from its key names: ``official`` or ``hf``.

    Raises:
      ValueError: when the keys look like neither (or both), with example keys.
    """
    official = any(re.match(r"^stage\d+\.", k) for k in keys)
    hf = any(re.match(r"^(?:cvt\.)?encoder\.stages\.\d+\.", k) for k in keys)
    if official != hf:
        return "official" if official else "hf"
    what = "both official (`stage0.…`) and HuggingFace (`cvt.encoder.stages.0.…`)" if official else "no CvT"
    raise ValueError(
        f"Cannot tell the checkpoint format: found {what} parameter names (first keys: {_listing(sorted(keys), 8)}). "
        "Expected official microsoft/CvT keys like `stage0.patch_embed.proj.weight` or HuggingFace keys like "
        "`cvt.encoder.stages.0.embedding.convolution_embeddings.projection.weight`; pass source='official'|'hf' "
        "(CLI: --source) if the keys are right."
    )


# ---------------------------------------------------------------------------
# Expected parameters of a spec, derived from the Flax model itself.
# ---------------------------------------------------------------------------


def flax_to_official(path: tuple[str, ...]) -> str:
    """('params', 'stage2', 'blocks_0', 'attn', 'proj_q', 'kernel') -> 'stage2.blocks.0.attn.proj_q.weight'."""
    collection, *modules, leaf = path
    parts = []
    for m in modules:
        parts.extend(m.split("_", 1) if re.fullmatch(r"blocks_\d+", m) else [m])
    if collection == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
    elif leaf in ("kernel", "scale"):
        leaf = "weight"
    return ".".join([*parts, leaf])


def _torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(flax_shape) == 4:  # [kh, kw, in, out] -> [out, in, kh, kw]
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    if leaf == "kernel" and len(flax_shape) == 2:  # [in, out] -> [out, in]
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:
        return np.ascontiguousarray(array.T)
    return np.ascontiguousarray(array)


@functools.lru_cache(maxsize=32)
def model_layout(spec: CvTSpec, num_classes: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Official key -> (Flax variable path, torch-layout shape) of the model built from ``spec``."""
    import jax
    import jax.numpy as jnp

    from cvt_flax.models import create_model

    model = create_model(spec, num_classes)
    size = spec.min_input_size()
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, spec.in_chans), jnp.float32), train=False)
    )
    layout = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = tuple(p.key for p in path)
        layout[flax_to_official(names)] = (names, _torch_shape(tuple(leaf.shape), names[-1]))
    return layout


def expected_shapes(spec: CvTSpec, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Official-name state-dict shapes of a cvt-flax model (``num_batches_tracked`` omitted)."""
    return {k: shape for k, (_, shape) in model_layout(spec, num_classes).items()}


# ---------------------------------------------------------------------------
# HuggingFace config <-> CvTSpec.
# ---------------------------------------------------------------------------

# HuggingFace CvtConfig field -> CvTSpec field.
HF_CONFIG_KEYS = {
    "patch_sizes": "patch_size",
    "patch_stride": "patch_stride",
    "patch_padding": "patch_padding",
    "embed_dim": "dim_embed",
    "num_heads": "num_heads",
    "depth": "depth",
    "mlp_ratio": "mlp_ratio",
    "drop_rate": "drop_rate",
    "attention_drop_rate": "attn_drop_rate",
    "drop_path_rate": "drop_path_rate",
    "qkv_bias": "qkv_bias",
    "cls_token": "cls_token",
    "qkv_projection_method": "qkv_proj_method",
    "kernel_qkv": "kernel_qkv",
    "padding_q": "padding_q",
    "padding_kv": "padding_kv",
    "stride_q": "stride_q",
    "stride_kv": "stride_kv",
}


def spec_from_hf_config(config: Mapping[str, Any]) -> CvTSpec:
    """Builds a `CvTSpec` from a HuggingFace ``CvtConfig`` dict (``config.json``).

    Fields the dict lacks take the ``CvtConfig`` defaults, which are CvT-13's
    (the `CvTSpec` defaults).
    """
    kwargs: dict[str, Any] = {field: tuple(config[key]) for key, field in HF_CONFIG_KEYS.items() if key in config}
    if "num_channels" in config:
        kwargs["in_chans"] = int(config["num_channels"])
    return CvTSpec(**kwargs)


def hf_config_from_spec(spec: CvTSpec, num_classes: int = 1000) -> dict[str, Any]:
    """``CvtConfig`` keyword arguments with the architecture of ``spec`` (inverse of `spec_from_hf_config`).

    Raises:
      ValueError: for ``qkv_proj_method='avg'``, which the HuggingFace port does not implement.
    """
    if "avg" in spec.qkv_proj_method:
        raise ValueError(
            "The HuggingFace CvT has no 'avg' key/value projection (only dw_bn and linear); use a variant with "
            f"qkv_proj_method in ('dw_bn', 'linear'), got {spec.qkv_proj_method}."
        )
    out: dict[str, Any] = {key: list(getattr(spec, field)) for key, field in HF_CONFIG_KEYS.items()}
    out.update(num_channels=spec.in_chans, num_labels=num_classes, layer_norm_eps=1e-5)
    return out
