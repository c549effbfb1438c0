"""The augmentation policy of both input pipelines, free of any backend (no JAX, no TensorFlow here).

The tf.data pipeline (:mod:`cvt_flax.data.tfdata`, kernels in :mod:`cvt_flax.data.augment_tf`) and the device
pipeline (:mod:`cvt_flax.data.device`, kernels in :mod:`cvt_flax.data.augment_jax`) augment with the same
policy, defined once here:

* `TrainAugSettings`: the train augmentation settings, read and validated once from the config;
* `EvalSettings`: the eval preprocessing settings (resize or centre crop);
* the constants both backends share: the RandAugment op list and magnitudes, crop and erasing ranges, fill
  value, luma weights...;
* `TRAIN_STEPS`: the order of the train steps (crop -> flip -> RandAugment -> colour jitter -> normalise ->
  random erasing), which random stream each step draws from and when it is on; `apply_train_policy` runs
  them with the per-image kernels of one backend (an object satisfying `Kernels`).

A new augmentation is a field of `TrainAugSettings` (and its default in ``configs/default.py``), a `TrainStep`
in `TRAIN_STEPS`, a method of `Kernels`, and one kernel per backend (listed in that backend's ``KERNELS``).
The two backends share the policy, not their random streams: the same seed gives the same batches from one
pipeline run after run, but not the same batches from the other pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

# ----------------------------------------------------------------------------- shared constants

# ITU-R 601-2 luma (PIL's "L" conversion, tf.image.rgb_to_grayscale).
LUMA = (0.2989, 0.5870, 0.1140)
# Grey fill of the geometric ops (timm's img_mean fill (124, 116, 104) rounded to one value for any channel count).
FILL_VALUE = 128.0

# Train crops ('pad_crop': CIFAR style; 'random_resized_crop': Inception style; 'resize': no crop) and the
# aspect-ratio range, largest area fraction and number of tries of the random resized crop (torchvision's).
CROP_MODES = ("pad_crop", "random_resized_crop", "resize")
CROP_MAX_SCALE = 1.0
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
# Eval preprocessing: resize to image_size, or ImageNet's resize to image_size / ratio then centre crop.
EVAL_CROP_MODES = ("resize", "center_crop")

# RandAugment, timm's ``rand-m{M}-mstd0.5-inc1`` (the CvT recipe): per layer one op drawn uniformly, applied with
# probability RANDAUGMENT_PROB, magnitude M (0 - MAX_MAGNITUDE) plus Gaussian noise of std
# RANDAUGMENT_MAGNITUDE_STD (clipped to the range); signed ops get a random sign; Posterize and Solarize grow
# stronger with the magnitude ("increasing").
RANDAUGMENT_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)
# The ops that are an affine warp (one 3x3 matrix each).
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
RANDAUGMENT_PROB = 0.5
RANDAUGMENT_MAGNITUDE_STD = 0.5
MAX_MAGNITUDE = 10.0
# Op strengths at the largest magnitude.
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.45  # fraction of the image side
MAX_ENHANCE = 0.9  # Color, Contrast, Brightness, Sharpness factors in 1 -+ this
MAX_SOLARIZE_ADD = 110.0
MAX_POSTERIZE_SHIFT = 4.0  # bits dropped by Posterize
SOLARIZE_MAX_THRESHOLD = 256.0  # Solarize inverts pixels >= 256 * (1 - magnitude / 10)
SOLARIZE_ADD_THRESHOLD = 128.0  # SolarizeAdd brightens pixels < this
# PIL ImageEnhance.Sharpness's smoothing kernel (divided by its sum, 13).
SHARPNESS_KERNEL = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))
SHARPNESS_KERNEL_SUM = 13.0

# Random erasing (timm's RandomErasing, pixel mode, one box): area fraction, log-uniform aspect ratio, tries.
ERASING_SCALE = (0.02, 1 / 3)
ERASING_RATIO = (0.3, 3.3)
ERASING_ATTEMPTS = 10


def jitter_range(strength: float) -> tuple[float, float]:
    """Range ``[max(0, 1 - s), 1 + s]`` of the colour-jitter factors (brightness, contrast, saturation)."""
    return max(0.0, 1.0 - strength), 1.0 + strength


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class TrainAugSettings:
    """Train augmentation settings, read once from the config (``image_size``, ``config.aug``) and validated.

    Frozen and hashable: the device pipeline passes it to ``jax.jit`` as a static argument.

    Attributes:
      image_size: Side of the square output.
      crop: One of `CROP_MODES`.
      crop_padding: Padding (pixels) of 'pad_crop'.
      crop_min_scale: Smallest area fraction of 'random_resized_crop'.
      hflip: Random horizontal flip (probability 0.5).
      randaugment_layers: RandAugment ops per image (0: off).
      randaugment_magnitude: RandAugment magnitude (0 - 10).
      color_jitter: Colour-jitter strength (0: off).
      random_erasing: Random-erasing probability (0: off).
      mean: Per-channel normalisation mean ([0, 1] scale).
      std: Per-channel normalisation std ([0, 1] scale).
    """

    image_size: int
    crop: str
    crop_padding: int
    crop_min_scale: float
    hflip: bool
    randaugment_layers: int
    randaugment_magnitude: float
    color_jitter: float
    random_erasing: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(
                f"Unknown config.aug.crop={self.crop!r}; use 'pad_crop', 'random_resized_crop' or 'resize'."
            )
        checks = (
            (self.image_size > 0, "image_size", self.image_size, "a positive side length"),
            (self.crop_padding >= 0, "aug.crop_padding", self.crop_padding, "0 or more pixels"),
            (0.0 < self.crop_min_scale <= 1.0, "aug.crop_min_scale", self.crop_min_scale, "a fraction in (0, 1]"),
            (self.randaugment_layers >= 0, "aug.randaugment_layers", self.randaugment_layers, "0 (off) or more"),
            (
                0.0 <= self.randaugment_magnitude <= MAX_MAGNITUDE,
                "aug.randaugment_magnitude",
                self.randaugment_magnitude,
                f"a value in [0, {MAX_MAGNITUDE:g}]",
            ),
            (self.color_jitter >= 0.0, "aug.color_jitter", self.color_jitter, "0 (off) or a positive strength"),
            (0.0 <= self.random_erasing <= 1.0, "aug.random_erasing", self.random_erasing, "a probability in [0, 1]"),
        )
        for ok, name, value, want in checks:
            if not ok:
                raise ValueError(f"config.{name}={value!r} is not valid; set --config.{name} to {want}.")
        if len(self.mean) != len(self.std) or not self.mean or min(self.std) <= 0:
            raise ValueError(
                f"Normalisation mean {self.mean} and std {self.std} must have one value per channel and std > 0; "
                "check --config.input.normalization."
            )

    @classmethod
    def from_config(cls, config: Any, *, mean: Sequence[float], std: Sequence[float]) -> TrainAugSettings:
        """Reads the settings from ``config.image_size`` and ``config.aug`` (defaults: ``configs/default.py``).

        Args:
          config: Run config.
          mean: Per-channel normalisation mean (from `cvt_flax.data.info.normalization_stats`).
          std: Per-channel normalisation std.

        Returns:
          The validated settings.

        Raises:
          ValueError: A setting is out of range or unknown; the message names the field and its valid values.
        """
        a = config.aug
        return cls(
            image_size=int(config.image_size),
            crop=str(a.crop),
            crop_padding=int(a.crop_padding),
            crop_min_scale=float(a.crop_min_scale),
            hflip=bool(a.hflip),
            randaugment_layers=int(a.randaugment_layers),
            randaugment_magnitude=float(a.randaugment_magnitude),
            color_jitter=float(a.color_jitter),
            random_erasing=float(a.random_erasing),
            mean=tuple(float(m) for m in mean),
            std=tuple(float(s) for s in std),
        )


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Eval preprocessing settings, read once from the config and validated.

    Attributes:
      image_size: Side of the square output.
      crop: One of `EVAL_CROP_MODES`: 'resize', or 'center_crop' (shorter side to
        ``floor(image_size / crop_ratio)``, then the centre ``image_size`` square).
      crop_ratio: Crop ratio of 'center_crop'.
    """

    image_size: int
    crop: str
    crop_ratio: float

    def __post_init__(self) -> None:
        if self.crop not in EVAL_CROP_MODES:
            raise ValueError(f"Unknown config.aug.eval_crop={self.crop!r}; use 'resize' or 'center_crop'.")
        if not 0.0 < self.crop_ratio <= 1.0:
            raise ValueError(
                f"config.aug.eval_crop_ratio={self.crop_ratio!r} is not valid; set --config.aug.eval_crop_ratio to a "
                "fraction in (0, 1] (ImageNet: 0.875)."
            )

    @classmethod
    def from_config(cls, config: Any) -> EvalSettings:
        """Reads ``config.image_size``, ``config.aug.eval_crop`` and ``config.aug.eval_crop_ratio``."""
        return cls(
            image_size=int(config.image_size),
            crop=str(config.aug.eval_crop),
            crop_ratio=float(config.aug.eval_crop_ratio),
        )


# ----------------------------------------------------------------------------- the train steps


class Kernels(Protocol):
    """Per-image kernels a backend provides to `apply_train_policy` (random stream first, then the image).

    ``rng`` is the backend's random stream: a JAX key (:mod:`cvt_flax.data.augment_jax`) or a TensorFlow stateless
    seed of shape [2] (:mod:`cvt_flax.data.augment_tf`). Images are [H, W, C] with values in [0, 255] until
    `normalize`, normalised floats after it.
    """

    def split(self, rng: Any, num: int) -> Any:
        """``num`` independent streams of ``rng`` (indexable)."""

    def pad_crop(self, rng: Any, image: Any, size: int, padding: int) -> Any:
        """Resize to ``size`` if needed, zero-pad by ``padding``, random ``size x size`` crop."""

    def random_resized_crop(
        self, rng: Any, image: Any, size: int, scale: tuple[float, float], ratio: tuple[float, float], attempts: int
    ) -> Any:
        """Random box of area fraction in ``scale`` and aspect in ``ratio`` (first fit of ``attempts``), resized."""

    def resize(self, image: Any, size: int) -> Any:
        """Resize to ``size x size``."""

    def random_flip(self, rng: Any, image: Any) -> Any:
        """Horizontal flip with probability 0.5."""

    def randaugment(
        self, rng: Any, image: Any, num_layers: int, magnitude: float, prob: float, magnitude_std: float
    ) -> Any:
        """RandAugment over `RANDAUGMENT_OPS`."""

    def color_jitter(self, rng: Any, image: Any, strength: float) -> Any:
        """Brightness, contrast, saturation factors uniform in `jitter_range` (saturation: 3 channels only)."""

    def normalize(self, image: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
        """[0, 255] -> float32 ``(x / 255 - mean) / std``."""

    def random_erasing(
        self,
        rng: Any,
        image: Any,
        prob: float,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        attempts: int,
    ) -> Any:
        """With probability ``prob``, one box of the normalised image filled with N(0, 1) noise."""


def _crop(s: TrainAugSettings, ops: Kernels, image: Any, rng: Any) -> Any:
    if s.crop == "pad_crop":
        return ops.pad_crop(rng, image, s.image_size, s.crop_padding)
    if s.crop == "random_resized_crop":
        scale = (s.crop_min_scale, CROP_MAX_SCALE)
        return ops.random_resized_crop(rng, image, s.image_size, scale, CROP_RATIO, CROP_ATTEMPTS)
    return ops.resize(image, s.image_size)


def _randaugment(s: TrainAugSettings, ops: Kernels, image: Any, rng: Any) -> Any:
    return ops.randaugment(
        rng, image, s.randaugment_layers, s.randaugment_magnitude, RANDAUGMENT_PROB, RANDAUGMENT_MAGNITUDE_STD
    )


def _random_erasing(s: TrainAugSettings, ops: Kernels, image: Any, rng: Any) -> Any:
    return ops.random_erasing(rng, image, s.random_erasing, ERASING_SCALE, ERASING_RATIO, ERASING_ATTEMPTS)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """One step of the train augmentation.

    Attributes:
      name: Step name.
      stream: Index of the random stream the step draws from (into ``ops.split(rng, NUM_STREAMS)``); None for a
        deterministic step. Fixed per step, so that turning one step off leaves the others' draws unchanged.
      enabled: Whether the settings turn the step on.
      apply: ``(settings, ops, image, rng) -> image``.
    """

    name: str
    stream: int | None
    enabled: Callable[[TrainAugSettings], bool]
    apply: Callable[[TrainAugSettings, Kernels, Any, Any], Any]


# The train steps, in order. Stream 5 is free for a new step; more streams would change every step's draws (the
# batches of a seed).
NUM_STREAMS = 6
TRAIN_STEPS: tuple[TrainStep, ...] = (
    TrainStep("crop", 0, lambda s: True, _crop),
    TrainStep("flip", 1, lambda s: s.hflip, lambda s, ops, x, rng: ops.random_flip(rng, x)),
    TrainStep("randaugment", 2, lambda s: s.randaugment_layers > 0, _randaugment),
    TrainStep(
        "color_jitter", 3, lambda s: s.color_jitter > 0, lambda s, ops, x, rng: ops.color_jitter(rng, x, s.color_jitter)
    ),
    TrainStep("normalize", None, lambda s: True, lambda s, ops, x, rng: ops.normalize(x, s.mean, s.std)),
    TrainStep("random_erasing", 4, lambda s: s.random_erasing > 0, _random_erasing),
)


def apply_train_policy(settings: TrainAugSettings, ops: Kernels, image: Any, rng: Any) -> Any:
    """Augments one training image: the enabled `TRAIN_STEPS`, in order, with the kernels ``ops``.

    Args:
      settings: Train augmentation settings.
      ops: The backend's kernels (``augment_jax.KERNELS`` or ``augment_tf.KERNELS``).
      image: One [H, W, C] image, values in [0, 255] (uint8 for TensorFlow, float32 for JAX), C as the model's.
      rng: The image's random stream (JAX key or TensorFlow seed [2]).

    Returns:
      The normalised float32 [image_size, image_size, C] image.
    """
    streams = ops.split(rng, NUM_STREAMS)
    for step in TRAIN_STEPS:
        if step.enabled(settings):
            image = step.apply(settings, ops, image, None if step.stream is None else streams[step.stream])
    return image
