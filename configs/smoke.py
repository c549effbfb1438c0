"""A tiny run for tests and smoke checks: ``cvt_tiny``, a few steps, small batches.

The dataset is CIFAR-100 by default, meant to be faked with
``tfds.testing.mock_data`` in tests; ``:dataset=fashion_mnist`` reads the real
Fashion-MNIST copy in ``../shared/tfds`` instead (offline).

    python main.py --config=configs/smoke.py:dataset=fashion_mnist --workdir=/tmp/cvt_smoke
    python main.py --config=configs/smoke.py:dataset=fashion_mnist --workdir=/tmp/cvt_smoke_eval \
        --config.eval_only=True --config.init_from=/tmp/cvt_smoke
"""

import ml_collections

from configs import config_args
from configs import default as default_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Smoke config; ``arg``: ``dataset=cifar100|fashion_mnist``, ``steps=N``."""
    args = config_args.parse(
        arg, {"dataset": "cifar100", "steps": 4}, choices={"dataset": ("cifar100", "fashion_mnist")}
    )
    config = default_lib.get_config()

    # Tiny model in float32 (CPU).
    config.model = "cvt_tiny"
    config.dtype = "float32"
    config.drop_path_rate = 0.1

    config.dataset = args["dataset"]
    if args["dataset"] == "fashion_mnist":
        # Real data from ../shared/tfds (absolute path), grayscale at 28x28.
        config.data_dir = config_args.shared_path("tfds")
        config.download = config.data_dir is None
        config.image_size = 28
        config.num_channels = 1
    else:
        # Mocked in tests (tfds.testing.mock_data); 32x32 RGB.
        config.download = False
        config.image_size = 32
        config.num_channels = 3
    # Small splits: a few batches; an eval split that is not a multiple of the
    # eval batch (exercises padding and masking).
    config.train_split = "train[:256]"
    config.eval_split = "test[:40]"
    config.input.cache = False
    config.input.shuffle_buffer = 256
    config.input.prefetch = 1
    # Exercise every augmentation path cheaply: crop, flip, erasing, mixup/cutmix
    # (RandAugment off: slow to trace in tf.data on CPU).
    config.aug.crop = "pad_crop"
    config.aug.randaugment_layers = 0
    config.aug.random_erasing = 0.25
    config.aug.mixup_alpha = 0.8
    config.aug.cutmix_alpha = 1.0

    config.batch_size = 16
    # eval_batch_size follows batch_size (x2 = 32): 40 eval examples -> 2 batches, the second padded.
    config.num_epochs = 1.0
    config.num_train_steps = args["steps"]
    config.optimizer = "adamw"
    config.learning_rate = 1e-3
    config.lr_base_batch_size = 0
    config.warmup_epochs = 0.0
    config.weight_decay = 0.05
    config.grad_clip_norm = 1.0
    config.label_smoothing = 0.1

    config.log_every_steps = 2
    config.eval_every_steps = args["steps"]
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 2
    return config
