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
from jax.sharding import Mesh

from cvt_flax import models, param_groups
from cvt_flax.sharding import data_sharding, replicated_sharding

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


def create_model(config: ml_collections.ConfigDict, num_classes: int, in_chans: int) -> nn.Module:
    """The `CvT` module of ``config.model`` for ``num_classes`` outputs and ``in_chans`` input channels."""
    return models.create_model(
        config.model,
        num_classes=num_classes,
        act=config.act,
        init_method=config.init_method,
        attention_impl=config.attention_impl,
        depthwise_impl=resolve_depthwise_impl(config.get("depthwise_impl", "auto")),
        remat=config.remat,
        dtype=config.dtype,
        **spec_overrides(config, in_chans),
    )


def resolve_depthwise_impl(name: str) -> str:
    """``auto`` -> ``shift`` on the CPU backend (about 2x faster there), else ``conv``."""
    if name == "auto":
        return "shift" if jax.default_backend() == "cpu" else "conv"
    if name not in ("conv", "shift"):
        raise ValueError(f"Unknown depthwise_impl {name!r}; set --config.depthwise_impl to 'auto', 'conv' or 'shift'.")
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
    """Initialises the model's variables on a ``[1, S, S, C]`` dummy input."""
    dummy = jnp.zeros((1, image_size, image_size, in_chans), jnp.float32)
    variables = model.init({"params": rng, "dropout": rng}, dummy, train=False)
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
    grad_norm: clu_metrics.Average.from_output("grad_norm")


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
    grad_norm = optax.global_norm(grads)
    new_state = state.apply_gradients(grads=grads, batch_stats=new_batch_stats)
    if state.ema_params is not None and ema_decay > 0:
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, new_state.params)
        new_state = new_state.replace(ema_params=ema)
    accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    metrics = TrainMetrics.single_from_model_output(
        loss=loss,
        accuracy=accuracy,
        learning_rate=schedule(state.step),
        grad_norm=grad_norm,
    )
    return new_state, metrics


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
      init_state: Jitted ``init_rng -> TrainState`` (replicated on the mesh).
      abstract_state: Shapes of the train state (nothing compiled).
      train_step: Jitted ``(state, batch) -> (state, TrainMetrics)``, state donated.
      eval_step: Jitted ``(variables, batch) -> EvalMetrics``.
      num_classes: Classifier outputs.
      in_chans: Input channels.
    """

    model: nn.Module
    run: RunLength
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    init_rng: jax.Array
    dropout_rng: jax.Array
    init_state: Callable[[jax.Array], TrainState]
    abstract_state: TrainState
    train_step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, TrainMetrics]]
    eval_step: Callable[[Mapping[str, PyTree], Mapping[str, jax.Array]], EvalMetrics]
    num_classes: int
    in_chans: int

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
    model = create_model(config, num_classes, in_chans)
    run = derive_run_length(config, num_train_examples)
    schedule = create_learning_rate_schedule(config, run)
    tx = create_optimizer(config, schedule, model.spec.depth)
    freeze = param_groups.Freeze(config.get("freeze", ""))
    root_rng = jax.random.PRNGKey(config.seed)
    init_rng, dropout_rng = jax.random.fold_in(root_rng, 0), jax.random.fold_in(root_rng, 1)

    def init_fn(rng: jax.Array) -> TrainState:
        variables = init_variables(model, rng, config.image_size, in_chans)
        return create_train_state(model, tx, variables, config.ema_decay)

    # Initialisation runs once: on CPU, compile it without LLVM's expensive passes
    # (random initialisers make a large program; this cuts its compile time ~3x).
    init_opts = CHEAP_COMPILE if jax.default_backend() == "cpu" else None
    init_state = jax.jit(init_fn, out_shardings=replicated_sharding(mesh), compiler_options=init_opts)
    abstract_state = jax.eval_shape(init_fn, init_rng)
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
    )
    return TrainProgram(
        model=model,
        run=run,
        schedule=schedule,
        tx=tx,
        init_rng=init_rng,
        dropout_rng=dropout_rng,
        init_state=init_state,
        abstract_state=abstract_state,
        train_step=train,
        eval_step=make_eval_step(mesh, model.apply),
        num_classes=int(num_classes),
        in_chans=int(in_chans),
    )


@jax.jit
def tree_all_finite(tree: PyTree) -> jax.Array:
    """True when every leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
