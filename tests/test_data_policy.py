"""The backend-free augmentation policy (cvt_flax.data.policy) and that both pipelines execute it.

The policy fixes the settings, the shared constants and the order of the train steps; both pipelines must run
exactly the steps it lists, in its order, with their own kernels. The pipeline checks record the kernels each
pipeline's augmentation calls (JAX: while tracing the device pipeline's batch function; TensorFlow: eagerly on
one example) and compare them with the policy's plan, including a probe step added to the policy.
"""

import dataclasses
import inspect

import jax
import numpy as np
import pytest

from cvt_flax.data import augment_jax, device, policy

FULL = {"crop": "pad_crop", "hflip": True, "randaugment_layers": 2, "color_jitter": 0.4, "random_erasing": 0.5}


def make_config(**aug):
    from configs import default

    cfg = default.get_config()
    cfg.image_size = 16
    for key, value in aug.items():
        cfg.aug[key] = value
    return cfg


def settings(**aug) -> policy.TrainAugSettings:
    return policy.TrainAugSettings.from_config(make_config(**aug), mean=(0.5,) * 3, std=(0.25,) * 3)


class FakeOps:
    """Kernels of no backend: streams are their indices, every kernel records (name, stream) and passes through."""

    def __init__(self):
        self.calls = []

    def split(self, rng, num):
        return list(range(num))

    def __getattr__(self, name):
        def kernel(*args, **kwargs):
            rng = args[0] if name not in ("resize", "normalize") else None
            self.calls.append((name, rng))
            return "image"

        return kernel


class Recorder:
    """Wraps a backend's KERNELS and records the names of the kernels called (``split`` left out)."""

    def __init__(self, inner, extra=None):
        self.inner, self.extra, self.calls = inner, extra or {}, []

    def __getattr__(self, name):
        fn = self.extra[name] if name in self.extra else getattr(self.inner, name)

        def wrapped(*args, **kwargs):
            if name != "split":
                self.calls.append(name)
            return fn(*args, **kwargs)

        return wrapped


def plan(s):
    """The kernels the policy calls for settings ``s`` (a run with FakeOps)."""
    ops = FakeOps()
    policy.apply_train_policy(s, ops, "image", "rng")
    return [name for name, _ in ops.calls]


# ----------------------------------------------------------------------------- settings


def test_settings_from_the_default_config():
    s = settings()
    assert (s.image_size, s.crop, s.crop_padding, s.hflip, s.randaugment_layers) == (16, "pad_crop", 4, True, 2)
    assert (s.randaugment_magnitude, s.color_jitter, s.random_erasing, s.mean) == (9.0, 0.0, 0.25, (0.5,) * 3)
    assert hash(s) == hash(settings())  # hashable: a static argument of jax.jit
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.crop = "resize"


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("crop", "center", r"config.aug.crop='center'.*'pad_crop', 'random_resized_crop' or 'resize'"),
        ("crop_padding", -1, r"config.aug.crop_padding=-1 .*--config.aug.crop_padding"),
        ("crop_min_scale", 0.0, r"config.aug.crop_min_scale=0.0 .*\(0, 1\]"),
        ("randaugment_layers", -2, r"config.aug.randaugment_layers=-2"),
        ("randaugment_magnitude", 12, r"config.aug.randaugment_magnitude=12.0 .*\[0, 10\]"),
        ("color_jitter", -0.1, r"config.aug.color_jitter=-0.1"),
        ("random_erasing", 1.5, r"config.aug.random_erasing=1.5 .*probability"),
    ],
)
def test_bad_settings_name_the_field_and_the_fix(field, value, match):
    with pytest.raises(ValueError, match=match):
        settings(**{field: value})


def test_eval_settings():
    s = policy.EvalSettings.from_config(make_config(eval_crop="center_crop", eval_crop_ratio=0.875))
    assert (s.image_size, s.crop, s.crop_ratio) == (16, "center_crop", 0.875)
    with pytest.raises(ValueError, match="eval_crop='middle'.*'resize' or 'center_crop'"):
        policy.EvalSettings.from_config(make_config(eval_crop="middle"))
    with pytest.raises(ValueError, match="eval_crop_ratio"):
        policy.EvalSettings.from_config(make_config(eval_crop_ratio=1.5))


def test_the_task_configs_give_valid_settings():
    import importlib

    for name in ("default", "cifar100", "imagenet", "fashion_mnist", "finetune", "smoke"):
        cfg = importlib.import_module(f"configs.{name}").get_config()
        policy.TrainAugSettings.from_config(cfg, mean=(0.5,), std=(0.5,))
        policy.EvalSettings.from_config(cfg)


# ----------------------------------------------------------------------------- step order and streams


def test_step_order_and_streams():
    assert [step.name for step in policy.TRAIN_STEPS] == [
        "crop",
        "flip",
        "randaugment",
        "color_jitter",
        "normalize",
        "random_erasing",
    ]
    ops = FakeOps()
    policy.apply_train_policy(settings(**FULL), ops, "image", "rng")
    # The stream of each step is fixed: batches of a seed depend on it.
    assert ops.calls == [
        ("pad_crop", 0),
        ("random_flip", 1),
        ("randaugment", 2),
        ("color_jitter", 3),
        ("normalize", None),
        ("random_erasing", 4),
    ]
    streams = [s.stream for s in policy.TRAIN_STEPS if s.stream is not None]
    assert len(set(streams)) == len(streams) and max(streams) < policy.NUM_STREAMS


def test_disabled_steps_are_skipped_and_crops_dispatch():
    off = {"hflip": False, "randaugment_layers": 0, "color_jitter": 0.0, "random_erasing": 0.0}
    assert plan(settings(crop="resize", **off)) == ["resize", "normalize"]
    assert plan(settings(crop="random_resized_crop", **off)) == ["random_resized_crop", "normalize"]
    assert plan(settings(**{**FULL, "color_jitter": 0.0})) == [
        "pad_crop",
        "random_flip",
        "randaugment",
        "normalize",
        "random_erasing",
    ]


def test_both_backends_provide_every_kernel():
    aug_tf = pytest.importorskip("cvt_flax.data.augment_tf")
    names = [n for n, _ in inspect.getmembers(policy.Kernels, inspect.isfunction) if not n.startswith("_")]
    assert {"split", "pad_crop", "random_resized_crop", "resize", "normalize", "random_erasing"} <= set(names)
    for kernels in (augment_jax.KERNELS, aug_tf.KERNELS):
        for name in names:
            ours = inspect.signature(getattr(kernels, name))
            want = list(inspect.signature(getattr(policy.Kernels, name)).parameters)[1:]  # without self
            assert list(ours.parameters) == want, (type(kernels).__module__, name)


# ----------------------------------------------------------------------------- both pipelines run the policy


def _probe_step(monkeypatch):
    """Adds a step to the policy (stream 5, the free one): a pipeline that runs the policy runs it too."""
    probe = policy.TrainStep("probe", 5, lambda s: True, lambda s, ops, x, rng: ops.probe(rng, x))
    monkeypatch.setattr(policy, "TRAIN_STEPS", (*policy.TRAIN_STEPS, probe))


def _device_calls(monkeypatch, s):
    recorder = Recorder(augment_jax.KERNELS, {"probe": lambda rng, x: x})
    monkeypatch.setattr(augment_jax, "KERNELS", recorder)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    n = len(jax.devices())
    images = jax.ShapeDtypeStruct((4, 20, 20, 1), np.uint8)
    labels = jax.ShapeDtypeStruct((4,), np.int32)

    def batch(images, labels):  # a fresh function: traced now, whatever jax.jit has cached
        return device.train_batch(
            images,
            labels,
            np.uint32(0),
            np.int32(0),
            np.int32(0),
            settings=s,
            channels=3,
            batch=n,
            shuffle=True,
            sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
        )

    out = jax.eval_shape(batch, images, labels)
    assert out["image"].shape == (n, 16, 16, 3)
    return recorder.calls


def _tfdata_calls(monkeypatch, s):
    tf = pytest.importorskip("tensorflow")
    from cvt_flax.data import augment_tf, tfdata

    recorder = Recorder(augment_tf.KERNELS, {"probe": lambda rng, x: x})
    monkeypatch.setattr(augment_tf, "KERNELS", recorder)
    fn = tfdata._train_augment_fn(s, 7, reader=None, decode=False)
    image = tf.constant(np.random.RandomState(0).randint(0, 256, (20, 20, 3)).astype(np.uint8))
    out = fn(tf.constant(3, tf.int64), {"image": image, "label": tf.constant(1, tf.int32)})
    assert tuple(out["image"].shape) == (16, 16, 3)
    return recorder.calls


@pytest.mark.parametrize("pipeline", ["device", "tfdata"])
@pytest.mark.parametrize(
    "aug",
    [FULL, {"crop": "random_resized_crop", "hflip": False, "randaugment_layers": 0, "random_erasing": 0.0}],
)
def test_each_pipeline_runs_exactly_the_policy(monkeypatch, pipeline, aug):
    s = settings(**aug)
    calls = {"device": _device_calls, "tfdata": _tfdata_calls}[pipeline]
    assert calls(monkeypatch, s) == plan(s)
    _probe_step(monkeypatch)
    probed = calls(monkeypatch, s)
    assert probed == plan(s) and probed[-1] == "probe"
