"""A tiny run for tests and smoke checks: ``cvt_tiny``, a few steps, small batches.

The dataset is CIFAR-100 by default, meant to be faked with
``tfds.testing.mock_data`` in tests; ``:dataset=fashion_mnist`` reads the real
Fashion-MNIST copy in ``../shared/tfds`` instead (offline; see
``configs/offline_data.py``).

    python main.py --config=configs/smoke.py:dataset=fashion_mnist --workdir=/tmp/cvt_smoke
    python main.py --config=configs/smoke.py:dataset=fashion_mnist --workdir=/tmp/cvt_smoke_eval \
        --config.eval_only=True --config.init_from=/tmp/cvt_smoke
"""

import ml_collections

from configs import config_args, offline_data
from configs import default as default_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Smoke config; ``arg``: ``dataset=cifar100|fashion_mnist``, ``steps=N``."""
    args = config_args.parse(
        arg, {"dataset": "cifar100", "steps": 4}, choices={"dataset": ("cifar100", "fashion_mnist")}
    )
    config = default_lib.get_config()

    # Tiny model in float32 (CPU); default.py's stochastic depth 0.1.
    config.model = "cvt_tiny"
    config.dtype = "float32"

    config.dataset = args["dataset"]
    if args["dataset"] == "fashion_mnist":
        # Real data from ../shared/tfds (absolute path, see offline_data.py), grayscale at 28x28.
        config.data_dir = offline_data.tfds_data_dir("tfdata")
        config.download = config.data_dir is None
        config.image_size = 28
        config.num_channels = 1
    else:
        # Mocked in tests (tfds.testing.mock_data); default.py's 32x32 RGB.
        config.download = False
    # Small splits: a few batches; an eval split that is not a multiple of the
    # eval batch (exercises padding and masking).
    config.train_split = "train[:256]"
    config.eval_split = "test[:40]"
    config.input.cache = False
    config.input.shuffle_buffer = 256
    config.input.prefetch = 1
    # Exercise every augmentation path cheaply: default.py's pad-crop, flip,
    # erasing and mixup/cutmix (RandAugment off: slow to trace in tf.data on CPU).
    config.aug.randaugment_layers = 0

    config.batch_size = 16
    # eval_batch_size follows batch_size (x2 = 32): 40 eval examples -> 2 batches, the second padded.
    config.num_epochs = 1.0
    config.num_train_steps = args["steps"]
    # default.py's AdamW at 1e-3 (no scaling), without warmup.
    config.warmup_epochs = 0.0

    config.log_every_steps = 2
    config.eval_every_steps = args["steps"]
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 2
    return config
