"""The TFDS + tf.data pipeline (config.input.pipeline='tfdata') on 8 fake CPU devices.

Real data: the shared Fashion-MNIST (TFRecord) and digits image folder; CIFAR-100 through
`tfds.testing.mock_data` (with split metadata written to a temporary data_dir). Nothing is downloaded.
"""

import collections
import os

import jax
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from cvt_flax import data  # noqa: E402
from cvt_flax.data import tfdata  # noqa: E402


def make_config(**overrides):
    from configs import default

    cfg = default.get_config()
    cfg.batch_size = 16
    cfg.eval_batch_size = 16
    cfg.input.shuffle_buffer = 64
    cfg.input.prefetch = 1
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def plain(**overrides):
    """No random augmentation: images are the stored ones (resized), so examples can be recognised."""
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
    return {"dataset": "fashion_mnist", "data_dir": str(shared_dir / "tfds"), "download": False}


def _take(it, n):
    return [jax.device_get(next(it)) for _ in range(n)]


def test_train_batches_and_exact_resume(mesh, fmnist):
    # 40 examples, batch 16: batches 2 and 4 straddle epochs; start_step=3 starts inside epoch 1.
    cfg = make_config(**fmnist, train_split="train[:40]", image_size=32)
    it = data.create_train_iterator(cfg, mesh, seed=1, start_step=0)
    first = next(it)
    assert first["image"].shape == (16, 32, 32, 3) and first["image"].dtype == np.float32
    assert first["label"].shape == (16,) and first["label"].dtype == np.int32
    assert first["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    batches = [jax.device_get(first)] + _take(it, 5)
    for b in batches:
        assert np.all(np.isfinite(b["image"])) and b["label"].min() >= 0 and b["label"].max() < 10
    resumed = _take(data.create_train_iterator(cfg, mesh, seed=1, start_step=3), 3)
    for a, b in zip(batches[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = _take(data.create_train_iterator(cfg, mesh, seed=2, start_step=0), 1)[0]
    assert not np.array_equal(other["image"], batches[0]["image"])


def _stored_images(cfg, split):
    builder = tfds.builder(cfg.dataset, data_dir=cfg.data_dir)
    ds = tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    return [(ex["image"], int(ex["label"])) for ex in ds]


def test_each_epoch_is_a_fresh_permutation(mesh, fmnist):
    cfg = plain(**fmnist, train_split="train[:48]", image_size=28, num_channels=0)
    batches = _take(data.create_train_iterator(cfg, mesh, seed=0), 6)
    mean, std = 0.2860, 0.3530
    stored = _stored_images(cfg, "train[:48]")
    key = {np.asarray(img).tobytes(): label for img, label in stored}
    epochs = []
    for e in range(2):
        seen = []
        for b in batches[3 * e : 3 * e + 3]:
            for img, label in zip(b["image"], b["label"], strict=True):
                raw = np.round((img * std + mean) * 255).astype(np.uint8)
                assert key[raw.tobytes()] == label
                seen.append(raw.tobytes())
        assert sorted(seen) == sorted(key)  # every example exactly once per epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled
    assert epochs[0] != list(key)  # shuffled at all


def test_processes_read_disjoint_shares(fmnist):
    cfg = plain(**fmnist, train_split="train[:32]", image_size=28, num_channels=0)
    seen = []
    for p in range(2):
        ds = tfdata.make_train_dataset(cfg, seed=0, start_step=0, local_batch=8, process_index=p, process_count=2)
        for b in ds.take(2).as_numpy_iterator():  # one epoch of this process's 16 examples
            seen.extend(np.round(img * 255).tobytes() for img in b["image"])
    assert len(set(seen)) == 32


def test_eval_covers_split_exactly_once(mesh, fmnist):
    cfg = make_config(**fmnist, eval_split="test[:37]", image_size=28)
    ev = data.create_eval_iterator(cfg, mesh)
    for _ in range(2):  # re-iterable; the second pass reads the cache
        batches = [jax.device_get(b) for b in ev]
        assert len(batches) == 3 == len(ev)
        mask = np.concatenate([b["mask"] for b in batches])
        labels = np.concatenate([b["label"] for b in batches])
        assert mask.dtype == bool and mask.sum() == 37 and not mask[37:].any()
        assert batches[0]["image"].shape == (16, 28, 28, 3)
        want = collections.Counter(label for _, label in _stored_images(cfg, "test[:37]"))
        assert collections.Counter(labels[mask].tolist()) == want
        assert np.all(batches[-1]["image"][mask[32:] == 0] == 0)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder(mesh, shared_dir, channels):
    cfg = make_config(
        dataset="image_folder",
        data_dir=str(shared_dir / "data" / "digits"),
        image_size=16,
        num_channels=channels,
        eval_split="test",
        eval_batch_size=64,
        **{
            "aug.randaugment_layers": 0,
            "aug.crop": "random_resized_crop",
            "aug.eval_crop": "center_crop" if channels == 1 else "resize",
        },
    )
    info = data.get_dataset_info(cfg)
    assert info.channels == channels and info.num_classes == 10
    b = next(data.create_train_iterator(cfg, mesh))
    assert b["image"].shape == (16, 16, 16, channels)
    batches = [jax.device_get(b) for b in data.create_eval_iterator(cfg, mesh)]
    mask = np.concatenate([b["mask"] for b in batches])
    assert len(batches) == 6 and mask.sum() == 359
    labels = np.concatenate([b["label"] for b in batches])[mask]
    root = shared_dir / "data" / "digits" / "test"
    want = {int(d): len(os.listdir(root / d)) for d in os.listdir(root)}
    assert collections.Counter(labels.tolist()) == want


def _write_metadata(data_dir, name, num_examples):
    builder = tfds.builder(name, data_dir=str(data_dir))
    os.makedirs(builder.data_dir, exist_ok=True)
    splits = [
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=[num_examples],
            num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=builder.data_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", dataset_name=name
            ),
        )
        for split in ("train", "test")
    ]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    builder.info.write_to_directory(builder.data_dir)


@pytest.mark.parametrize("name,classes", [("cifar100", 100)])
def test_mocked_cifar(mesh, tmp_path, name, classes):
    _write_metadata(tmp_path, name, 24)
    cfg = make_config(
        dataset=name,
        data_dir=str(tmp_path),
        download=False,
        image_size=32,
        batch_size=8,
        **{"aug.randaugment_layers": 1, "aug.color_jitter": 0.4},
    )
    with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
        info = data.get_dataset_info(cfg)
        assert (info.num_classes, info.num_train_examples, info.channels) == (classes, 24, 3)
        assert info.mean == pytest.approx((0.5071, 0.4865, 0.4409))
        b = jax.device_get(next(data.create_train_iterator(cfg, mesh)))
        assert b["image"].shape == (8, 32, 32, 3) and np.all(np.isfinite(b["image"]))
        assert b["label"].max() < classes
        mask = np.concatenate([jax.device_get(e["mask"]) for e in data.create_eval_iterator(cfg, mesh)])
        assert mask.sum() == 24


def test_batch_size_must_divide(mesh, fmnist):
    with pytest.raises(ValueError, match="batch_size=12"):
        data.create_train_iterator(make_config(**fmnist, batch_size=12), mesh)
