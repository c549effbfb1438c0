"""TFDS + tf.data input pipeline (``config.input.pipeline == 'tfdata'``).

Train stream, per process (each process reads its own contiguous share of the split):

    base (read [+ decode] [+ cache])
      -> epochs e = start_epoch, start_epoch + 1, ...: base.shuffle(buffer, seed=f(seed, process, e))
      -> skip the examples of the start epoch already consumed
      -> enumerate (position p in the process's stream)
      -> [decode] + augment: the train policy (cvt_flax.data.policy) with the stateless TensorFlow kernels of
         cvt_flax.data.augment_tf, seeded by (seed, process, p)
      -> batch(local_batch, drop_remainder) -> numpy -> global jax arrays (kept `config.input.prefetch` ahead)

Shuffling happens before repetition (a fresh permutation per epoch) and every random choice is a function of
(seed, process, epoch) or (seed, process, position), so batch k is a pure function of (config, seed, k) and an
iterator created with ``start_step=k`` continues exactly where a run from step 0 was at step k.

Images of a fixed size (CIFAR, MNIST...) are decoded before the cache; images of varying sizes are cached
encoded and decoded after shuffling.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from cvt_flax import serving
from cvt_flax import sharding as sharding_lib
from cvt_flax.data import augment_tf as aug
from cvt_flax.data import info as info_lib
from cvt_flax.data import policy

with contextlib.suppress(RuntimeError):  # TensorFlow only feeds data: keep it off the accelerators.
    tf.config.set_visible_devices([], "GPU")

_INT64_MAX = np.iinfo(np.int64).max
# The map functions use explicit tf.cond/tf.switch_case: AutoGraph conversion would only cost tracing time.
_no_ag = tf.autograph.experimental.do_not_convert


def _seed_base(seed: int, process_index: int, salt: int) -> int:
    """A 31-bit stream id from (seed, process, purpose)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, process_index, salt]).generate_state(1)[0] >> 1)


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return options


class _Reader:
    """Reads examples of absolute ranges as {'image': uint8 or encoded bytes, 'label': int32}."""

    def __init__(self, source: info_lib.Source, channels: int):
        self.source = source
        self.channels = channels
        h, w, self.source_channels = source.image_shape
        self.fixed_size = h is not None and w is not None

    def read(self, ranges: list[info_lib.Range], *, decode: bool) -> tf.data.Dataset:
        """Dataset of the examples in ``ranges``, in order; images decoded when ``decode``."""
        src = self.source
        if src.is_image_folder:
            paths, labels = [], []
            for name, a, b in ranges:
                for p, lab in src.files[name][a:b]:
                    paths.append(p)
                    labels.append(lab)
            ds = tf.data.Dataset.from_tensor_slices(
                {"image": tf.constant(paths, tf.string), "label": tf.constant(labels, tf.int32)}
            )
            ds = ds.map(_no_ag(lambda ex: {"image": tf.io.read_file(ex["image"]), "label": ex["label"]}))
        else:
            spec = info_lib.ranges_to_spec(ranges)
            read_config = tfds.ReadConfig(try_autocache=False, add_tfds_id=False, shuffle_seed=0)
            ds = src.builder.as_dataset(
                split=spec,
                shuffle_files=False,
                decoders={"image": tfds.decode.SkipDecoding()},
                read_config=read_config,
            )
            ds = ds.map(_no_ag(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)}))
            # Exactly the examples the metadata promises (a no-op on real data; `tfds.testing.mock_data` yields a
            # fixed count whatever the split): epoch lengths and eval batch counts rely on it.
            ds = ds.take(sum(b - a for _, a, b in ranges))
        if decode:
            ds = ds.map(_no_ag(self.decode_example), num_parallel_calls=tf.data.AUTOTUNE)
        return ds

    def decode(self, encoded: tf.Tensor) -> tf.Tensor:
        """Encoded image -> uint8 [H, W, model channels]."""
        if self.source.is_image_folder:
            # PIL through serving.decode_bytes, as predict and export decode files (EXIF orientation, 16-bit,
            # palette, CMYK, first GIF frame): training sees the pixels that serving will.
            channels = self.source_channels
            image = tf.numpy_function(
                lambda b: serving.decode_bytes(b if isinstance(b, bytes) else b.item(), channels), [encoded], tf.uint8
            )
        else:
            image = self.source.builder.info.features["image"].decode_example(encoded)
        image = tf.ensure_shape(image, [None, None, self.source_channels])
        return aug.convert_channels(image, self.channels)

    def decode_example(self, ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"image": self.decode(ex["image"]), "label": ex["label"]}


def _setup(config: Any, mesh: Mesh, batch_size: int, what: str):
    source = info_lib.open_source(config)
    channels = info_lib.model_channels(config, source.image_shape[2])
    mean, std = info_lib.normalization_stats(config, source.name, channels)
    local_batch = sharding_lib.check_batch_size(batch_size, what, mesh.devices.size, jax.process_count())
    return source, channels, mean, std, local_batch


def _train_augment_fn(settings: policy.TrainAugSettings, aug_base: int, reader: _Reader, decode: bool):
    """The map function ``(position, example) -> example`` of the train stream (the policy, TensorFlow kernels)."""

    @_no_ag
    def fn(pos: tf.Tensor, ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = reader.decode(ex["image"]) if decode else ex["image"]
        seed = tf.stack([tf.constant(aug_base, tf.int64), tf.cast(pos, tf.int64)])
        return {"image": policy.apply_train_policy(settings, aug.KERNELS, image, seed), "label": ex["label"]}

    return fn


def _eval_preprocess_fn(settings: policy.EvalSettings, mean, std, reader: _Reader, decode: bool):
    size = settings.image_size

    @_no_ag
    def fn(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = reader.decode(ex["image"]) if decode else ex["image"]
        if settings.crop == "center_crop":
            image = aug.center_crop(image, size, settings.crop_ratio)
        else:
            image = tf.ensure_shape(aug.resize_if_needed(image, size), [size, size, reader.channels])
        return {"image": aug.normalize(image, mean, std), "label": ex["label"]}

    return fn


def make_train_dataset(
    config: Any, *, seed: int, start_step: int, local_batch: int, process_index: int, process_count: int
) -> tf.data.Dataset:
    """This process's infinite train dataset of numpy-able batches (see the module docstring).

    Args:
      config: Run config.
      seed: Seed of order and augmentation.
      start_step: First batch to produce (batches before it are skipped exactly).
      local_batch: Per-process batch size.
      process_index: This process.
      process_count: Number of processes.

    Returns:
      A tf.data.Dataset of {'image': f32 [local_batch, S, S, C], 'label': int32 [local_batch]}.
    """
    source = info_lib.open_source(config)
    channels = info_lib.model_channels(config, source.image_shape[2])
    mean, std = info_lib.normalization_stats(config, source.name, channels)
    settings = policy.TrainAugSettings.from_config(config, mean=mean, std=std)
    ranges = info_lib.process_ranges(source.resolve(config.train_split), process_index, process_count)
    local_n = sum(b - a for _, a, b in ranges)
    if local_n == 0:
        raise info_lib.DatasetError(
            f"Train split {config.train_split!r} has no examples for process {process_index} of {process_count}; "
            "use a larger --config.train_split."
        )
    reader = _Reader(source, channels)
    decode_early = reader.fixed_size
    base = reader.read(ranges, decode=decode_early)
    if config.input.cache:
        base = base.cache()
    buffer = min(int(config.input.shuffle_buffer), local_n)
    shuffle_base = _seed_base(seed, process_index, 1)
    aug_base = _seed_base(seed, process_index, 2)

    start_pos = int(start_step) * local_batch
    start_epoch, skip = divmod(start_pos, local_n)

    @_no_ag
    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        if buffer <= 1:
            return base
        return base.shuffle(buffer, seed=shuffle_base + e * 1_000_003, reshuffle_each_iteration=False)

    ds = tf.data.Dataset.range(start_epoch, _INT64_MAX).flat_map(epoch)
    if skip:
        ds = ds.skip(skip)
    ds = ds.enumerate(start=start_pos)
    fn = _train_augment_fn(settings, aug_base, reader, decode=not decode_early)
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options())


def create_train_iterator(
    config: Any, mesh: Mesh, seed: int | None = None, start_step: int = 0
) -> Iterator[dict[str, jax.Array]]:
    """Infinite iterator of global train batches {'image': f32 [B, S, S, C], 'label': int32 [B]}.

    Args:
      config: Run config.
      mesh: Device mesh; batches are sharded over its 'data' axis.
      seed: Seed of order and augmentation (default ``config.seed``).
      start_step: Index of the first batch (resume): yields exactly what a start at 0 yields from there on.

    Returns:
      An iterator of dicts of global `jax.Array`s.
    """
    seed = int(config.seed if seed is None else seed)
    local_batch = sharding_lib.check_batch_size(config.batch_size, "batch_size", mesh.devices.size, jax.process_count())
    ds = make_train_dataset(
        config,
        seed=seed,
        start_step=start_step,
        local_batch=local_batch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return sharding_lib.prefetch(
        ds.as_numpy_iterator(), int(config.input.prefetch), lambda b: sharding_lib.to_global(b, mesh)
    )


class EvalIterable:
    """Re-iterable over one full pass of the eval split: {'image', 'label', 'mask'} global batches.

    Each process reads its own share; the last batches are padded (zero images, label 0, mask False) so that every
    process yields the same number of batches and every eval example appears exactly once. Build it once per run:
    with ``config.input.cache`` the first pass fills the cache that later passes read.
    """

    def __init__(self, config: Any, mesh: Mesh):
        source, channels, mean, std, local_batch = _setup(config, mesh, config.eval_batch_size, "eval_batch_size")
        settings = policy.EvalSettings.from_config(config)
        self.mesh = mesh
        self.local_batch = local_batch
        self.prefetch = int(config.input.prefetch)
        self.image_size = settings.image_size
        self.channels = channels
        pc, pi = jax.process_count(), jax.process_index()
        all_ranges = source.resolve(config.eval_split)
        total = sum(b - a for _, a, b in all_ranges)
        self.num_examples = total
        self.num_batches = math.ceil(max(info_lib.share_sizes(total, pc)) / local_batch) if total else 0
        ranges = info_lib.process_ranges(all_ranges, pi, pc)
        self.dataset = None
        if ranges:
            reader = _Reader(source, channels)
            ds = reader.read(ranges, decode=reader.fixed_size)
            if config.input.cache:
                ds = ds.cache()
            ds = ds.map(
                _eval_preprocess_fn(settings, mean, std, reader, decode=not reader.fixed_size),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
            self.dataset = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE).with_options(_options())

    def __len__(self) -> int:
        return self.num_batches

    def _local_batches(self) -> Iterator[dict[str, np.ndarray]]:
        lb, s, c = self.local_batch, self.image_size, self.channels
        count = 0
        if self.dataset is not None:
            for batch in self.dataset.as_numpy_iterator():
                n = batch["label"].shape[0]
                mask = np.zeros([lb], bool)
                mask[:n] = True
                if n < lb:
                    batch = {
                        "image": np.concatenate([batch["image"], np.zeros([lb - n, s, s, c], np.float32)]),
                        "label": np.concatenate([batch["label"], np.zeros([lb - n], np.int32)]),
                    }
                yield {**batch, "mask": mask}
                count += 1
        while count < self.num_batches:  # this process has fewer examples than others
            yield {
                "image": np.zeros([lb, s, s, c], np.float32),
                "label": np.zeros([lb], np.int32),
                "mask": np.zeros([lb], bool),
            }
            count += 1

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return sharding_lib.prefetch(
            self._local_batches(), self.prefetch, lambda b: sharding_lib.to_global(b, self.mesh)
        )


def create_eval_iterator(config: Any, mesh: Mesh) -> EvalIterable:
    """One-pass-per-iter() eval batches with a validity mask (see `EvalIterable`); build it once per run."""
    return EvalIterable(config, mesh)
