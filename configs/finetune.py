"""Fine-tuning a pretrained CvT on a smaller dataset (transfer learning).

Needs ``--config.init_from``: a cvt-flax workdir (or ``<workdir>/model``) or a
directory written by ``python -m cvt_flax.convert`` (official microsoft/CvT or
HuggingFace weights). The classifier head is replaced by a new one for the
dataset's classes; every other weight must match the chosen ``variant``.

Options (``:key=value,...``):

* ``dataset``: cifar10, cifar100, oxford_iiit_pet, oxford_flowers102,
  cats_vs_dogs, food101, fashion_mnist, image_folder (default cifar10).
* ``variant``: the pretrained architecture (default ``cvt_13``).
* ``res``: input resolution (default 224; CvT has no position embedding, so any
  size the strides allow works, e.g. 384 or 160).
* ``opt``: ``sgd`` (momentum 0.9, lr 0.01 at batch 512; default) or ``adamw``
  (lr 1e-4 at batch 512, weight decay 0.05).
* ``act``: ``quick_gelu`` (official weights, default) or ``gelu`` (HuggingFace
  weights; a warning says which the checkpoint used).
* ``data_dir``: TFDS data dir, or the root of an image folder
  (``<data_dir>/train/<class>/*.jpg`` and ``<data_dir>/test/<class>/*.jpg``).
* ``epochs``: training epochs (default: per dataset, below).

    python -m cvt_flax.convert --input CvT-13-224x224-IN-1k.pth --output /tmp/cvt13
    python main.py --config=configs/finetune.py:dataset=oxford_iiit_pet --workdir=/tmp/ft_pets \
        --config.init_from=/tmp/cvt13
    python main.py --config=configs/finetune.py:dataset=image_folder,data_dir=../shared/data/digits,res=64 \
        --workdir=/tmp/ft_digits --config.init_from=/tmp/cvt13

Recipe: a short cosine schedule with a 10% warmup, label smoothing 0.1,
stochastic depth 0.1, no mixup/cutmix/RandAugment/erasing, gradient clipping
1.0, no weight decay with SGD (the usual fine-tuning choice). Every parameter
trains; ``--config.freeze`` (regular expressions of variables to keep, e.g.
``'params/stage[01]/.*,batch_stats/stage[01]/.*'``) and ``--config.layer_decay``
(e.g. 0.75) change that (configs/default.py, cvt_flax/param_groups.py).
"""

import ml_collections

from configs import config_args
from configs import default as default_lib

# dataset: (train split, eval split, epochs, low resolution source images)
DATASETS = {
    "cifar10": ("train", "test", 10, True),
    "cifar100": ("train", "test", 10, True),
    "oxford_iiit_pet": ("train", "test", 30, False),
    "oxford_flowers102": ("train+validation", "test", 50, False),
    "cats_vs_dogs": ("train[:90%]", "train[90%:]", 5, False),
    "food101": ("train", "validation", 10, False),
    "fashion_mnist": ("train", "test", 5, True),
    "image_folder": ("train", "test", 20, False),
}
OPTIMIZERS = ("sgd", "adamw")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Fine-tuning config; ``arg`` is e.g. ``dataset=oxford_iiit_pet,res=384,opt=adamw``."""
    args = config_args.parse(
        arg,
        {"dataset": "cifar10", "variant": "cvt_13", "res": 224, "opt": "sgd", "act": "quick_gelu", "data_dir": "",
         "epochs": -1.0},
        choices={"dataset": tuple(DATASETS), "opt": OPTIMIZERS, "act": ("quick_gelu", "gelu", "gelu_tanh")},
    )  # fmt: skip
    train_split, eval_split, epochs, low_res = DATASETS[args["dataset"]]
    res = args["res"]
    config = default_lib.get_config()

    # ------------------------------------------------------------ model
    # The pretrained architecture; its head is replaced for the new classes.
    # default.py's stochastic depth 0.1 in the last stage; no dropout (as pretraining).
    config.model = args["variant"]
    config.act = args["act"]
    # Refuse to train from scratch: init_from (or a checkpoint to resume) is required.
    config.require_init_from = True
    # A new task: a fresh classifier head even when the classes are as many as the source's.
    config.new_head = True

    # ------------------------------------------------------------ data
    # Pretrained models take RGB (default.py's 3 channels): grayscale datasets are tiled.
    config.dataset = args["dataset"]
    config.train_split = train_split
    config.eval_split = eval_split
    if args["data_dir"]:
        # TFDS data dir, or the image-folder root.
        config.data_dir = args["data_dir"]
    config.image_size = res
    config.input.cache = low_res  # Small low-resolution datasets fit in memory.
    config.input.shuffle_buffer = 16_384
    if low_res:
        # Upsampled small images: default.py's pad-and-crop (padding 1/8 of the side)
        # + flip, plain resize for eval.
        config.aug.crop_padding = max(1, res // 8)
    else:
        # Natural images: a mild random-resized crop + flip, center crop 0.875 for eval.
        config.aug.crop = "random_resized_crop"
        config.aug.crop_min_scale = 0.25
        config.aug.eval_crop = "center_crop"
    # No RandAugment, random erasing or mixing (nor colour jitter, as default.py).
    config.aug.randaugment_layers = 0
    config.aug.random_erasing = 0.0
    config.aug.mixup_alpha = 0.0
    config.aug.cutmix_alpha = 0.0

    # ------------------------------------------------------------ optimisation
    # Batch 512, gradient clipping 1.0, label smoothing 0.1, no EMA: default.py's.
    config.num_epochs = float(args["epochs"] if args["epochs"] > 0 else epochs)
    # 10% of the run warms up (follows --config.num_epochs overrides).
    config.warmup_epochs = config.get_ref("num_epochs") * 0.1
    config.warmup_init_lr = 0.0
    config.min_learning_rate = 0.0
    # learning_rate is given for a batch of 512 and scaled linearly with batch_size.
    config.lr_base_batch_size = 512
    config.optimizer = args["opt"]
    if args["opt"] == "sgd":
        # Momentum 0.9 (default.py's), without Nesterov and without weight decay.
        config.learning_rate = 0.01
        config.nesterov = False
        config.weight_decay = 0.0
    else:
        # AdamW with default.py's weight decay 0.05.
        config.learning_rate = 1e-4

    # ------------------------------------------------------------ run
    # Evaluation and checkpoints once per epoch (default.py's).
    config.log_every_steps = 20
    config.keep_checkpoints = 2
    return config
