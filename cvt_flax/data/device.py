"""Device-resident input pipeline (``config.input.pipeline == 'device'``); no TensorFlow anywhere on this path.

The split is read once through ``tfds.data_source`` (ArrayRecord; decoded with PIL) or, for 'image_folder', from
the image files with PIL, and kept as uint8 arrays replicated on every device of the mesh (small datasets:
CIFAR-100's train set is 150 MB). Each train batch is then produced on the devices by one jitted function of
the step: a per-epoch permutation (``fold_in(seed, epoch)``) picks the examples and per-example keys
``fold_in(fold_in(seed, epoch), index)`` drive the augmentation (the train policy of
:mod:`cvt_flax.data.policy` with the JAX kernels of :mod:`cvt_flax.data.augment_jax`), so batch k is a pure
function of (config, seed, k).

Images of a fixed stored size are kept as they are (resized on the device when ``image_size`` differs);
images of varying sizes are resized to ``image_size`` on loading (eval ones with the eval crop).
Every process holds the whole split (the arrays are global replicated arrays).
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cvt_flax import paths, serving
from cvt_flax import sharding as sharding_lib
from cvt_flax.data import augment_jax as aug
from cvt_flax.data import info as info_lib
from cvt_flax.data import policy

_CHUNK = 1024


def _threads() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def _pil_geometry(img: Any, size: int, mode: str, ratio: float) -> Any:
    """PIL image -> ``size x size``: plain resize, or (eval) shorter side to floor(size / ratio) + centre crop."""
    from PIL import Image

    shorter_side = math.floor(size / ratio) if mode == "center_crop" else None
    return serving.resize_image(img, size, shorter_side, Image.BILINEAR)


def _decode(data: bytes | np.ndarray, channels: int, geometry: tuple[int, str, float] | None) -> np.ndarray:
    """Encoded bytes (or a decoded array) -> uint8 [H, W, channels], with optional PIL geometry."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)) if isinstance(data, bytes) else Image.fromarray(np.squeeze(data))
    img = serving.decode(img, channels)  # the decoding of predict and export: EXIF, bit depth, palette, ...
    if geometry is not None:
        img = _pil_geometry(img, *geometry)
    arr = np.asarray(img, np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def load_arrays(
    source: info_lib.Source, ranges: list[info_lib.Range], geometry: tuple[int, str, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Reads and decodes the examples of ``ranges`` into (uint8 [N, H, W, C_stored], int32 [N]) numpy arrays.

    Args:
      source: Opened dataset.
      ranges: Absolute example ranges.
      geometry: None to keep the stored size (all images must share it), else (size, 'resize'|'center_crop',
        ratio) applied with PIL to every image.

    Returns:
      (images, labels).
    """
    channels = source.image_shape[2]
    jobs = []
    if source.is_image_folder:
        items = [it for name, a, b in ranges for it in source.files[name][a:b]]
        for s in range(0, len(items), _CHUNK):
            chunk = items[s : s + _CHUNK]

            def job(chunk=chunk):
                imgs = []
                for path, _ in chunk:  # local or gs:// files
                    imgs.append(_decode(paths.read_bytes(path), channels, geometry))
                return imgs, [lab for _, lab in chunk]

            jobs.append(job)
    else:
        import tensorflow_datasets as tfds  # TF-free

        for name, a, b in ranges:
            ds = source.builder.as_data_source(split=f"{name}[{a}:{b}]", decoders={"image": tfds.decode.SkipDecoding()})
            for s in range(0, len(ds), _CHUNK):
                indices = list(range(s, min(s + _CHUNK, len(ds))))

                def job(ds=ds, indices=indices):
                    exs = ds.__getitems__(indices)
                    return [_decode(e["image"], channels, geometry) for e in exs], [int(e["label"]) for e in exs]

                jobs.append(job)
    images, labels = [], []
    with concurrent.futures.ThreadPoolExecutor(_threads()) as pool:
        for imgs, labs in pool.map(lambda j: j(), jobs):
            images.extend(imgs)
            labels.extend(labs)
    if not images:
        raise info_lib.DatasetError(f"No examples in {ranges} of dataset {source.name!r}; check the split.")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise info_lib.DatasetError(
            f"Images of {source.name!r} have different sizes {sorted(shapes)[:4]}...; the device pipeline needs one "
            "size (this is a bug: varying sizes should be resized on loading)."
        )
    return np.stack(images), np.asarray(labels, np.int32)


def _setup(config: Any, mesh: Mesh, batch_size: int, what: str):
    source = info_lib.open_source(config, for_device=True)
    channels = info_lib.model_channels(config, source.image_shape[2])
    mean, std = info_lib.normalization_stats(config, source.name, channels)
    local_batch = sharding_lib.check_batch_size(batch_size, what, mesh.devices.size, jax.process_count())
    fixed = source.image_shape[0] is not None and source.image_shape[1] is not None
    return source, channels, mean, std, local_batch, fixed


def _augment(settings: policy.TrainAugSettings, channels: int, key: jax.Array, x: jax.Array) -> jax.Array:
    """One train example: (key, uint8-valued float [H, W, C_stored]) -> normalised f32 [S, S, channels]."""
    x = aug.convert_channels(x, channels)
    return policy.apply_train_policy(settings, aug.KERNELS, x, key)


def train_batch(
    images: jax.Array,
    labels: jax.Array,
    seed: jax.Array,
    epoch0: jax.Array,
    offset: jax.Array,
    *,
    settings: policy.TrainAugSettings,
    channels: int,
    batch: int,
    shuffle: bool,
    sharding: jax.sharding.NamedSharding,
) -> dict[str, jax.Array]:
    """Train batch of stream positions ``offset .. offset + batch - 1`` counted from the start of epoch ``epoch0``.

    ``epoch0, offset = divmod(step * batch, num_examples)``; the batch may run into later epochs.

    Args:
      images: The whole split, uint8 [N, H, W, C_stored] (replicated).
      labels: int32 [N].
      seed: uint32 seed of order and augmentation.
      epoch0: Epoch of the first position.
      offset: First position within ``epoch0``.
      settings: Train augmentation settings.
      channels: Channels the model receives.
      batch: Global batch size.
      shuffle: A fresh permutation per epoch (else the stored order).
      sharding: Sharding of the batch ('data' axis).

    Returns:
      {'image': f32 [batch, S, S, channels], 'label': int32 [batch]}, sharded by ``sharding``.
    """
    n = images.shape[0]
    num_perms = batch // n + 2
    base = jax.random.key(seed)
    order_key = jax.random.fold_in(base, 1)
    aug_key = jax.random.fold_in(base, 2)
    pos = offset + jnp.arange(batch, dtype=jnp.int32)
    rel, index = pos // n, pos % n
    if shuffle:
        epochs = epoch0 + jnp.arange(num_perms, dtype=jnp.int32)
        perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(order_key, e), n))(epochs)
        idx = perms[rel, index]
    else:
        idx = index
    idx = jax.lax.with_sharding_constraint(idx, sharding)
    x = images[idx].astype(jnp.float32)
    y = labels[idx]
    keys = jax.vmap(lambda e, i: jax.random.fold_in(jax.random.fold_in(aug_key, e), i))(epoch0 + rel, index)
    x = jax.vmap(functools.partial(_augment, settings, channels))(keys, x)
    return {
        "image": jax.lax.with_sharding_constraint(x, sharding),
        "label": jax.lax.with_sharding_constraint(y, sharding),
    }


# Compiled once per (shapes, static arguments): jax.jit's own cache reuses the program when a train iterator is
# created again with the same settings (a resumed run in the same process, tests); no cache of ours.
_train_batch = jax.jit(train_batch, static_argnames=("settings", "channels", "batch", "shuffle", "sharding"))


def create_train_iterator(
    config: Any, mesh: Mesh, seed: int | None = None, start_step: int = 0
) -> Iterator[dict[str, jax.Array]]:
    """Infinite iterator of global train batches made on the devices (see the module docstring).

    Args:
      config: Run config.
      mesh: Device mesh (axis 'data').
      seed: Seed of order and augmentation (default ``config.seed``).
      start_step: Index of the first batch.

    Returns:
      An iterator of {'image': f32 [B, S, S, C], 'label': int32 [B]} global arrays.
    """
    seed = int(config.seed if seed is None else seed)
    source, channels, mean, std, _, fixed = _setup(config, mesh, config.batch_size, "batch_size")
    settings = policy.TrainAugSettings.from_config(config, mean=mean, std=std)
    geometry = None if fixed else (settings.image_size, "resize", 1.0)
    images, labels = load_arrays(source, source.resolve(config.train_split), geometry)
    n = len(labels)
    images_dev = sharding_lib.replicate(images, mesh)
    labels_dev = sharding_lib.replicate(labels, mesh)
    batch = int(config.batch_size)
    fn = functools.partial(
        _train_batch,
        settings=settings,
        channels=channels,
        batch=batch,
        shuffle=int(config.input.shuffle_buffer) > 1,
        sharding=sharding_lib.data_sharding(mesh),
    )

    def steps() -> Iterator[int]:
        step = int(start_step)
        while True:
            yield step
            step += 1

    def make(step: int) -> dict[str, jax.Array]:
        epoch0, offset = divmod(step * batch, n)
        return fn(images_dev, labels_dev, np.uint32(seed & 0xFFFFFFFF), np.int32(epoch0), np.int32(offset))

    return sharding_lib.prefetch(steps(), int(config.input.prefetch), make)


def _eval_fn(settings: policy.EvalSettings, mesh: Mesh, channels: int, mean, std, fixed: bool):
    size, ratio = settings.image_size, settings.crop_ratio
    sharding = sharding_lib.data_sharding(mesh)

    def fn(images: jax.Array) -> jax.Array:
        x = aug.convert_channels(images.astype(jnp.float32), channels)
        if fixed and settings.crop == "center_crop":
            h, w = x.shape[1:3]
            scale = math.floor(size / ratio) / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            x = jnp.round(jax.image.resize(x, (x.shape[0], nh, nw, x.shape[-1]), "linear", antialias=True))
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[:, top : top + size, left : left + size]
        else:
            x = aug.resize(x, size)
        return aug.normalize(jnp.clip(x, 0.0, 255.0), mean, std)

    return jax.jit(fn, out_shardings=sharding)


class EvalIterable:
    """Re-iterable over one pass of the eval split: padded, masked global batches (see `cvt_flax.data`).

    Build it once per run: it loads the split into host memory and compiles the preprocessing; each ``iter()``
    is one pass.
    """

    def __init__(self, config: Any, mesh: Mesh):
        source, channels, mean, std, local_batch, fixed = _setup(
            config, mesh, config.eval_batch_size, "eval_batch_size"
        )
        settings = policy.EvalSettings.from_config(config)
        geometry = None if fixed else (settings.image_size, settings.crop, settings.crop_ratio)
        self.images, self.labels = load_arrays(source, source.resolve(config.eval_split), geometry)
        self.mesh = mesh
        self.fn = _eval_fn(settings, mesh, channels, mean, std, fixed)
        self.local_batch = local_batch
        self.global_batch = int(config.eval_batch_size)
        self.prefetch = int(config.input.prefetch)
        self.num_examples = len(self.labels)
        self.num_batches = math.ceil(self.num_examples / self.global_batch)

    def __len__(self) -> int:
        return self.num_batches

    def _local(self, b: int) -> dict[str, np.ndarray]:
        start = b * self.global_batch + jax.process_index() * self.local_batch
        stop = min(start + self.local_batch, self.num_examples)
        n = max(0, stop - start)
        images = np.zeros((self.local_batch, *self.images.shape[1:]), np.uint8)
        labels = np.zeros((self.local_batch,), np.int32)
        mask = np.zeros((self.local_batch,), bool)
        if n:
            images[:n] = self.images[start:stop]
            labels[:n] = self.labels[start:stop]
            mask[:n] = True
        return {"image": images, "label": labels, "mask": mask}

    def _convert(self, b: int) -> dict[str, jax.Array]:
        batch = sharding_lib.to_global(self._local(b), self.mesh)
        batch["image"] = self.fn(batch["image"])
        return batch

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return sharding_lib.prefetch(range(self.num_batches), self.prefetch, self._convert)


def create_eval_iterator(config: Any, mesh: Mesh) -> EvalIterable:
    """One-pass-per-iter() eval batches {'image', 'label', 'mask'} (see `EvalIterable`); build it once per run."""
    return EvalIterable(config, mesh)
