"""Dataset registry, errors, split arithmetic and normalisation (cvt_flax.data.info); no TensorFlow needed."""

import ml_collections
import pytest

from cvt_flax import data, sharding
from cvt_flax.data import info as info_lib


def make_config(**overrides):
    from configs import default

    cfg = default.get_config()
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def test_fashion_mnist_info(shared_dir):
    cfg = make_config(
        dataset="fashion_mnist",
        data_dir=str(shared_dir / "tfds"),
        download=False,
        train_split="train[:90%]",
        eval_split="test[:37]",
    )
    info = data.get_dataset_info(cfg)
    assert isinstance(info, data.DatasetInfo)
    assert (info.name, info.num_classes, info.num_train_examples, info.num_eval_examples) == (
        "fashion_mnist",
        10,
        54_000,
        37,
    )
    assert info.channels == 3 and info.source_channels == 1  # num_channels=3 tiles grey
    assert info.class_names[0] == "T-shirt/top"
    assert info.mean == pytest.approx((0.2860,) * 3)
    cfg.num_channels = 0
    assert data.get_dataset_info(cfg).channels == 1
    cfg.num_channels = 1
    assert data.get_dataset_info(cfg).channels == 1


def test_image_folder_info(shared_dir):
    cfg = make_config(dataset="image_folder", data_dir=str(shared_dir / "data" / "digits"), num_channels=0)
    info = data.get_dataset_info(cfg)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (10, 1438, 359)
    assert info.class_names == [str(i) for i in range(10)]
    assert info.source_channels == 1 and info.channels == 1
    assert info.mean == pytest.approx((sum(i * w for i, w in zip(info_lib.IMAGENET_MEAN, info_lib.LUMA, strict=True)),))


def test_image_folder_order_matches_tfds(shared_dir):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow")
    root = str(shared_dir / "data" / "digits")
    ours = info_lib.open_source(make_config(dataset="image_folder", data_dir=root))
    builder = tfds.folder_dataset.ImageFolder(root)
    theirs = [(e.image_path, builder.info.features["label"].str2int(e.label)) for e in builder._split_examples["test"]]
    assert ours.files["test"] == theirs


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="image_folder") as e:
        data.get_dataset_info(make_config(dataset="no_such_dataset_xyz"))
    assert "cifar100" in str(e.value) and "fashion_mnist" in str(e.value)


def test_missing_image_folder():
    with pytest.raises(ValueError, match="data_dir"):
        data.get_dataset_info(make_config(dataset="image_folder", data_dir="/nonexistent/dir"))


def test_not_prepared_says_how_to_prepare(tmp_path):
    cfg = make_config(dataset="cifar100", data_dir=str(tmp_path), download=False)
    with pytest.raises(ValueError) as e:
        data.get_dataset_info(cfg)
    msg = str(e.value)
    assert "tfds build cifar100" in msg and "--config.data_dir" in msg and str(tmp_path) in msg
    cfg.input.pipeline = "device"
    with pytest.raises(ValueError, match="array_record"):
        data.get_dataset_info(cfg)


def test_manual_dataset_instructions(tmp_path):
    for download in (False, True):  # never starts a download: manual datasets fail before
        cfg = make_config(dataset="imagenet2012", data_dir=str(tmp_path), download=download)
        with pytest.raises(ValueError, match="manual") as e:
            data.get_dataset_info(cfg)
        assert "ILSVRC2012_img_train.tar" in str(e.value)


def test_device_pipeline_rejects_tfrecord(shared_dir):
    cfg = make_config(dataset="fashion_mnist", data_dir=str(shared_dir / "tfds"), download=False)
    cfg.input.pipeline = "device"
    with pytest.raises(ValueError, match="array_record"):
        data.get_dataset_info(cfg)


def test_bad_split(shared_dir):
    cfg = make_config(dataset="fashion_mnist", data_dir=str(shared_dir / "tfds"), download=False, eval_split="valid")
    with pytest.raises(ValueError, match="train_split|eval_split"):
        data.get_dataset_info(cfg)


def test_process_ranges_partition():
    ranges = [("train", 10, 20), ("test", 0, 7)]
    for count in (1, 2, 3, 5):
        shares = [info_lib.process_ranges(ranges, p, count) for p in range(count)]
        flat = [(n, i) for share in shares for n, a, b in share for i in range(a, b)]
        assert flat == [(n, i) for n, a, b in ranges for i in range(a, b)]
        sizes = [sum(b - a for _, a, b in share) for share in shares]
        assert sizes == info_lib.share_sizes(17, count)
        assert max(sizes) - min(sizes) <= 1


def test_resolve_and_spec():
    src = info_lib.Source("x", None, {"train": 1000, "test": 37}, None, 2, (8, 8, 1))
    assert src.resolve("train[:90%]+test[5:]") == [("train", 0, 900), ("test", 5, 37)]
    assert src.num_examples("test[:37]") == 37
    assert info_lib.ranges_to_spec([("train", 0, 900), ("test", 5, 5)]) == "train[0:900]"
    with pytest.raises(ValueError, match="validation"):
        src.resolve("validation")


def test_normalization_modes():
    cfg = make_config()
    assert info_lib.normalization_stats(cfg, "cifar100", 3)[0] == pytest.approx((0.5071, 0.4865, 0.4409))
    assert info_lib.normalization_stats(cfg, "oxford_iiit_pet", 3)[0] == info_lib.IMAGENET_MEAN
    assert info_lib.normalization_stats(cfg, "mnist", 3)[1] == pytest.approx((0.3081,) * 3)
    cfg.input.normalization = "inception"
    assert info_lib.normalization_stats(cfg, "cifar100", 1) == ((0.5,), (0.5,))
    cfg.input.normalization = "bogus"
    with pytest.raises(ValueError, match="normalization"):
        info_lib.normalization_stats(cfg, "cifar100", 3)


def test_batch_size_checks():
    assert sharding.check_batch_size(64, "batch_size", 8, 2) == 32
    with pytest.raises(ValueError, match="batch_size=60"):
        sharding.check_batch_size(60, "batch_size", 8, 1)


def test_num_channels_validation():
    with pytest.raises(ValueError, match="num_channels"):
        info_lib.model_channels(ml_collections.ConfigDict({"num_channels": 2}), 3)


def test_few_shot_subset_of_an_image_folder(shared_dir):
    from configs import default

    def cfg(**kw):
        c = default.get_config()
        c.dataset, c.data_dir, c.train_split, c.eval_split = (
            "image_folder",
            str(shared_dir / "data" / "digits"),
            "train",
            "test",
        )
        for k, v in kw.items():
            c[k] = v
        return c

    full = info_lib.open_source(cfg())
    few = info_lib.open_source(cfg(train_examples_per_class=10))
    assert few.split_sizes["train"] == 100 and few.split_sizes["test"] == full.split_sizes["test"]
    labels = [label for _, label in few.files["train"]]
    assert sorted(labels) == sorted(list(range(10)) * 10)
    assert set(few.files["train"]) <= set(full.files["train"])
    # The images not drawn: a held-out split for tuning, disjoint from the subset, together the whole split.
    rest = few.files["train_rest"]
    assert not set(rest) & set(few.files["train"])
    assert sorted(rest + few.files["train"]) == sorted(full.files["train"])
    assert few.split_sizes["train_rest"] == full.split_sizes["train"] - 100
    again = info_lib.open_source(cfg(train_examples_per_class=10, learning_rate=0.5))  # other fields: same draw
    assert again.files["train"] == few.files["train"]
    other = info_lib.open_source(cfg(train_examples_per_class=10, train_subset_seed=1))
    assert set(other.files["train"]) != set(few.files["train"])
    assert data.get_dataset_info(cfg(train_examples_per_class=10)).num_train_examples == 100
    with pytest.raises(data.DatasetError, match="fewer images"):
        info_lib.open_source(cfg(train_examples_per_class=1000))
    with pytest.raises(data.DatasetError, match="image folder"):
        info_lib.open_source(
            ml_collections.ConfigDict({**default.get_config().to_dict(), "train_examples_per_class": 5})
        )
