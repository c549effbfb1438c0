"""The device pipeline (config.input.pipeline='device'): tfds.data_source + JAX augmentation, no TensorFlow.

Real data: the shared Fashion-MNIST as ArrayRecord and the digits image folder; 8 fake CPU devices.
"""

import collections
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_flax import data
from cvt_flax.data import augment_jax as aug

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_config(**overrides):
    from configs import default

    cfg = default.get_config()
    cfg.input.pipeline = "device"
    cfg.batch_size = 16
    cfg.eval_batch_size = 16
    cfg.input.prefetch = 1
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def plain(**overrides):
    base = {
        "aug.crop": "resize",
        "aug.hflip": False,
        "aug.randaugment_layers": 0,
        "aug.random_erasing": 0.0,
        "aug.color_jitter": 0.0,
    }
    base.update(overrides)
    return make_config(**base)


@pytest.fixture(scope="module")
def mesh():
    return jax.sharding.Mesh(np.array(jax.devices()), ("data",))


@pytest.fixture(scope="module")
def fmnist(shared_dir):
    return {"dataset": "fashion_mnist", "data_dir": str(shared_dir / "tfds_array_record"), "download": False}


def _stored(data_dir, split):
    import tensorflow_datasets as tfds

    src = tfds.data_source("fashion_mnist", data_dir=data_dir, split=split)
    return [(src[i]["image"], int(src[i]["label"])) for i in range(len(src))]


def _take(it, n):
    return [jax.device_get(next(it)) for _ in range(n)]


def test_train_batches_and_exact_resume(mesh, fmnist):
    # Full augmentation (RandAugment, erasing, pad-crop, flip); 40 examples, batches straddle epochs.
    cfg = make_config(**fmnist, train_split="train[:40]", image_size=32)
    it = data.create_train_iterator(cfg, mesh, seed=1, start_step=0)
    first = next(it)
    assert first["image"].shape == (16, 32, 32, 3) and first["image"].dtype == jnp.float32
    assert first["label"].shape == (16,) and first["label"].dtype == jnp.int32
    assert first["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    batches = [jax.device_get(first)] + _take(it, 5)
    for b in batches:
        assert np.all(np.isfinite(b["image"])) and b["label"].max() < 10
    resumed = _take(data.create_train_iterator(cfg, mesh, seed=1, start_step=3), 3)
    for a, b in zip(batches[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = _take(data.create_train_iterator(cfg, mesh, seed=2), 1)[0]
    assert not np.array_equal(other["image"], batches[0]["image"])


def test_each_epoch_is_a_fresh_permutation(mesh, fmnist):
    cfg = plain(**fmnist, train_split="train[:48]", image_size=28, num_channels=0)
    batches = _take(data.create_train_iterator(cfg, mesh, seed=0), 6)
    key = {img.tobytes(): label for img, label in _stored(cfg.data_dir, "train[:48]")}
    epochs = []
    for e in range(2):
        seen = []
        for b in batches[3 * e : 3 * e + 3]:
            for img, label in zip(b["image"], b["label"], strict=True):
                raw = np.round((img * 0.3530 + 0.2860) * 255).astype(np.uint8)
                assert key[raw.tobytes()] == label
                seen.append(raw.tobytes())
        assert sorted(seen) == sorted(key)
        epochs.append(seen)
    assert epochs[0] != epochs[1] and epochs[0] != list(key)


def test_eval_covers_split_exactly_once(mesh, fmnist):
    cfg = make_config(
        **fmnist, eval_split="test[:37]", image_size=32, num_channels=1, **{"aug.eval_crop": "center_crop"}
    )
    ev = data.create_eval_iterator(cfg, mesh)
    want = collections.Counter(label for _, label in _stored(cfg.data_dir, "test[:37]"))
    passes = []
    for _ in range(2):  # built once, one pass per iter()
        batches = [jax.device_get(b) for b in ev]
        assert len(batches) == 3 == len(ev)
        assert batches[0]["image"].shape == (16, 32, 32, 1)
        mask = np.concatenate([b["mask"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        assert mask.sum() == 37 and not mask[37:].any()
        assert collections.Counter(labels[mask].tolist()) == want
        passes.append(np.concatenate([b["image"] for b in batches]))
    np.testing.assert_array_equal(passes[0], passes[1])


def test_image_folder(mesh, shared_dir):
    cfg = plain(
        dataset="image_folder",
        data_dir=str(shared_dir / "data" / "digits"),
        image_size=12,
        num_channels=3,
        eval_split="test",
        eval_batch_size=64,
        **{"aug.crop": "pad_crop", "aug.random_erasing": 0.5, "aug.hflip": True, "aug.eval_crop": "center_crop"},
    )
    b = next(data.create_train_iterator(cfg, mesh))
    assert b["image"].shape == (16, 12, 12, 3)
    batches = [jax.device_get(b) for b in data.create_eval_iterator(cfg, mesh)]
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])[mask]
    root = shared_dir / "data" / "digits" / "test"
    assert collections.Counter(labels.tolist()) == {int(d): len(os.listdir(root / d)) for d in os.listdir(root)}


def test_no_tensorflow_on_the_device_path(shared_dir):
    """Hides TensorFlow (as on the GPU machine) and runs the device pipeline in a subprocess."""
    script = textwrap.dedent(
        f"""
        import sys

        class _HideTF:  # find_spec returns None for tensorflow: it looks not installed
            def __init__(self, finder):
                self.finder = finder
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tensorflow":
                    return None
                find = getattr(self.finder, "find_spec", None)
                return find(name, path, target) if find else None
            def invalidate_caches(self):
                getattr(self.finder, "invalidate_caches", lambda: None)()

        sys.meta_path[:] = [_HideTF(f) for f in sys.meta_path]
        import jax, numpy as np
        from configs import default
        import cvt_flax.data
        from cvt_flax.data import device
        cfg = default.get_config()
        cfg.dataset, cfg.data_dir, cfg.download = "fashion_mnist", {str(shared_dir / "tfds_array_record")!r}, False
        cfg.input.pipeline = "device"
        cfg.train_split, cfg.eval_split = "train[:32]", "test[:10]"
        cfg.batch_size = cfg.eval_batch_size = 8
        cfg.image_size = 28
        cfg.aug.randaugment_layers = 0
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        assert cvt_flax.data.get_dataset_info(cfg).num_train_examples == 32
        b = next(cvt_flax.data.create_train_iterator(cfg, mesh))
        assert b["image"].shape == (8, 28, 28, 3), b["image"].shape
        n = sum(int(e["mask"].sum()) for e in cvt_flax.data.create_eval_iterator(cfg, mesh))
        assert n == 10, n
        loaded = [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
        assert not loaded, loaded
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            print("OK")
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")


def test_jax_ops_shapes_and_ranges():
    # One channel here; the train test above runs RandAugment and the rest on 3 channels, and
    # test_data_augment_tf checks every RandAugment op against TensorFlow's on 1 and 3 channels.
    c = 1
    rng = np.random.RandomState(c)
    images = jnp.asarray(rng.randint(0, 256, (4, 20, 24, c)).astype(np.float32))
    keys = jax.random.split(jax.random.key(0), 4)

    @jax.jit
    def run(keys, x):
        def one(k, img):
            ks = jax.random.split(k, 5)
            return {
                "rrc": aug.random_resized_crop(ks[0], img, 16),
                "pad": aug.pad_crop(ks[1], img, 16, 4),
                "cj": aug.color_jitter(ks[3], img, 0.4),
                "re": aug.random_erasing(ks[4], aug.normalize(img, (0.5,) * c, (0.5,) * c), 1.0),
                "norm": aug.normalize(img, (0.5,) * c, (0.5,) * c),
            }

        return jax.vmap(one)(keys, x)

    out = jax.device_get(run(keys, images))
    assert out["rrc"].shape == (4, 16, 16, c) and out["pad"].shape == (4, 16, 16, c)
    assert out["cj"].shape == (4, 20, 24, c)
    for k in ("rrc", "pad", "cj"):
        assert out[k].min() >= 0 and out[k].max() <= 255 and np.all(out[k] == np.round(out[k])), k
    np.testing.assert_allclose(out["norm"], (np.asarray(images) / 255 - 0.5) / 0.5, atol=1e-5)
    changed = np.any(out["re"] != out["norm"], axis=-1)
    assert np.all(changed.mean(axis=(1, 2)) > 0) and np.all(changed.mean(axis=(1, 2)) <= 0.4)
    again = jax.device_get(run(keys, images))
    np.testing.assert_array_equal(out["rrc"], again["rrc"])
