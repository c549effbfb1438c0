"""Training building blocks: schedule, optimizer, train state, metrics and the jitted steps.

Everything here is a pure function of the config and the arrays passed in, so
that `cvt_flax.train` only has to run the loop. The steps are jitted over the
one-axis mesh of `cvt_flax.sharding` (batches split on ``'data'``, the state
replicated).
"""

# No `from __future__ import annotations`: clu's metric collections read their
# field annotations at run time.

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax.training import train_state
from jax.extend.core import jaxpr_as_fun
from jax.sharding import Mesh

from cvt_flax import models, param_groups
from cvt_flax.sharding import data_sharding, replicate, replicated_sharding

PyTree = Any


# ----------------------------------------------------------------------------- schedule


@dataclasses.dataclass(frozen=True)
class RunLength:
    """Step counts derived at run time from the dataset size and the batch size.

    Attributes:
      steps_per_epoch: Optimizer steps per pass over the train split (batches are
        full; the remainder of an epoch is not dropped from the data, the data
        stream just continues into the next epoch).
      total_steps: Steps of the whole run.
      warmup_steps: Linear warmup steps.
      eval_every_steps: Steps between evaluations.
      checkpoint_every_steps: Steps between checkpoints.
      log_every_steps: Steps between train-metric logs.
    """

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every_steps: int
    checkpoint_every_steps: int
    log_every_steps: int


def derive_run_length(config: ml_collections.ConfigDict, num_train_examples: int) -> RunLength:
    """Derives step counts from epochs, the train-split size and the global batch.

    Args:
      config: The run config (``batch_size``, ``num_epochs``, ``num_train_steps``,
        ``warmup_epochs``, ``eval_every_steps``, ``checkpoint_every_steps``,
        ``log_every_steps``).
      num_train_examples: Examples in ``config.train_split``.

    Returns:
      The derived `RunLength`.
    """
    if num_train_examples < config.batch_size:
        raise ValueError(
            f"The train split {config.train_split!r} has {num_train_examples} examples, fewer than one batch "
            f"(batch_size={config.batch_size}). Use a smaller --config.batch_size or a larger split."
        )
    steps_per_epoch = num_train_examples // config.batch_size
    if config.num_train_steps > 0:
        total = int(config.num_train_steps)
    else:
        total = int(round(config.num_epochs * steps_per_epoch))
    if total <= 0:
        raise ValueError(
            f"The run has no steps (num_epochs={config.num_epochs}, num_train_steps={config.num_train_steps}, "
            f"{steps_per_epoch} steps per epoch). Set --config.num_epochs or --config.num_train_steps > 0."
        )
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch
    ckpt_every = config.checkpoint_every_steps if config.checkpoint_every_steps > 0 else steps_per_epoch
    log_every = max(1, min(int(config.log_every_steps), total))
    return RunLength(steps_per_epoch, total, min(warmup, total), eval_every, ckpt_every, log_every)


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """``learning_rate``, scaled by ``batch_size / lr_base_batch_size`` when that is > 0."""
    lr = float(config.learning_rate)
    if config.lr_base_batch_size > 0:
        lr *= config.batch_size / config.lr_base_batch_size
    return lr


def create_learning_rate_schedule(config: ml_collections.ConfigDict, run: RunLength) -> optax.Schedule:
    """Linear warmup from ``warmup_init_lr`` to the peak, then cosine decay to ``min_learning_rate``.

    The cosine spans the steps after the warmup (``optax.warmup_cosine_decay_schedule``),
    is evaluated per step, and reaches ``min_learning_rate`` at the last step.
    """
    peak = peak_learning_rate(config)
    warmup = run.warmup_steps
    if warmup == 0:
        end = float(config.min_learning_rate)
        return optax.cosine_decay_schedule(peak, decay_steps=run.total_steps, alpha=end / peak if peak else 0.0)
    return optax.warmup_cosine_decay_schedule(
        init_value=float(config.warmup_init_lr),
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(run.total_steps, warmup + 1),
        end_value=float(config.min_learning_rate),
    )


# ----------------------------------------------------------------------------- optimizer

OPTIMIZERS = ("adamw", "sgd")


def weight_decay_mask(params: PyTree) -> PyTree:
    """True for parameters that get weight decay.

    As the official recipe (``WITHOUT_WD_LIST: ['bn', 'bias', 'ln']`` plus the model's
    ``no_weight_decay() = {'cls_token'}``): no decay on biases, LayerNorm and BatchNorm
    scales/biases (every parameter with at most one dimension) and class tokens.
    Conv kernels (depthwise ones included) and dense kernels decay.
    """

    def decays(path: tuple[Any, ...], x: Any) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return bool(np.ndim(x) > 1 and "cls_token" not in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule, depth: Sequence[int] | None = None
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) or SGD with momentum, with optional global-norm clipping.

    Weight decay skips biases, norms and class tokens (`weight_decay_mask`). For SGD
    the decay is added to the gradient before momentum, like ``torch.optim.SGD``.
    ``--config.layer_decay`` scales each layer's updates and ``--config.freeze`` leaves
    the matching parameters out of everything, clipping included (`cvt_flax.param_groups`).

    Args:
      config: The run config.
      schedule: Learning-rate schedule.
      depth: Blocks per stage of the model (``spec.depth``); needed with ``layer_decay``.

    Raises:
      ValueError: an unknown optimizer, a bad ``freeze`` pattern, or ``layer_decay`` without ``depth``.
    """
    name = config.optimizer.lower()
    if name == "adamw":
        tx = optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        )
    elif name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask),
            optax.sgd(schedule, momentum=config.momentum or None, nesterov=bool(config.nesterov)),
        )
    else:
        raise ValueError(f"Unknown optimizer {config.optimizer!r}; set --config.optimizer to one of {OPTIMIZERS}.")
    if config.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    decay = float(config.get("layer_decay", 0.0))
    if param_groups.layer_decay_active(decay):
        if depth is None:
            raise ValueError("--config.layer_decay needs the model's depth per stage (create_optimizer(depth=...)).")
        tx = optax.chain(tx, param_groups.scale_by_layer_decay(tuple(depth), decay))
    elif decay < 0 or decay > 1:
        raise ValueError(f"--config.layer_decay={decay} must be in [0, 1] (0 or 1: off; 0.75 is usual).")
    return param_groups.Freeze(config.get("freeze", "")).wrap(tx)


# ----------------------------------------------------------------------------- model and state


def spec_overrides(config: ml_collections.ConfigDict, in_chans: int) -> dict[str, Any]:
    """`CvTSpec` overrides from the config (input channels, drop rates; negative rates keep the variant's)."""
    spec = models.get_spec(config.model)
    n = spec.num_stages
    out: dict[str, Any] = {"in_chans": int(in_chans)}
    if config.drop_path_rate >= 0:
        out["drop_path_rate"] = (0.0,) * (n - 1) + (float(config.drop_path_rate),)
    if config.dropout_rate >= 0:
        out["drop_rate"] = (float(config.dropout_rate),) * n
    if config.attn_dropout_rate >= 0:
        out["attn_drop_rate"] = (float(config.attn_dropout_rate),) * n
    return out


def create_model(config: ml_collections.ConfigDict, num_classes: int, in_chans: int, platform: str) -> nn.Module:
    """The `CvT` module of ``config.model`` for ``num_classes`` outputs, ``in_chans`` channels, on ``platform``.

    ``platform`` is that of the devices the model will run on (`mesh_platform`), not necessarily this host's:
    it resolves ``depthwise_impl='auto'`` and checks ``attention_impl``.
    """
    return models.create_model(
        config.model,
        num_classes=num_classes,
        act=config.act,
        init_method=config.init_method,
        attention_impl=resolve_attention_impl(config.attention_impl, platform),
        depthwise_impl=resolve_depthwise_impl(config.get("depthwise_impl", "auto"), platform),
        remat=config.remat,
        scan_blocks=resolve_scan_blocks(config.get("scan_blocks", "auto"), platform),
        dtype=config.dtype,
        **spec_overrides(config, in_chans),
    )


def resolve_scan_blocks(value: str | bool, platform: str) -> bool:
    """``auto`` -> scan the blocks on GPU/TPU devices (compile time; README "Compile-only figures"), not on CPU."""
    text = str(value).strip().lower()
    if text == "auto":
        return platform != "cpu"
    if text in ("true", "1", "on", "yes"):
        return True
    if text in ("false", "0", "off", "no"):
        return False
    raise ValueError(f"--config.scan_blocks={value!r}: use 'auto', 'true' or 'false'.")


DEPTHWISE_IMPLS = ("auto", "conv", "shift")
ATTENTION_IMPLS = ("explicit", "xla", "cudnn")


def mesh_platform(mesh: Mesh) -> str:
    """``cpu``, ``gpu`` or ``tpu``: the platform of the mesh's devices, which a program is built for.

    Program choices follow it rather than ``jax.default_backend()`` (the host), so that a program compiled on a
    CPU host for GPU or TPU devices (compile-only devices, ``benchmarks/compile_only.py``) is the one that runs
    there.
    """
    return str(mesh.devices.flat[0].platform)


def resolve_depthwise_impl(name: str, platform: str) -> str:
    """``auto`` -> ``shift`` on CPU devices (about 2x faster there), else ``conv`` (cuDNN / the TPU convolution)."""
    if name not in DEPTHWISE_IMPLS:
        raise ValueError(
            f"Unknown depthwise_impl {name!r}; set --config.depthwise_impl to one of {', '.join(DEPTHWISE_IMPLS)}."
        )
    if name == "auto":
        return "shift" if platform == "cpu" else "conv"
    return name


RNG_IMPLS = ("auto", "threefry", "rbg", "unsafe_rbg")


def resolve_rng_impl(name: str, platform: str) -> str:
    """``auto`` -> ``threefry_kernel`` on GPU devices (`jax_threefry_gpu_kernel_lowering`), else ``threefry``."""
    if name not in RNG_IMPLS:
        raise ValueError(f"Unknown rng_impl {name!r}; set --config.rng_impl to one of {', '.join(RNG_IMPLS)}.")
    if name == "auto":
        return "threefry_kernel" if platform == "gpu" else "threefry"
    return name


def step_rng(seed: int, impl: str) -> jax.Array:
    """Base key of the train step's randomness (dropout, stochastic depth, mixup) for ``impl``.

    ``threefry``/``threefry_kernel``: ``fold_in(PRNGKey(seed), 1)`` (as always); ``rbg``/``unsafe_rbg``: a typed key
    of that implementation. ``threefry_kernel`` also switches on `jax_threefry_gpu_kernel_lowering`, which only
    changes how threefry is compiled for GPUs (one kernel per call instead of unrolled integer arithmetic).
    """
    if impl in ("threefry", "threefry_kernel"):
        if impl == "threefry_kernel":
            jax.config.update("jax_threefry_gpu_kernel_lowering", True)
        return jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    return jax.random.fold_in(jax.random.key(seed, impl=impl), 1)


def resolve_attention_impl(name: str, platform: str) -> str:
    """Checks ``attention_impl`` against the devices: ``cudnn`` (flash attention) exists on NVIDIA GPUs only."""
    if name not in ATTENTION_IMPLS:
        raise ValueError(
            f"Unknown attention_impl {name!r}; set --config.attention_impl to one of {', '.join(ATTENTION_IMPLS)}."
        )
    if name == "cudnn" and platform != "gpu":
        raise ValueError(
            f"--config.attention_impl=cudnn needs NVIDIA GPU devices, but the mesh's are {platform}; use "
            "--config.attention_impl=explicit or xla."
        )
    return name


class TrainState(train_state.TrainState):
    """Flax `TrainState` with BatchNorm statistics and an optional EMA of the parameters.

    Attributes:
      batch_stats: The ``batch_stats`` collection (BatchNorm running statistics).
      ema_params: Exponential moving average of ``params`` (None when disabled).
    """

    batch_stats: PyTree = None
    ema_params: PyTree = None

    def eval_variables(self) -> dict[str, PyTree]:
        """Variables for evaluation (EMA parameters when kept)."""
        params = self.ema_params if self.ema_params is not None else self.params
        return {"params": params, "batch_stats": self.batch_stats}


def init_variables(model: nn.Module, rng: jax.Array, image_size: int, in_chans: int) -> dict[str, PyTree]:
    """Initialises the model's variables for ``[1, S, S, C]`` inputs.

    `flax.linen.Module.lazy_init`: only the initialisers run, not the forward pass (the same values as
    ``model.init``, tested), which keeps the initialisation program small.
    """
    dummy = jax.ShapeDtypeStruct((1, image_size, image_size, in_chans), jnp.float32)
    variables = model.lazy_init({"params": rng, "dropout": rng}, dummy, train=False)
    return flax.core.unfreeze(variables)


def create_train_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    variables: Mapping[str, PyTree],
    ema_decay: float = 0.0,
) -> TrainState:
    """Builds the train state from initial variables (``params`` and ``batch_stats``)."""
    params = variables["params"]
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        ema_params=jax.tree.map(jnp.copy, params) if ema_decay > 0 else None,
    )


# ----------------------------------------------------------------------------- metrics


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Train metrics, averaged over the steps since the last log."""

    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Average.from_output("accuracy")
    learning_rate: clu_metrics.LastValue.from_output("learning_rate")


@flax.struct.dataclass
class TrainMetricsWithNorm(clu_metrics.Collection):
    """`TrainMetrics` and the global norm of the gradients (`log_grad_norm`).

    Written out, not subclassed: clu's `Collection` reads only the class's own annotations.
    """

    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Average.from_output("accuracy")
    learning_rate: clu_metrics.LastValue.from_output("learning_rate")
    grad_norm: clu_metrics.Average.from_output("grad_norm")


def log_grad_norm(config: ml_collections.ConfigDict) -> bool:
    """Whether the train step reports the gradients' global norm (``--config.log_grad_norm``).

    ``auto``: when gradient clipping is on, which computes the norm anyway (free); without clipping the norm is a
    reduction over every gradient that XLA fuses into the optimizer's kernels, about 5 s (15%) of the H100 train
    step's compile time for CvT-13 (README "Compile-only figures"), so it is logged only when asked for.
    """
    value = str(config.get("log_grad_norm", "auto")).strip().lower()
    if value == "auto":
        return float(config.grad_clip_norm) > 0
    if value in ("true", "1", "on", "yes"):
        return True
    if value in ("false", "0", "off", "no"):
        return False
    raise ValueError(f"--config.log_grad_norm={config.log_grad_norm!r}: use 'auto', 'true' or 'false'.")


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    """Eval metrics over the whole eval split; padded examples are masked out."""

    loss: clu_metrics.Average.from_output("loss")
    accuracy: clu_metrics.Average.from_output("accuracy")
    top5_accuracy: clu_metrics.Average.from_output("top5_accuracy")


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy against (soft) target distributions, in float32."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets with label smoothing (``1 - s + s/K`` on the label, ``s/K`` elsewhere)."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if smoothing > 0:
        onehot = onehot * (1.0 - smoothing) + smoothing / num_classes
    return onehot


def classification_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per-example loss (unsmoothed), top-1 and top-5 correctness."""
    num_classes = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    loss = cross_entropy(logits, jax.nn.one_hot(labels, num_classes))
    top1 = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    k = min(5, num_classes)
    _, topk = jax.lax.top_k(logits, k)
    top5 = jnp.any(topk == labels[:, None], axis=-1).astype(jnp.float32)
    return {"loss": loss, "accuracy": top1, "top5_accuracy": top5}


# ----------------------------------------------------------------------------- steps

MixFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def make_mix_fn(aug: ml_collections.ConfigDict) -> MixFn | None:
    """The on-device Mixup/CutMix of ``config.aug`` for the train step, or None when both alphas are 0."""
    if aug.mixup_alpha <= 0 and aug.cutmix_alpha <= 0:
        return None
    from cvt_flax.data.mix import mix_batch

    return functools.partial(_mix, aug=aug, mix_batch=mix_batch)


def _mix(rng: jax.Array, images: jax.Array, targets: jax.Array, *, aug: Any, mix_batch: Any) -> Any:
    return mix_batch(rng, images, targets, aug)


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    base_rng: jax.Array,
    num_classes: int,
    label_smoothing: float,
    schedule: optax.Schedule,
    mix_fn: MixFn | None = None,
    ema_decay: float = 0.0,
    freeze: param_groups.Freeze | None = None,
    grad_norm: bool = True,
) -> tuple[TrainState, TrainMetrics]:
    """One optimizer step on a global batch.

    Dropout / stochastic depth and mixup draw from ``fold_in(base_rng, step)``, so a
    step's randomness depends only on the seed and the step (resume-exact).

    Args:
      state: The replicated train state.
      batch: ``{'image': [B, S, S, C], 'label': [B]}`` (global arrays).
      base_rng: Key of the run (from ``config.seed``).
      num_classes: Classifier outputs.
      label_smoothing: Label smoothing (applied before mixing).
      schedule: Learning-rate schedule (for the logged value).
      mix_fn: ``(rng, images, targets) -> (images, targets)`` on-device mixup/cutmix,
        or None.
      ema_decay: Parameter EMA decay (0: no EMA).
      freeze: Variables kept fixed (`param_groups.Freeze`): their gradients are zeroed
        (so not computed, and not in the logged norm) and their BatchNorm statistics kept.
      grad_norm: Also report the gradients' global norm (`TrainMetricsWithNorm`; see `log_grad_norm`).

    Returns:
      The new state and the step's `TrainMetrics`.
    """
    rng = jax.random.fold_in(base_rng, state.step)
    dropout_rng, mix_rng = jax.random.split(rng)
    images, labels = batch["image"], batch["label"]
    targets = smooth_labels(labels, num_classes, label_smoothing)
    if mix_fn is not None:
        images, targets = mix_fn(mix_rng, images, targets)

    def loss_fn(params: PyTree) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        logits, new_vars = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"],
        )
        loss = jnp.mean(cross_entropy(logits, targets))
        return loss, (logits, new_vars.get("batch_stats", state.batch_stats))

    (loss, (logits, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if freeze:
        grads = freeze.zero_frozen(grads)
        new_batch_stats = freeze.keep_frozen_stats(state.batch_stats, new_batch_stats)
    norm = optax.global_norm(grads) if grad_norm else None
    new_state = state.apply_gradients(grads=grads, batch_stats=new_batch_stats)
    if state.ema_params is not None and ema_decay > 0:
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, new_state.params)
        new_state = new_state.replace(ema_params=ema)
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    outputs = {"loss": loss, "accuracy": accuracy, "learning_rate": schedule(state.step)}
    if norm is not None:
        return new_state, TrainMetricsWithNorm.single_from_model_output(**outputs, grad_norm=norm)
    return new_state, TrainMetrics.single_from_model_output(**outputs)


def eval_step(
    variables: Mapping[str, PyTree],
    batch: Mapping[str, jax.Array],
    *,
    apply_fn: Callable[..., jax.Array],
) -> EvalMetrics:
    """Eval metrics of one (possibly padded) global batch; ``batch['mask']`` marks real examples."""
    logits = apply_fn(variables, batch["image"], train=False)
    out = classification_metrics(logits, batch["label"])
    mask = batch.get("mask")
    mask = jnp.ones_like(batch["label"], dtype=bool) if mask is None else mask.astype(bool)
    return EvalMetrics.single_from_model_output(mask=mask, **out)


def make_train_step(
    mesh: Mesh,
    *,
    base_rng: jax.Array,
    num_classes: int,
    label_smoothing: float,
    schedule: optax.Schedule,
    mix_fn: MixFn | None,
    ema_decay: float,
    freeze: param_groups.Freeze | None = None,
    grad_norm: bool = True,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, TrainMetrics]]:
    """``jax.jit`` of `train_step` over ``mesh``: replicated state (donated), batch sharded on ``'data'``."""
    fn = functools.partial(
        train_step,
        base_rng=base_rng,
        num_classes=num_classes,
        label_smoothing=label_smoothing,
        schedule=schedule,
        mix_fn=mix_fn,
        ema_decay=ema_decay,
        freeze=freeze,
        grad_norm=grad_norm,
    )
    rep, dat = replicated_sharding(mesh), data_sharding(mesh)
    return jax.jit(fn, in_shardings=(rep, dat), out_shardings=(rep, rep), donate_argnums=0)


def make_eval_step(
    mesh: Mesh, apply_fn: Callable[..., jax.Array]
) -> Callable[[Mapping[str, PyTree], Mapping[str, jax.Array]], EvalMetrics]:
    """``jax.jit`` of `eval_step` over ``mesh`` (replicated variables, sharded batch)."""
    rep, dat = replicated_sharding(mesh), data_sharding(mesh)
    return jax.jit(functools.partial(eval_step, apply_fn=apply_fn), in_shardings=(rep, dat), out_shardings=rep)


def evaluate(
    eval_fn: Callable[[Mapping[str, PyTree], Mapping[str, jax.Array]], EvalMetrics],
    variables: Mapping[str, PyTree],
    batches: Iterable[Mapping[str, jax.Array]],
) -> dict[str, float]:
    """One full pass over ``batches``; returns the masked means (loss, accuracy, top5_accuracy) and ``count``."""
    total: EvalMetrics | None = None
    for batch in batches:
        m = eval_fn(variables, batch)
        total = m if total is None else total.merge(m)
    if total is None:
        raise ValueError("The eval split produced no batches; check --config.eval_split.")
    out = {k: float(v) for k, v in total.compute().items()}
    out["count"] = int(total.accuracy.count)
    return out


# ----------------------------------------------------------------------------- the program of a run


# XLA options for programs that run once (initialisation) on CPU: skip the slow LLVM passes.
CHEAP_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def host_cpu() -> jax.Device | None:
    """This process's first CPU device, where the train state is initialised (None when JAX has no CPU backend)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # e.g. JAX_PLATFORMS=cuda
        return None


class HostInit:
    """The initialisation program on the host CPU, compiled in parallel parts.

    The initialisers are one traced program (``jax.make_jaxpr`` of the init function, traced once: it also gives
    the train state's shapes) that is mostly random-number arithmetic, whose compile time grows with its size. It
    is split into ``parts`` programs, each computing every ``parts``-th leaf of the state, compiled with
    `CHEAP_COMPILE` on a thread each (XLA compiles outside the GIL) and run as soon as compiled. Each leaf is
    computed by the same operations as in the whole program, so the values are the same (tested).

    Attributes:
      timings: Seconds of the last call: ``compile_s`` (wall time of compiling and running all parts),
        ``parts``.
    """

    def __init__(self, closed_jaxpr: Any, out_tree: Any, device: jax.Device, parts: int | None = None):
        self._fun = jaxpr_as_fun(closed_jaxpr)
        self._tree = out_tree
        self._device = device
        n = out_tree.num_leaves
        self.parts = max(1, min(int(parts or min(8, os.cpu_count() or 1)), n))
        self._groups = [list(range(i, n, self.parts)) for i in range(self.parts)]
        self._compiled: dict[Any, list[Any]] = {}
        self.timings: dict[str, float] = {}

    def _part(self, i: int, rng: jax.Array) -> tuple[Any, list[jax.Array]]:
        idx = self._groups[i]
        sharding = jax.sharding.SingleDeviceSharding(self._device)

        def select(r: jax.Array) -> list[jax.Array]:
            outs = self._fun(r)
            return [outs[j] for j in idx]

        fn = jax.jit(select, in_shardings=sharding, out_shardings=sharding)
        compiled = fn.lower(rng).compile(compiler_options=CHEAP_COMPILE)
        return compiled, compiled(rng)

    def __call__(self, rng: jax.Array) -> TrainState:
        """The initial train state on the host CPU for ``rng``."""
        import concurrent.futures

        rng = jax.device_put(rng, self._device)
        t0 = time.perf_counter()
        key = (rng.shape, str(rng.dtype))
        if key in self._compiled:
            results = [c(rng) for c in self._compiled[key]]
        else:
            with concurrent.futures.ThreadPoolExecutor(self.parts, thread_name_prefix="host_init") as pool:
                done = list(pool.map(lambda i: self._part(i, rng), range(self.parts)))
            self._compiled[key] = [c for c, _ in done]
            results = [r for _, r in done]
        leaves: list[Any] = [None] * self._tree.num_leaves
        for idx, values in zip(self._groups, results, strict=True):
            for j, v in zip(idx, values, strict=True):
                leaves[j] = v
        state = jax.tree.unflatten(self._tree, leaves)
        jax.block_until_ready(state)
        self.timings = {"compile_s": time.perf_counter() - t0, "parts": self.parts}
        return state


def place_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    """Host arrays, identical on every process, replicated on ``mesh``; checked identical across processes."""
    if jax.process_count() > 1:
        check_same_on_every_process(tree, "the initial train state")
    return replicate(tree, mesh)


def check_same_on_every_process(tree: PyTree, what: str) -> None:
    """Raises when ``tree``'s host values differ between processes (a CRC-32 per process, all-gathered)."""
    import zlib

    from jax.experimental import multihost_utils

    crc = 0
    for leaf in jax.tree.leaves(tree):
        crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
    crcs = np.asarray(multihost_utils.process_allgather(np.asarray([crc], np.uint32))).reshape(-1)
    if len(set(crcs.tolist())) > 1:
        raise RuntimeError(
            f"{what} differs between processes (CRC-32 per process: {crcs.tolist()}): the hosts compute "
            "different values from the same seed. Run every process with the same cvt-flax, jax and config."
        )


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """Everything a run compiles, built from the config in one place (`build_program`).

    The training loop (`cvt_flax.train`) and the benchmarks (``benchmarks/throughput.py``)
    both take their model, optimizer and jitted steps from here, so that what is timed
    is what trains.

    Attributes:
      model: The `CvT` module.
      run: Step counts of the run.
      schedule: Learning-rate schedule.
      tx: The optimizer (clipping, AdamW/SGD with the weight-decay mask).
      init_rng: Key of the parameter initialisation (``fold_in(seed, 0)``).
      dropout_rng: Base key of dropout, stochastic depth and mixup (``fold_in(seed, 1)``).
      init_state: ``init_rng -> TrainState`` replicated on the mesh: computed by `host_init` on this host's CPU
        (identical on every process, checked) and placed with the mesh's sharding, so that the initialisers
        (a large program of random-number arithmetic) are never compiled for the accelerator.
      host_init: The `HostInit` (``init_rng -> TrainState`` on the host CPU); None when JAX has no CPU backend,
        and then `init_state` is jitted on the mesh.
      abstract_state: Shapes of the train state (nothing compiled).
      train_step: Jitted ``(state, batch) -> (state, TrainMetrics)``, state donated.
      eval_step: Jitted ``(variables, batch) -> EvalMetrics``.
      num_classes: Classifier outputs.
      in_chans: Input channels.
      choices: What was resolved for the mesh's devices: ``platform``, ``depthwise_impl``, ``attention_impl``,
        ``rng_impl``, ``scan_blocks``, ``init`` (``host cpu`` or ``mesh``).
    """

    model: nn.Module
    run: RunLength
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    init_rng: jax.Array
    dropout_rng: jax.Array
    init_state: Callable[[jax.Array], TrainState]
    host_init: Any
    abstract_state: TrainState
    train_step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, TrainMetrics]]
    eval_step: Callable[[Mapping[str, PyTree], Mapping[str, jax.Array]], EvalMetrics]
    num_classes: int
    in_chans: int
    choices: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def num_params(self) -> int:
        """Parameters of the model (frozen ones included)."""
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))


def build_program(
    config: ml_collections.ConfigDict, mesh: Mesh, *, num_classes: int, in_chans: int, num_train_examples: int
) -> TrainProgram:
    """Builds the model, schedule, optimizer and jitted init/train/eval functions of a run.

    Args:
      config: The run config.
      mesh: The device mesh (axis ``'data'``).
      num_classes: Classifier outputs (from the dataset).
      in_chans: Input channels (from the dataset and ``config.num_channels``).
      num_train_examples: Size of the train split (for the schedule's step counts).

    Returns:
      The `TrainProgram`.
    """
    platform = mesh_platform(mesh)
    model = create_model(config, num_classes, in_chans, platform)
    run = derive_run_length(config, num_train_examples)
    schedule = create_learning_rate_schedule(config, run)
    tx = create_optimizer(config, schedule, model.spec.depth)
    freeze = param_groups.Freeze(config.get("freeze", ""))
    init_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    rng_impl = resolve_rng_impl(config.get("rng_impl", "auto"), platform)
    dropout_rng = step_rng(config.seed, rng_impl)

    def init_fn(rng: jax.Array) -> TrainState:
        variables = init_variables(model, rng, config.image_size, in_chans)
        return create_train_state(model, tx, variables, config.ema_decay)

    # Initialisation runs once: on the host CPU, compiled without LLVM's expensive passes, then placed on the
    # mesh. Compiled for a GPU it took longer than the train step (66 s of the H100 target's compile-only
    # figures, README "Compile-only figures"); on the host it is a few seconds.
    closed, abstract_state = jax.make_jaxpr(init_fn, return_shape=True)(init_rng)
    cpu = host_cpu()
    if cpu is not None:
        host_init: HostInit | None = HostInit(closed, jax.tree.structure(abstract_state), cpu)

        def init_state(rng: jax.Array) -> TrainState:
            return place_replicated(host_init(rng), mesh)

    else:
        host_init = None
        init_state = jax.jit(init_fn, out_shardings=replicated_sharding(mesh))
    freeze.check({"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}, config.model)
    train = make_train_step(
        mesh,
        base_rng=dropout_rng,
        num_classes=num_classes,
        label_smoothing=float(config.label_smoothing),
        schedule=schedule,
        mix_fn=make_mix_fn(config.aug),
        ema_decay=float(config.ema_decay),
        freeze=freeze,
        grad_norm=log_grad_norm(config),
    )
    return TrainProgram(
        model=model,
        run=run,
        schedule=schedule,
        tx=tx,
        init_rng=init_rng,
        dropout_rng=dropout_rng,
        init_state=init_state,
        host_init=host_init,
        abstract_state=abstract_state,
        train_step=train,
        eval_step=make_eval_step(mesh, model.apply),
        num_classes=int(num_classes),
        in_chans=int(in_chans),
        choices={
            "platform": platform,
            "depthwise_impl": model.depthwise_impl,
            "attention_impl": model.attention_impl,
            "rng_impl": rng_impl,
            "scan_blocks": str(model.scan_blocks).lower(),
            "init": "host cpu" if host_init is not None else "mesh",
        },
    )


class CompileAhead:
    """Compiles a run's train and eval steps on a background thread while the main thread prepares the run.

    `jax.jit` keeps compiled executables in memory, keyed by the program and its argument types, so the loop's
    first call of each step finds the one compiled here (and JAX's persistent cache stores it too). The data
    set-up, the initialisation or restore and the compilation overlap: the time to first step is about the
    longest of them instead of their sum. `wait` before the first call, so that a step is never compiled twice
    at once; an error here is not raised (the loop's own call compiles again and raises it where it belongs).
    """

    def __init__(self, program: TrainProgram, mesh: Mesh, config: ml_collections.ConfigDict, *, train: bool = True):
        import threading

        rep, dat = replicated_sharding(mesh), data_sharding(mesh)
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), program.abstract_state)
        size, chans = int(config.image_size), int(program.in_chans)

        def batch(n: int, mask: bool) -> dict[str, jax.ShapeDtypeStruct]:
            out = {
                "image": jax.ShapeDtypeStruct((n, size, size, chans), jnp.float32, sharding=dat),
                "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=dat),
            }
            if mask:
                out["mask"] = jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=dat)
            return out

        jobs = []
        if train:
            jobs.append(("train", program.train_step, (state, batch(int(config.batch_size), False))))
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        jobs.append(("eval", program.eval_step, (variables, batch(int(config.eval_batch_size), True))))
        self._done = {name: threading.Event() for name, _, _ in jobs}
        self.seconds: dict[str, float] = {}

        def work() -> None:
            for name, fn, args in jobs:
                t0 = time.perf_counter()
                try:
                    fn.lower(*args).compile()
                    self.seconds[name] = time.perf_counter() - t0
                except Exception:  # noqa: BLE001 - the loop's own call raises it
                    pass
                finally:
                    self._done[name].set()

        self._thread = threading.Thread(target=work, name="compile_ahead", daemon=True)
        self._thread.start()

    def wait(self, name: str) -> None:
        """Blocks until the ``train`` or ``eval`` step is compiled (or has failed to)."""
        if name in self._done:
            self._done[name].wait()


@jax.jit
def tree_all_finite(tree: PyTree) -> jax.Array:
    """True when every leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
