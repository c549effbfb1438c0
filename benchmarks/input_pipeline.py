"""Host-side input throughput (images/s per CPU core) and the device-fed ratio of the train step.

    python -m benchmarks.input_pipeline [--recipes cifar_fmnist,cifar_mock,imagenet] [--threads 1,0]
        [--batch 256] [--batches 20] [--fed] [--fed-model cvt_tiny] [--pipeline tfdata|device] [--json OUT]

Recipes (the project's tf.data pipeline, `cvt_flax.data.tfdata`, with the augmentation of `configs/default.py`:
crop, flip, RandAugment 2/9, random erasing 0.25):

* ``cifar_fmnist``: the real train pipeline (``make_train_dataset``) on the shared Fashion-MNIST
  (``../shared/tfds``), 28x28 grey -> 32x32x3, pad-crop 4, flip, RandAugment, erasing.
* ``cifar_mock``: the same augmentation of 32x32x3 uint8 images held in memory (CIFAR's shape, no reading).
* ``imagenet``: ImageNet-style 224x224: synthetic JPEG-encoded 500x375 images (smooth content, quality 90,
  about the size of ImageNet's), decode + random-resized crop + flip, at three depths of the recipe:
  ``decode`` (decode only), ``rrc_flip`` (+ crop and flip), ``full`` (+ RandAugment 2/9 + random erasing).

Per core: each dataset runs with ``threading.private_threadpool_size = n`` and
``max_intra_op_parallelism = 1``; ``--threads 1,0`` measures one thread (images/s per core directly) and all
cores (0 = ``os.cpu_count()``; divided by n for the per-core figure). The device-fed ratio (``--fed``) is the
train step's steps/s fed by the real iterator (``data.create_train_iterator``) over its steps/s on synthetic
on-device batches; on a CPU host the pipeline and the model share the cores, so there it measures overhead only.
On a machine without TensorFlow use ``--recipes '' --fed --pipeline device``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ("cifar_fmnist", "cifar_mock", "imagenet")


def base_config(data_dir: str | None = None, pipeline: str = "tfdata") -> Any:
    """configs/default.py's recipe on the shared Fashion-MNIST, as 32x32x3 (CIFAR-style) images."""
    from configs import default

    config = default.get_config()
    config.dataset = "fashion_mnist"
    if data_dir is None:
        from configs import offline_data

        data_dir = offline_data.tfds_data_dir(pipeline)
    config.data_dir = data_dir
    config.download = False
    config.image_size = 32
    config.num_channels = 3
    config.input.pipeline = pipeline
    config.input.cache = True
    config.input.shuffle_buffer = 4096
    config.aug.crop = "pad_crop"
    config.aug.crop_padding = 4
    config.aug.hflip = True
    config.aug.randaugment_layers = 2
    config.aug.randaugment_magnitude = 9
    config.aug.random_erasing = 0.25
    return config


def _threaded(ds: Any, threads: int) -> Any:
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = True
    return ds.with_options(options)


def _time_dataset(ds: Any, batches: int, warmup: int, batch: int) -> dict[str, float]:
    it = iter(ds)
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t1
    return {"images_per_s": batches * batch / elapsed, "warmup_s": t1 - t0, "timed_s": elapsed}


class _ArrayReader:
    """Stands in for tfdata's reader: images already decoded (``decode`` also decodes JPEG bytes)."""

    def __init__(self, channels: int):
        self.channels = channels

    def decode(self, encoded: Any) -> Any:
        import tensorflow as tf

        image = tf.io.decode_jpeg(encoded, channels=self.channels)
        return tf.ensure_shape(image, [None, None, self.channels])


def _augment_fn(config: Any, mean: Any, std: Any, decode: bool, channels: int = 3) -> Any:
    """The project's train augmentation map function ``(position, example) -> example``."""
    from cvt_flax.data import policy, tfdata

    settings = policy.TrainAugSettings.from_config(config, mean=mean, std=std)
    return tfdata._train_augment_fn(settings, 12345, _ArrayReader(channels), decode)


def synthetic_jpegs(n: int = 64, height: int = 375, width: int = 500, quality: int = 90, seed: int = 0) -> list[bytes]:
    """JPEG bytes of smooth random images (low-resolution noise upsampled, plus fine noise), ImageNet-sized."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.uniform(0, 255, (12, 16, 3)).astype(np.float32)
        img = tf.image.resize(low[None], (height, width), method="bicubic")[0].numpy()
        img = img + rng.normal(0, 8, img.shape)
        out.append(tf.io.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=quality).numpy())
    return out


def bench_cifar_fmnist(config: Any, batch: int, batches: int, warmup: int, threads: int) -> dict[str, Any]:
    """The real train tf.data pipeline (read, cache, shuffle, augment, batch) on the shared Fashion-MNIST."""
    from cvt_flax.data import tfdata

    ds = tfdata.make_train_dataset(config, seed=0, start_step=0, local_batch=batch, process_index=0, process_count=1)
    return _time_dataset(_threaded(ds, threads), batches, warmup, batch)


def bench_cifar_mock(config: Any, batch: int, batches: int, warmup: int, threads: int) -> dict[str, Any]:
    """The train augmentation of in-memory 32x32x3 uint8 images (CIFAR's shape)."""
    import tensorflow as tf

    from cvt_flax.data import info as info_lib

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2048, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, (2048,), dtype=np.int32)
    mean, std = info_lib.normalization_stats(config, "cifar100", 3)
    fn = _augment_fn(config, mean, std, decode=False)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).repeat().enumerate()
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _time_dataset(_threaded(ds, threads), batches, warmup, batch)


def bench_imagenet(
    config: Any, batch: int, batches: int, warmup: int, threads: int, jpegs: list[bytes], stage: str = "full"
) -> dict[str, Any]:
    """ImageNet-style 224x224 training preprocessing of JPEG-encoded images (``stage``: decode, rrc_flip, full)."""
    import tensorflow as tf

    from cvt_flax.data import info as info_lib

    cfg = config.copy_and_resolve_references()
    cfg.image_size = 224
    cfg.aug.crop = "random_resized_crop"
    cfg.aug.crop_min_scale = 0.08
    if stage == "rrc_flip":
        cfg.aug.randaugment_layers = 0
        cfg.aug.random_erasing = 0.0
    mean, std = info_lib.normalization_stats(cfg, "imagenet2012", 3)
    labels = np.arange(len(jpegs), dtype=np.int32) % 1000
    ds = tf.data.Dataset.from_tensor_slices({"image": jpegs, "label": labels}).repeat()
    if stage == "decode":

        @tf.autograph.experimental.do_not_convert
        def fn(ex):
            image = tf.io.decode_jpeg(ex["image"], channels=3)
            return {"image": tf.shape(image), "label": ex["label"]}

        ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.enumerate().map(_augment_fn(cfg, mean, std, decode=True), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _time_dataset(_threaded(ds, threads), batches, warmup, batch)


def device_fed_ratio(
    config: Any, model_name: str, batch: int, steps: int, warmup: int, dtype: str = "float32", repeats: int = 2
) -> dict[str, Any]:
    """Steps/s of the train step fed by the real iterator over steps/s on synthetic on-device batches.

    Args:
      config: Data config (its ``input.pipeline`` picks tfdata or device).
      model_name: Variant trained (its input must fit ``config.image_size``).
      batch: Global batch (one device).
      steps: Timed steps of each feeding.
      warmup: Untimed steps first (compilation, pipeline fill).
      dtype: Compute dtype.
      repeats: Alternating rounds of (synthetic, real); the best round of each counts.

    Returns:
      ``{'real_steps_per_s', 'synthetic_steps_per_s', 'ratio', ...}``.
    """
    import jax

    from cvt_flax import data, sharding
    from cvt_flax import train_utils as tu

    cfg = config.copy_and_resolve_references()
    cfg.batch_size = batch
    cfg.model = model_name
    cfg.dtype = dtype
    cfg.num_train_steps = 10_000
    dev = jax.devices()[0]
    mesh = sharding.create_mesh([dev])
    info = data.get_dataset_info(cfg)
    # The training loop's own program (model, optimizer, jitted train step).
    program = tu.build_program(
        cfg, mesh, num_classes=info.num_classes, in_chans=info.channels, num_train_examples=info.num_train_examples
    )
    step = program.train_step
    state = program.init_state(program.init_rng)

    t0 = time.perf_counter()
    it = data.create_train_iterator(cfg, mesh, seed=0, start_step=0)
    first = next(it)
    iterator_start_s = time.perf_counter() - t0
    sharding = sharding.data_sharding(mesh)
    syn = {
        "image": jax.device_put(np.asarray(jax.random.normal(jax.random.PRNGKey(1), first["image"].shape)), sharding),
        "label": jax.device_put(np.zeros(first["label"].shape, np.int32), sharding),
    }

    def loop(get_batch, n):
        nonlocal state
        metrics = None
        t = time.perf_counter()
        for _ in range(n):
            state, metrics = step(state, get_batch())
        jax.block_until_ready(metrics)
        return time.perf_counter() - t

    def real_batch():
        return next(it)

    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        loop(lambda: syn, warmup)  # compiles
        loop(real_batch, warmup)  # fills the pipeline
        # Alternate the two feedings and keep each one's best, so that a busy spell of a shared host does not
        # land on one side only.
        syn_s = real_s = float("inf")
        for _ in range(repeats):
            syn_s = min(syn_s, loop(lambda: syn, steps))
            real_s = min(real_s, loop(real_batch, steps))
    real, syn = steps / real_s, steps / syn_s
    return {
        "pipeline": str(cfg.input.pipeline),
        "model": model_name,
        "batch": batch,
        "image_size": int(cfg.image_size),
        "steps": steps,
        "repeats": repeats,
        "device_kind": dev.device_kind,
        "iterator_start_s": iterator_start_s,
        "real_steps_per_s": real,
        "synthetic_steps_per_s": syn,
        "real_images_per_s": real * batch,
        "synthetic_images_per_s": syn * batch,
        "ratio": real / syn,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {RECIPES} ('' none)")
    p.add_argument("--imagenet-stages", default="decode,rrc_flip,full")
    p.add_argument("--threads", default="1,0", help="thread-pool sizes to measure (0: all cores)")
    p.add_argument("--batch", type=int, default=256, help="host batch of the 32x32 recipes")
    p.add_argument("--imagenet-batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--data-dir", default=None, help="TFDS data_dir with fashion_mnist (default ../shared/...)")
    p.add_argument("--fed", action="store_true", help="also measure the device-fed ratio of the train step")
    p.add_argument("--pipeline", default="tfdata", choices=("tfdata", "device"), help="pipeline of --fed")
    p.add_argument("--fed-model", default="cvt_tiny")
    p.add_argument("--fed-batch", type=int, default=64)
    p.add_argument("--fed-steps", type=int, default=20)
    p.add_argument("--fed-dtype", default="float32")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    cores = os.cpu_count() or 1
    threads = sorted({cores if int(t) == 0 else int(t) for t in args.threads.split(",") if t.strip()})
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise SystemExit(f"Unknown recipe(s) {sorted(unknown)}; choose from {RECIPES}.")
    argv_seen = sys.argv[1:] if argv is None else list(argv)
    out: dict[str, Any] = {"host": harness.host_info(), "argv": argv_seen, "rows": []}
    config = base_config(args.data_dir, "tfdata") if recipes else None
    jpegs = None
    for recipe in recipes:
        stages = [s for s in args.imagenet_stages.split(",") if s] if recipe == "imagenet" else ["full"]
        if recipe == "imagenet" and jpegs is None:
            jpegs = synthetic_jpegs()
            out["imagenet_jpeg_mean_bytes"] = float(np.mean([len(j) for j in jpegs]))
        for stage in stages:
            for n in threads:
                batch = args.imagenet_batch if recipe == "imagenet" else args.batch
                try:
                    if recipe == "cifar_fmnist":
                        r = bench_cifar_fmnist(config, batch, args.batches, args.warmup, n)
                    elif recipe == "cifar_mock":
                        r = bench_cifar_mock(config, batch, args.batches, args.warmup, n)
                    else:
                        r = bench_imagenet(config, batch, args.batches, args.warmup, n, jpegs, stage)
                    r.update(images_per_s_per_core=r["images_per_s"] / n)
                except Exception as err:  # noqa: BLE001 - recorded; other rows still run
                    r = {"error": f"{type(err).__name__}: {err}"[:1000]}
                row = {"recipe": recipe, "stage": stage, "threads": n, "batch": batch, **r}
                out["rows"].append(row)
                print(
                    f"{recipe:13s} {stage:9s} threads={n}: {harness.fmt(row.get('images_per_s'))} img/s, "
                    f"{harness.fmt(row.get('images_per_s_per_core'))} img/s/core"
                    + (f"  ERROR {row['error'][:200]}" if "error" in row else ""),
                    flush=True,
                )
    if args.fed:
        cfg = base_config(args.data_dir, args.pipeline)
        try:
            fed = device_fed_ratio(cfg, args.fed_model, args.fed_batch, args.fed_steps, args.warmup, args.fed_dtype)
        except Exception as err:  # noqa: BLE001
            fed = {"error": f"{type(err).__name__}: {err}"[:1000]}
        out["fed"] = fed
        print(
            f"device-fed ({fed.get('pipeline', args.pipeline)}, {args.fed_model}, batch {args.fed_batch}): real "
            f"{harness.fmt(fed.get('real_steps_per_s'), 2)} steps/s vs synthetic "
            f"{harness.fmt(fed.get('synthetic_steps_per_s'), 2)} steps/s -> ratio {harness.fmt(fed.get('ratio'), 3)}"
            + (f"  ERROR {fed['error'][:300]}" if "error" in fed else ""),
            flush=True,
        )
    harness.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
