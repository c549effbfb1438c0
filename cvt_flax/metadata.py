"""What a model directory says about its inputs and outputs: class names and preprocessing.

Every cvt-flax model directory (``model.json``) carries, next to the architecture:

* ``class_names``: one name per output (HuggingFace ``id2label``; the 1,000 ImageNet-1k names for official
  ImageNet checkpoints; the folder names of an image-folder run; the TFDS label names of a TFDS run);
* ``image_size``: the square input side the checkpoint was trained or fine-tuned at;
* ``preprocessing``: how an image becomes the model's input, a dict with

  - ``image_size``: output side length;
  - ``crop``: ``'center'`` (resize the shorter side to ``resize`` keeping the aspect ratio, then crop the
    centre ``image_size`` square) or ``'none'`` (resize the whole image to ``image_size`` squared);
  - ``resize``: the shorter side before the centre crop (``image_size`` when ``crop='none'``);
  - ``interpolation``: ``'bilinear'`` or ``'bicubic'`` (PIL filters);
  - ``mean`` / ``std``: per-channel normalisation on the [0, 1] scale: ``(x / 255 - mean) / std``;
  - ``channels``: 1 (luminance, ITU-R 601-2 as PIL's ``'L'``) or 3 (RGB).

The values for official checkpoints follow microsoft/CvT's eval transform
(``lib/dataset/transformas/build.py`` and ``experiments/imagenet/cvt/*.yaml`` of github.com/microsoft/CvT):
224x224 models resize the shorter side to ``int(224 / 0.875) = 256`` and crop the centre 224 (``TEST.CENTER_CROP``
defaults to True); 384x384 models set ``TEST.CENTER_CROP: False`` and resize to 384x384; ``TEST.INTERPOLATION: 3``
(bicubic); ``INPUT.MEAN``/``INPUT.STD`` are the ImageNet statistics. HuggingFace checkpoints ship a
``preprocessor_config.json`` for ``ConvNextImageProcessor``, which encodes the same rule (``crop_pct`` applies below
384 pixels, larger sizes are resized without cropping); it is read when present.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cvt_flax import paths

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, what PIL's "L" conversion computes (cvt_flax.data.info.LUMA).
LUMA = (0.2989, 0.5870, 0.1140)
DEFAULT_CROP_PCT = 0.875
CROPS = ("center", "none")
INTERPOLATIONS = ("bilinear", "bicubic")
# PIL resampling codes used in HuggingFace preprocessor_config.json ("resample") -> our names.
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}
IMAGENET_CLASSES_FILE = "imagenet1k_classes.txt"


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in class-index order.

    Shipped as ``cvt_flax/data_files/imagenet1k_classes.txt``, a copy of ``imagenet_classes.txt`` from
    github.com/pytorch/hub (commit c7895df7; see ``cvt_flax/data_files/README.md``).
    """
    from importlib import resources

    text = (resources.files("cvt_flax") / "data_files" / IMAGENET_CLASSES_FILE).read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f"{IMAGENET_CLASSES_FILE} holds {len(names)} names instead of 1000: the package is damaged.")
    return names


def _to_channels(values: Sequence[float], channels: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3:  # RGB statistics seen through the luminance conversion
        return [float(sum(w * v for w, v in zip(LUMA, values, strict=True)))]
    raise ValueError(f"Cannot map {len(values)} normalisation values to {channels} channels.")


def make_preprocessing(
    image_size: int,
    *,
    crop: str = "none",
    crop_pct: float = DEFAULT_CROP_PCT,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels: int = 3,
    source: str = "",
) -> dict[str, Any]:
    """A validated ``preprocessing`` dict (see the module docstring).

    Args:
      image_size: The model's input side length.
      crop: ``'center'`` or ``'none'``.
      crop_pct: With ``crop='center'``: the crop's share of the resized shorter side (resize to
        ``floor(image_size / crop_pct)``).
      interpolation: ``'bilinear'`` or ``'bicubic'``.
      mean: Normalisation mean ([0, 1] scale), one value or one per channel.
      std: Normalisation std ([0, 1] scale), one value or one per channel.
      channels: 1 (luminance) or 3 (RGB).
      source: Where the values come from (kept for people reading ``model.json``).

    Returns:
      The dict stored in ``model.json`` under ``preprocessing``.

    Raises:
      ValueError: for an unknown crop, interpolation or channel count.
    """
    if crop not in CROPS:
        raise ValueError(f"Unknown crop {crop!r}; use one of {CROPS}.")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"Unknown interpolation {interpolation!r}; use one of {INTERPOLATIONS}.")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
    size = int(image_size)
    resize = int(math.floor(size / crop_pct)) if crop == "center" else size
    out = {
        "image_size": size,
        "crop": crop,
        "resize": resize,
        "interpolation": interpolation,
        "mean": _to_channels(mean, channels),
        "std": _to_channels(std, channels),
        "channels": int(channels),
    }
    if source:
        out["source"] = source
    return out


def official_preprocessing(image_size: int, channels: int = 3) -> dict[str, Any]:
    """The eval transform of microsoft/CvT for a checkpoint at ``image_size`` (see the module docstring)."""
    return make_preprocessing(
        image_size,
        crop="center" if image_size < 384 else "none",
        interpolation="bicubic",
        channels=channels,
        source="microsoft/CvT eval transform (experiments/imagenet/cvt/*.yaml)",
    )


def hf_preprocessing(preprocessor_config: Mapping[str, Any], channels: int = 3) -> dict[str, Any]:
    """Translates a HuggingFace ``preprocessor_config.json`` (``ConvNextImageProcessor``) to ``preprocessing``.

    ``size`` (an int, ``{'shortest_edge': n}`` or ``{'height': n, 'width': n}``) below 384 means: resize the
    shorter side to ``size / crop_pct`` and crop the centre; 384 or more: resize to ``size x size``.
    """
    size = preprocessor_config.get("size", 224)
    if isinstance(size, Mapping):
        size = size.get("shortest_edge") or size.get("height") or 224
    size = int(size)
    crop_pct = float(preprocessor_config.get("crop_pct") or DEFAULT_CROP_PCT)
    return make_preprocessing(
        size,
        crop="center" if size < 384 else "none",
        crop_pct=crop_pct,
        interpolation=_PIL_RESAMPLE.get(int(preprocessor_config.get("resample", 3)), "bicubic"),
        mean=preprocessor_config.get("image_mean") or IMAGENET_MEAN,
        std=preprocessor_config.get("image_std") or IMAGENET_STD,
        channels=channels,
        source="HuggingFace preprocessor_config.json (ConvNextImageProcessor)",
    )


def run_preprocessing(config: Any, dataset_info: Any) -> dict[str, Any]:
    """The eval preprocessing of a training run (what its evaluation fed the model).

    Args:
      config: The run config (``image_size``, ``aug.eval_crop``, ``aug.eval_crop_ratio``).
      dataset_info: `cvt_flax.data.DatasetInfo` (``mean``, ``std``, ``channels``, as ``cvt_flax/data/info.py``
        computes them from ``config.input.normalization``).
    """
    aug = config.get("aug") or {}
    center = str(aug.get("eval_crop", "resize")) == "center_crop"
    return make_preprocessing(
        int(config.image_size),
        crop="center" if center else "none",
        crop_pct=float(aug.get("eval_crop_ratio", DEFAULT_CROP_PCT)),
        interpolation="bilinear",  # both input pipelines resize bilinearly with antialiasing
        mean=dataset_info.mean,
        std=dataset_info.std,
        channels=int(dataset_info.channels),
        source=f"cvt-flax training run on {dataset_info.name} (eval preprocessing)",
    )


def run_metadata(config: Any, dataset_info: Any) -> dict[str, Any]:
    """``class_names`` and ``preprocessing`` of a training run, for its ``model.json``."""
    names = list(dataset_info.class_names) if dataset_info.class_names else None
    if names is not None and len(names) != int(dataset_info.num_classes):
        names = None
    return {"class_names": names, "preprocessing": run_preprocessing(config, dataset_info)}


_SIZE_IN_NAME = re.compile(r"(?<!\d)(\d{2,4})x\1(?!\d)")
_SIZE_IN_HUB_ID = re.compile(r"-(\d{3})(?:-|$)")


def image_size_from_name(name: str) -> int | None:
    """The resolution in an official file name (``CvT-13-384x384-IN-22k.pth``) or hub id (``cvt-13-384-22k``)."""
    stem = pathlib.PurePath(name).name
    if m := _SIZE_IN_NAME.search(stem):
        return int(m.group(1))
    if m := _SIZE_IN_HUB_ID.search(stem):
        return int(m.group(1))
    return None


def converted_metadata(
    info: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    hf_config: Mapping[str, Any] | None = None,
    image_size: int | None = None,
) -> dict[str, Any]:
    """``class_names``, ``image_size`` and ``preprocessing`` of a converted PyTorch checkpoint.

    Args:
      info: The converter's model info (``num_classes``, ``source_format``, ``variant``, ``spec``, ``labels``).
      path: The converted file or directory (its name may tell the resolution; a HuggingFace directory may hold
        ``preprocessor_config.json``).
      hf_config: The HuggingFace ``config.json`` dict, if any (its ``id2label`` is already in ``info['labels']``).
      image_size: Force the resolution (else: ``preprocessor_config.json``, the file name, the registered
        variant's size, 224).

    Returns:
      The keys to add to the model info.
    """
    import json

    path = paths.as_path(path)
    channels = int((info.get("spec") or {}).get("in_chans", 3))
    n = int(info.get("num_classes", 0))
    names: list[str] | None = None
    if info.get("labels") and len(info["labels"]) == n:
        names = list(info["labels"])
    elif n == 1000 and info.get("source_format") == "official":
        names = list(imagenet_class_names())

    preprocessor = (path if path.is_dir() else path.parent) / "preprocessor_config.json"
    preprocessor_config = json.loads(preprocessor.read_text()) if preprocessor.is_file() else None
    if image_size is None and preprocessor_config is None:
        image_size = image_size_from_name(str(path))
        if image_size is None and info.get("variant"):
            from cvt_flax.models import get_variant

            variant_size = get_variant(info["variant"]).image_size
            image_size = variant_size if variant_size >= 224 else None
        image_size = image_size or 224
    if preprocessor_config is not None and (image_size is None or image_size == _hf_size(preprocessor_config)):
        preprocessing = hf_preprocessing(preprocessor_config, channels)
    else:
        preprocessing = official_preprocessing(int(image_size), channels)
    return {"class_names": names, "image_size": preprocessing["image_size"], "preprocessing": preprocessing}


def _hf_size(preprocessor_config: Mapping[str, Any]) -> int:
    size = preprocessor_config.get("size", 224)
    if isinstance(size, Mapping):
        size = size.get("shortest_edge") or size.get("height") or 224
    return int(size)


def describe(info: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The class names and preprocessing of a model, with fallbacks for model directories written before both.

    Args:
      info: A ``model.json`` dict (or a training checkpoint's metadata).

    Returns:
      ``(class_names, preprocessing)``: one name per class (``'class_<i>'`` when unknown) and a complete
      preprocessing dict (a model without one gets its ``image_size`` (else 224), no crop, ImageNet statistics,
      and the channels of its first convolution).
    """
    n = int(info.get("num_classes", 0))
    names = info.get("class_names") or info.get("labels")
    if not names or len(names) != n:
        names = [f"class_{i}" for i in range(n)]
    preprocessing = info.get("preprocessing")
    if not preprocessing:
        channels = int((info.get("spec") or {}).get("in_chans", 3))
        size = int(info.get("image_size") or 224)
        preprocessing = make_preprocessing(size, channels=channels, source="default (model.json has none)")
    return [str(x) for x in names], dict(preprocessing)
