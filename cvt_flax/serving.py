"""Run an exported cvt-flax model with jax and numpy only (PIL for image files): no flax, no training code.

`cvt_flax.export` writes a directory::

    DIR/model.jaxexport   # jax.export serialization of  (weights, images [B, H, W, C] float32) -> (logits, probs)
    DIR/weights.npz       # the weights, in the order the function takes them (w00000, w00001, ...)
    DIR/metadata.json     # class names, preprocessing, input shape, platforms, source
    DIR/cvt_serving.py    # a copy of this file, so that DIR alone is enough to serve

and this module runs it::

    from cvt_flax.serving import load_exported      # or: sys.path.insert(0, DIR); from cvt_serving import ...
    model = load_exported(DIR)
    logits, probs = model(batch)                    # batch: preprocessed float32 [B, H, W, C], any B
    model.predict(["cat.jpg", "dog.png"], top_k=5)  # files -> top-k names and probabilities

Paths may be local or URLs such as ``gs://bucket/...`` (read with ``etils.epath``, which needs ``gcsfs`` or
TensorFlow for Cloud Storage; only URLs need it).

This file imports nothing from cvt_flax (it is copied next to exported models); keep it that way.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

EXPORT_FILE = "model.jaxexport"
WEIGHTS_FILE = "weights.npz"
METADATA_FILE = "metadata.json"
SERVING_FILE = "cvt_serving.py"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values


# ----------------------------------------------------------------------------- paths


def _is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def _path(path: str | os.PathLike) -> Any:
    """A local ``pathlib.Path`` (``~`` expanded), or an ``etils.epath.Path`` for a URL (``gs://...``)."""
    if not _is_url(path):
        return pathlib.Path(path).expanduser()
    try:
        from etils import epath
    except ImportError as e:
        raise ImportError(
            f"{os.fspath(path)}: reading URLs needs etils (`pip install etils[epath] gcsfs` for gs://)."
        ) from e
    return epath.Path(os.fspath(path))


def _walk_files(folder: Any) -> Iterable[Any]:
    """Every file under a folder of a URL (``rglob`` is not recursive on every Cloud Storage client)."""
    for child in folder.iterdir():
        if child.is_dir():
            yield from _walk_files(child)
        else:
            yield child


# ----------------------------------------------------------------------------- images


def list_images(inputs: Iterable[str | os.PathLike]) -> list[Any]:
    """Expands files and folders (searched recursively, sorted) into image files (local paths or URLs).

    Raises:
      FileNotFoundError: for a path that does not exist, or folders without images.
    """
    files: list[Any] = []
    for item in inputs:
        p = _path(item)
        if p.is_dir():
            candidates = _walk_files(p) if _is_url(p) else (f for f in p.rglob("*") if f.is_file())
            found = sorted(f for f in candidates if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under the folder {p}.")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"No such image file or folder: {p}.")
    return files


def _scaled_to_8bit(values: np.ndarray, full_scale: float | None) -> np.ndarray:
    """uint8 of ``values / full_scale`` (None: the image's own min..max), rounded."""
    x = values.astype(np.float64)
    if full_scale is None:
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
        x, full_scale = x - lo, (hi - lo) or 1.0
    return np.clip(np.rint(x / full_scale * 255.0), 0, 255).astype(np.uint8)


def to_8bit(im: Any) -> Any:
    """A decoded PIL image of any mode -> 8-bit 'L', 'LA', 'RGB' or 'RGBA', without clipping high bit depths.

    * 16-bit integers (``I;16*``, e.g. 16-bit grayscale PNG/TIFF): ``round(v * 255 / 65535)``; PIL's own
      conversion would clip them at 255 (a 16-bit photo turns almost white).
    * 32-bit integers (``I``): values in [0, 65535] are 16-bit data (as PIL reads some 16-bit files), else the
      image's own range maps to [0, 255].
    * Floats (``F``): values in [0, 1] scale by 255, any other range maps its min..max to [0, 255].
    * Palette (``P``, ``PA``; e.g. GIF) -> RGBA when transparent, else RGB; CMYK, YCbCr, LAB, HSV -> RGB;
      bilevel (``1``) -> L. Alpha is kept here; `decode` drops it as PIL's ``convert`` does (and the HuggingFace
      processors).
    """
    from PIL import Image

    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return im
    if mode.startswith("I;16"):
        return Image.fromarray(_scaled_to_8bit(np.asarray(im), 65535.0))
    if mode == "I":
        a = np.asarray(im)
        in_16 = a.size == 0 or (a.min() >= 0 and a.max() <= 65535)
        return Image.fromarray(_scaled_to_8bit(a, 65535.0 if in_16 else None))
    if mode == "F":
        a = np.asarray(im)
        finite = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        in_01 = finite.size == 0 or (finite.min() >= 0.0 and finite.max() <= 1.0)
        return Image.fromarray(_scaled_to_8bit(finite, 1.0 if in_01 else None))
    if mode in ("P", "PA"):
        return im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    if mode == "1":
        return im.convert("L")
    if mode in ("La", "RGBa"):  # premultiplied alpha
        return im.convert("LA" if mode == "La" else "RGBA")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def decode(im: Any, channels: int) -> Any:
    """An opened PIL image -> the model's channels (1: 'L', ITU-R 601-2 luminance; 3: 'RGB'), as a user expects.

    The first frame of an animation; the EXIF orientation applied (a phone photo taken upright is upright); high
    bit depths scaled by their range (`to_8bit`); alpha dropped. The one decoding of image files: predict,
    export's serving function and the image-folder training pipelines (tf.data and the TF-free one) all call it,
    so that training and serving see the same pixels.
    """
    from PIL import ImageOps

    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im.load()
    im = ImageOps.exif_transpose(im) or im
    im = to_8bit(im)
    want = "L" if int(channels) == 1 else "RGB"
    return im if im.mode == want else im.convert(want)


def decode_bytes(data: bytes, channels: int) -> np.ndarray:
    """Encoded image bytes -> uint8 ``[H, W, channels]`` (`decode`)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(decode(im, channels), np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_image(image: Any, channels: int = 3) -> Any:
    """A PIL image in the model's channels (`decode`) from a path, a PIL image or a uint8 array.

    Arrays are ``[H, W]`` or ``[H, W, C]`` with C 1, 3 or 4, uint8 (0-255).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return decode(image, channels)
    if isinstance(image, str | os.PathLike):
        try:
            source = io.BytesIO(_path(image).read_bytes()) if _is_url(image) else image  # PIL opens local files only
            with Image.open(source) as im:
                return decode(im, channels)
        except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"Cannot read {image} as an image ({type(e).__name__}: {e}).") from e
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(
            f"Image arrays must be uint8 [H, W] or [H, W, C] (0-255), got {array.dtype} {array.shape}; "
            "pass preprocessed float batches to the model itself."
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return decode(Image.fromarray(array), channels)


def resize_image(im: Any, size: int, shorter_side: int | None, resample: Any) -> Any:
    """A PIL image -> ``size x size``: a plain resize (``shorter_side`` None), or the evaluation centre crop.

    The centre crop resizes the shorter side to ``shorter_side`` (``floor(size / crop_pct)``) and the longer one
    to ``int(shorter_side * long / short)`` (truncated, as torchvision's ``Resize(int)`` and HuggingFace's
    ``get_resize_output_image_size`` compute it; at least ``size``), then takes the centre ``size x size``
    (top-left at ``((w - size) // 2, (h - size) // 2)``). The one PIL form of the rule, used for serving and by
    the TensorFlow-free input pipeline (`cvt_flax.data.device`).
    """
    if shorter_side is None:
        return im if im.size == (size, size) else im.resize((size, size), resample)
    w, h = im.size
    if w <= h:
        w, h = shorter_side, int(shorter_side * h / w)
    else:
        w, h = int(shorter_side * w / h), shorter_side
    w, h = max(size, w), max(size, h)
    if (w, h) != im.size:
        im = im.resize((w, h), resample)
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def preprocess(image: Any, preprocessing: Mapping[str, Any]) -> np.ndarray:
    """One image -> the model's input ``[H, W, C]`` float32, as ``preprocessing`` says (PIL + numpy).

    Args:
      image: A path, a PIL image or a uint8 array.
      preprocessing: The ``preprocessing`` dict of ``model.json`` / ``metadata.json`` (``image_size``, ``crop``,
        ``resize``, ``interpolation``, ``mean``, ``std``, ``channels``).

    Returns:
      The normalised image.
    """
    channels = int(preprocessing["channels"])
    im = load_image(image, channels)
    size = int(preprocessing["image_size"])
    resample = _RESAMPLE[str(preprocessing.get("interpolation", "bilinear"))]
    center = preprocessing.get("crop", "none") == "center"
    im = resize_image(im, size, int(preprocessing["resize"]) if center else None, resample)
    x = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    if x.ndim == 2:
        x = x[..., None]
    mean = np.asarray(preprocessing["mean"], np.float32)
    std = np.asarray(preprocessing["std"], np.float32)
    return (x - mean) / std


def top_k(probabilities: np.ndarray, k: int, class_names: Sequence[str]) -> list[list[dict[str, Any]]]:
    """Per row the ``k`` most probable classes: ``[{'index', 'label', 'probability'}, ...]``, best first."""
    k = max(1, min(int(k), probabilities.shape[-1]))
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return [
        [{"index": int(i), "label": class_names[int(i)], "probability": float(row[i])} for i in idx]
        for row, idx in zip(probabilities, order, strict=True)
    ]


def predict_images(
    probabilities_fn: Callable[[np.ndarray], np.ndarray],
    images: Sequence[Any],
    preprocessing: Mapping[str, Any],
    class_names: Sequence[str],
    *,
    top_k_classes: int = 5,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Preprocesses ``images`` in batches, runs ``probabilities_fn`` and returns the top classes per image.

    Every batch has the same size (the last one is padded), so a jitted function compiles once.

    Args:
      probabilities_fn: ``[B, H, W, C] float32 -> [B, num_classes]`` probabilities.
      images: Paths, PIL images or uint8 arrays.
      preprocessing: The model's preprocessing dict.
      class_names: One name per class.
      top_k_classes: How many classes to return per image.
      batch_size: Images per call.

    Returns:
      One ``{'image': path or index, 'predictions': [{'index', 'label', 'probability'}, ...]}`` per image.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    images = list(images)
    bs = min(batch_size, max(1, len(images)))
    results: list[dict[str, Any]] = []
    for start in range(0, len(images), bs):
        chunk = images[start : start + bs]
        batch = np.stack([preprocess(im, preprocessing) for im in chunk])
        if len(chunk) < bs:
            batch = np.concatenate([batch, np.zeros((bs - len(chunk), *batch.shape[1:]), batch.dtype)])
        probs = np.asarray(probabilities_fn(batch), dtype=np.float32)[: len(chunk)]
        for j, preds in enumerate(top_k(probs, top_k_classes, class_names)):
            image = chunk[j]
            name = str(image) if isinstance(image, str | os.PathLike) else start + j
            results.append({"image": name, "predictions": preds})
    return results


# ----------------------------------------------------------------------------- exported models


def _platform() -> str:
    import jax

    backend = jax.default_backend()
    if backend == "gpu":  # jax.export names GPU platforms 'cuda' and 'rocm'
        version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return backend


class ExportedModel:
    """An exported cvt-flax model: call it on preprocessed batches, or `predict` on images.

    Attributes:
      metadata: The ``metadata.json`` dict.
      class_names: One name per class.
      preprocessing: How images become inputs (see `preprocess`).
      input_shape: ``(H, W, C)``.
    """

    def __init__(self, exported: Any, weights: list[Any], metadata: Mapping[str, Any]):
        import jax

        self._exported = exported
        self._weights = weights
        self.metadata = dict(metadata)
        self.class_names = list(metadata["class_names"])
        self.preprocessing = dict(metadata["preprocessing"])
        self.input_shape = tuple(metadata["input_shape"])
        self._fn = jax.jit(exported.call)

    def __call__(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """Runs the model on a preprocessed float32 batch ``[B, H, W, C]``; returns ``(logits, probabilities)``."""
        x = np.asarray(images, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"Expected a preprocessed float32 batch [B, {', '.join(map(str, self.input_shape))}], got shape "
                f"{x.shape}. Use predict() for image files, or preprocess() for single images."
            )
        logits, probs = self._fn(self._weights, x)
        return np.asarray(logits), np.asarray(probs)

    def predict(self, images: Sequence[Any], top_k: int = 5, batch_size: int = 64) -> list[dict[str, Any]]:
        """Top-k classes of image files (or PIL images / uint8 arrays); see `predict_images`."""
        return predict_images(
            lambda x: self(x)[1], images, self.preprocessing, self.class_names, top_k_classes=top_k,
            batch_size=batch_size,
        )  # fmt: skip


def load_exported(directory: str | os.PathLike) -> ExportedModel:
    """Loads a directory written by `cvt_flax.export` (jax + numpy only).

    Raises:
      FileNotFoundError: when the directory lacks the exported files.
      RuntimeError: when the model was exported for other platforms than this machine's.
    """
    import jax
    from jax import export as jax_export

    directory = _path(directory)
    missing = [f for f in (EXPORT_FILE, WEIGHTS_FILE, METADATA_FILE) if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory} is not an exported cvt-flax model (missing {', '.join(missing)}). Export one with "
            "`python -m cvt_flax.export --model NAME_OR_DIR --output DIR`."
        )
    metadata = json.loads((directory / METADATA_FILE).read_text())
    exported = jax_export.deserialize(bytearray((directory / EXPORT_FILE).read_bytes()))
    platform = _platform()
    if platform not in exported.platforms:
        raise RuntimeError(
            f"{directory} was exported for {', '.join(exported.platforms)}, but this machine runs JAX on {platform}. "
            "Export it again for this platform too: `python -m cvt_flax.export ... --platforms "
            f"{','.join(exported.platforms)},{platform}`."
        )
    weights_file = directory / WEIGHTS_FILE
    with np.load(io.BytesIO(weights_file.read_bytes()) if _is_url(weights_file) else weights_file) as z:
        weights = [z[f"w{i:05d}"] for i in range(len(z.files))]
    return ExportedModel(exported, jax.device_put(weights), metadata)
