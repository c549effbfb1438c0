"""Default configuration: every field of a cvt-flax run, documented.

Task configs (``configs/cifar100.py``, ``configs/imagenet.py``, ...) import this
file and override what differs. Any field can be overridden on the command line:

    python main.py --config=configs/default.py --workdir=/tmp/cvt_default \
        --config.batch_size=256 --config.num_epochs=10

Fields that are derived from others (``eval_batch_size`` follows
``batch_size``) are ml_collections references, so an override of the source
also moves the derived value.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration (CvT-13-32 on CIFAR-100, our recipe)."""
    config = ml_collections.ConfigDict()

    # ---------------------------------------------------------------- model
    # Registered variant name (see `cvt_flax.models.list_models()`).
    config.model = "cvt_13_32"
    # MLP activation: 'quick_gelu' (official microsoft/CvT) or 'gelu' (HF port).
    config.act = "quick_gelu"
    # Initialisation of the blocks' Linear layers: 'trunc_norm' (std 0.02, the
    # official default) or 'xavier' (uniform; the official code's other option).
    config.init_method = "trunc_norm"
    # Stochastic depth of the last stage (official rule: rates grow linearly from
    # 0 to this over the stage's blocks; earlier stages 0). Negative: variant's.
    config.drop_path_rate = 0.1
    # Dropout rate in every stage (MLP, attention output, embedding). Negative:
    # the variant's (0 in all official variants).
    config.dropout_rate = -1.0
    # Attention-probability dropout in every stage. Negative: the variant's.
    config.attn_dropout_rate = -1.0
    # Compute dtype: 'bfloat16' (accelerators) or 'float32'. Params stay float32.
    config.dtype = "bfloat16"
    # Attention kernel: 'explicit' (einsum), 'xla' or 'cudnn' (flash, GPU only).
    config.attention_impl = "explicit"
    # Depthwise conv of the q/k/v projections: 'conv' (grouped convolution, for
    # GPU/TPU), 'shift' (sum of shifted slices: same result, ~2x faster training
    # on CPU), 'auto' ('shift' on CPU devices, else 'conv'; decided by the mesh's devices, not the host).
    config.depthwise_impl = "auto"
    # Random numbers of dropout, stochastic depth and mixup inside the train step: 'auto' (threefry, lowered to
    # one GPU kernel per call on GPU meshes: the same numbers, far less to compile), 'threefry' (plain XLA
    # arithmetic everywhere), 'rbg' or 'unsafe_rbg' (XLA's RngBitGenerator: other numbers, cheapest to compile).
    # The initialisation always uses threefry (identical parameters on every platform).
    config.rng_impl = "auto"
    # Rematerialise blocks in the backward pass (less memory, ~30% more compute).
    config.remat = False
    # Each stage's blocks as one lax.scan (same parameters and names; compiled once per stage, not per block):
    # 'auto' (on for GPU/TPU meshes, off on CPU, where it is no faster to compile), 'true' or 'false'.
    config.scan_blocks = "auto"

    # ---------------------------------------------------------------- data
    # TFDS dataset name (e.g. 'cifar100', 'fashion_mnist', 'oxford_iiit_pet'),
    # or 'image_folder' for a `tfds.ImageFolder` tree <data_dir>/<split>/<label>/*.
    config.dataset = "cifar100"
    # TFDS data_dir (where prepared datasets live), or the image-folder root.
    # None: TFDS's default (~/tensorflow_datasets). A typed placeholder (str or
    # None), so that --config.data_dir=PATH works on the command line.
    config.data_dir = ml_collections.config_dict.placeholder(str)
    # Let TFDS download and prepare the dataset when it is not in data_dir.
    config.download = True
    # Splits (TFDS split syntax, e.g. 'train[:90%]').
    config.train_split = "train"
    config.eval_split = "test"
    # Few-shot training: this many images of each class from the train split of an
    # image folder (0: the whole split), drawn with train_subset_seed; the images not drawn form the
    # split "<train_split>_rest" (e.g. eval_split="train_rest": tune without the test split).
    config.train_examples_per_class = 0
    config.train_subset_seed = 0
    # Side length of the (square) model input; images are resized/cropped to it.
    config.image_size = 32
    # Channels fed to the model: 3 (grayscale images are tiled) or 1 (RGB images
    # are converted to luminance). 0: the dataset's own channel count.
    config.num_channels = 3

    # Input pipeline settings (config.input.*).
    config.input = ml_collections.ConfigDict()
    # 'tfdata': TFDS + tf.data on the host (needs TensorFlow); 'device': the whole
    # dataset read once through `tfds.data_source` (no TensorFlow), kept in
    # accelerator memory and augmented there (small datasets only).
    config.input.pipeline = "tfdata"
    # Cache decoded examples in memory (tf.data); for datasets that fit.
    config.input.cache = True
    # Shuffle buffer (examples) for tf.data; shuffling happens before repeat.
    config.input.shuffle_buffer = 50_000
    # Batches prefetched to the devices.
    config.input.prefetch = 2
    # Per-channel normalisation; 'auto' picks the dataset's own statistics where
    # known (CIFAR, Fashion-MNIST), ImageNet's otherwise.
    config.input.normalization = "auto"

    # ---------------------------------------------------------------- augmentation
    # Train/eval preprocessing and augmentation settings (config.aug.*).
    config.aug = ml_collections.ConfigDict()
    # Train crop: 'pad_crop' (pad then random crop; CIFAR style),
    # 'random_resized_crop' (Inception style; ImageNet), 'resize' (no crop).
    config.aug.crop = "pad_crop"
    # Padding (pixels at image_size) for 'pad_crop'.
    config.aug.crop_padding = 4
    # Smallest area fraction for 'random_resized_crop'.
    config.aug.crop_min_scale = 0.08
    # Random horizontal flip.
    config.aug.hflip = True
    # RandAugment: number of ops per image (0 disables) and magnitude (0-10).
    config.aug.randaugment_layers = 2
    config.aug.randaugment_magnitude = 9
    # Colour jitter strength (0 disables; official ImageNet 0.4 when no RandAugment).
    config.aug.color_jitter = 0.0
    # Random-erasing probability (per image; pixel mode as timm).
    config.aug.random_erasing = 0.25
    # Mixup / CutMix (on device, in the train step). alpha 0 disables each; a batch
    # is mixed with probability `mix_prob`, and with both on, CutMix is picked with
    # probability `cutmix_switch_prob` (Mixup otherwise).
    config.aug.mixup_alpha = 0.8
    config.aug.cutmix_alpha = 1.0
    config.aug.mix_prob = 1.0
    config.aug.cutmix_switch_prob = 0.5
    # Eval preprocessing: 'resize' to image_size, or 'center_crop' with the
    # ratio below (ImageNet style: resize to image_size / ratio, crop).
    config.aug.eval_crop = "resize"
    config.aug.eval_crop_ratio = 0.875

    # ---------------------------------------------------------------- optimisation
    # Global batch size (over all devices and hosts).
    config.batch_size = 512
    # Eval batch size (global); follows batch_size unless overridden.
    config.eval_batch_size = config.get_ref("batch_size") * 2
    # Training length in epochs (fractions allowed, hence a float); `num_train_steps`
    # > 0 overrides it. Steps per epoch are derived at run time from the train
    # split's size and batch_size (full batches).
    config.num_epochs = 300.0
    config.num_train_steps = -1
    # 'adamw' or 'sgd' (momentum, nesterov).
    config.optimizer = "adamw"
    # Peak learning rate (absolute, for the global batch size above).
    config.learning_rate = 1e-3
    # Scale learning_rate by batch_size / lr_base_batch_size (0: no scaling).
    config.lr_base_batch_size = 0
    # Linear warmup from `warmup_init_lr` to the peak, then cosine to `min_learning_rate`.
    config.warmup_epochs = 5.0
    config.warmup_init_lr = 1e-6
    config.min_learning_rate = 1e-5
    # Weight decay (decoupled for AdamW); not applied to biases, norms, cls tokens.
    config.weight_decay = 0.05
    # AdamW betas / epsilon; SGD momentum and Nesterov (on/off).
    config.b1 = 0.9
    config.b2 = 0.999
    config.eps = 1e-8
    config.momentum = 0.9
    config.nesterov = True
    # Clip gradients to this global norm (0 disables).
    config.grad_clip_norm = 1.0
    # Log the gradients' global norm: 'auto' (when clipping, which computes it anyway; otherwise it costs ~15% of
    # the train step's GPU compile time), 'true' or 'false'.
    config.log_grad_norm = "auto"
    # Label smoothing of the cross-entropy (applied before mixup).
    config.label_smoothing = 0.1
    # Exponential moving average of the parameters (0 disables); evaluated when on.
    config.ema_decay = 0.0
    # Fine-tuning controls (cvt_flax/param_groups.py). freeze: comma-separated regular
    # expressions of variable names kept fixed (full match, names as init_from_skip's; commas
    # inside brackets, as in {1,2}, belong to the expression;
    # e.g. 'params/stage[01]/.*,batch_stats/stage[01]/.*'; a linear probe:
    # 'params/(?!head/).*,batch_stats/.*'). layer_decay: layer-wise learning-rate decay,
    # each layer below the head gets layer_decay times its upper neighbour's rate (0: off).
    config.freeze = ""
    config.layer_decay = 0.0

    # ---------------------------------------------------------------- run
    # Seed of initialisation, data order, augmentation and dropout.
    config.seed = 0
    # Log train metrics every this many steps.
    config.log_every_steps = 100
    # Evaluate every this many steps (<= 0: once per epoch) and at the end.
    config.eval_every_steps = -1
    # Save a checkpoint every this many steps (<= 0: once per epoch) and at the end.
    config.checkpoint_every_steps = -1
    # Checkpoints to keep (the best by eval accuracy is kept as well).
    config.keep_checkpoints = 3
    # Initialise from this checkpoint when the workdir has none: a cvt-flax
    # workdir or checkpoint directory, or the output of `python -m cvt_flax.convert`.
    config.init_from = ""
    # With init_from: a new, freshly initialised classifier head even when the
    # pretrained one has as many classes (a new task); otherwise only when the
    # class count differs.
    config.new_head = False
    # With init_from: comma-separated regular expressions of variable names that
    # keep their fresh initialisation (full match, e.g. 'params/stage2/.*,batch_stats/stage2/.*'
    # re-initialises the last stage), as big_vision's dont_load.
    config.init_from_skip = ""
    # Fine-tuning configs set this: fail (instead of training from scratch) when
    # init_from is empty and the workdir has no checkpoint to resume.
    config.require_init_from = False
    # Restore only evaluate: report test metrics of the latest checkpoint and stop.
    config.eval_only = False
    # Profile a few steps into the workdir (TensorBoard profile plugin).
    config.profile = False
    # Stop after this many seconds of training (0: no limit; for smoke runs).
    config.max_train_seconds = 0.0
    # JAX's persistent compilation cache, so that a repeated or resumed run skips compilation: 'auto'
    # ($JAX_COMPILATION_CACHE_DIR, else ~/.cache/cvt_flax/jax), a folder or gs:// URL, or '' (off).
    config.compilation_cache_dir = "auto"
    # Resuming a workdir with another training recipe (epochs, batch size, learning
    # rate, schedule, augmentation, ...) than its saved config.json needs this switch;
    # model/data changes never resume (README, "Resuming a run").
    config.allow_recipe_change = False

    return config
