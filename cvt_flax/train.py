"""Training and evaluation loop of cvt-flax.

    python main.py --config=configs/fashion_mnist.py:variant=cvt_mini --workdir=/tmp/fmnist

Where a run starts from (in this order):

1. The latest checkpoint in ``<workdir>/checkpoints``: the full train state
   (step, parameters, optimizer state, BatchNorm statistics, EMA) and the best
   eval accuracy so far. The data stream is re-created at the restored step, so
   a run that is stopped (SIGTERM, ``max_train_seconds``) and restarted with the
   same command ends with the same parameters as one never interrupted.
2. Else ``config.init_from``: a cvt-flax workdir, one of its checkpoint
   directories, or a model directory (``model.json``, as written by
   ``python -m cvt_flax.convert`` or at the end of every run in
   ``<workdir>/model``). Parameters and BatchNorm statistics are copied; the
   classifier head is re-initialised when the class count differs; any other
   difference of architecture is an error that names the mismatched paths. The
   optimizer and the step start fresh.
3. Else from scratch (``config.seed``).

A workdir holds::

    checkpoints/<step>/   Orbax checkpoints: the last ``keep_checkpoints`` and the best by eval accuracy
    model/                the final model (model.json + variables), for fine-tuning and inference
    metrics.jsonl         metrics history (one JSON object per log/eval)
    events.out.tfevents*  TensorBoard (clu's writer with TensorFlow, tensorboardX without)
    config.json           the resolved config
    curves.png            loss/accuracy curves (train and eval)
    summary.json          final and best eval metrics, steps, wall time, throughput, config
    eval.json             written by ``--config.eval_only=True``

The workdir, ``config.data_dir`` and ``config.init_from`` may be local or Cloud Storage
URLs (``gs://bucket/...``; `cvt_flax.paths`). With several processes
(`jax.distributed`, e.g. the hosts of a Cloud TPU pod), process 0 alone writes the
files above and the TensorBoard events; every process takes part in each Orbax
checkpoint save and restore, and reads its own share of the data.

A non-finite loss (or non-finite parameters at a checkpoint) stops the run with
`errors.TrainingDivergedError` (one message, exit 2 from the CLI); non-finite states are
never saved, so the last good checkpoint stays the latest. ``config.json`` and
``parameters.txt`` describe the checkpoints on disk: a resume with a changed recipe
rewrites them only once its first checkpoint is committed (the previous config kept
as ``config.step<N>.json``), so a resume that fails leaves them as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from cvt_flax import checkpoint as ckpt_lib
from cvt_flax import (
    compilation_cache,
    config_checks,
    data,
    errors,
    flops,
    models,
    param_groups,
    paths,
    plots,
    sharding,
    writers,
)
from cvt_flax import train_utils as tu
from cvt_flax.errors import UserError

PyTree = Any

SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
PARAMETERS_FILE = "parameters.txt"


# ----------------------------------------------------------------------------- validation


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks config values that need no dataset (names, divisibility), with messages that say the fix.

    Raises:
      ValueError: for an unknown model, optimizer or dtype, or batch sizes that do
        not divide over the devices and processes.
    """
    models.get_variant(config.model)  # Names the registered variants when unknown.
    if config.optimizer.lower() not in tu.OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {config.optimizer!r}; set --config.optimizer to one of {tu.OPTIMIZERS}.")
    models.as_dtype(config.dtype)
    # The implementation choices are checked against the mesh's devices in build_program; here only the names.
    tu.resolve_depthwise_impl(config.get("depthwise_impl", "auto"), "any")
    tu.resolve_attention_impl(config.attention_impl, "gpu")
    tu.resolve_rng_impl(config.get("rng_impl", "auto"), "any")
    tu.resolve_scan_blocks(config.get("scan_blocks", "auto"), "any")
    tu.log_grad_norm(config)
    for name in ("batch_size", "eval_batch_size"):
        sharding.check_batch_size(config[name], name)
    config_checks.check_numeric_fields(config)  # lr, decay, betas, smoothing, mixing, drop rates, EMA: ranges


def validate_image_size(config: ml_collections.ConfigDict, spec: models.CvTSpec) -> None:
    """Raises a ValueError naming the smallest image size when the model cannot take ``config.image_size``."""
    try:
        spec.token_grid(config.image_size, config.image_size)
    except ValueError as e:
        raise ValueError(
            f"--config.image_size={config.image_size} is too small for model {config.model!r}: {e} "
            f"(set --config.image_size to at least {spec.min_input_size()})."
        ) from None


# ----------------------------------------------------------------------------- run helpers


def log_param_groups(config: ml_collections.ConfigDict, program: tu.TrainProgram) -> None:
    """Logs what ``--config.freeze`` keeps fixed and the learning-rate multipliers of ``--config.layer_decay``."""
    freeze = param_groups.Freeze(config.get("freeze", ""))
    params = program.abstract_state.params
    if freeze:
        mask = jax.tree.leaves(freeze.mask(params, "params"))
        sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
        frozen = sum(n for n, f in zip(sizes, mask, strict=True) if f)
        stats = jax.tree.leaves(freeze.mask(program.abstract_state.batch_stats or {}, "batch_stats"))
        logging.info(
            "Frozen (--config.freeze=%r): %s of %s parameters (%d of %d arrays) and %d of %d BatchNorm statistics "
            "arrays; training %s.",
            freeze.text, f"{frozen:,}", f"{sum(sizes):,}", sum(mask), len(mask), sum(stats), len(stats),
            f"{sum(sizes) - frozen:,}",
        )  # fmt: skip
    decay = float(config.get("layer_decay", 0.0))
    if param_groups.layer_decay_active(decay):
        depth = program.model.spec.depth
        embeddings = ", ".join(f"{param_groups.layer_scale(f'stage{s}', depth, decay):.3g}" for s in range(len(depth)))
        logging.info(
            "Layer-wise lr decay %.3g over %d layers: stage embeddings x%s, the last block x%.3g, norm and head x1.",
            decay, param_groups.num_layers(depth), embeddings, decay,
        )  # fmt: skip


class _StopFlag:
    """Set by SIGTERM (preemption): the loop saves a checkpoint and returns."""

    def __init__(self):
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        del frame
        logging.warning("Received signal %d: saving a checkpoint and stopping after this step.", signum)
        self.requested = True

    def install(self) -> _StopFlag:
        """Handles SIGTERM from now on (only possible in the main thread; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
        return self

    def uninstall(self) -> None:
        """Restores the previous SIGTERM handler."""
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def _any_process(flag: bool) -> bool:
    """True when ``flag`` is set on any process (a collective; call on every process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


class History:
    """Append-only metrics history (``metrics.jsonl``), written by the first process.

    On Cloud Storage, where objects cannot be appended to, the file is rewritten (`paths.AppendFile`): at most every
    few seconds and at every `flush` (before each checkpoint and at the end of the run).
    """

    def __init__(self, path: epath.Path, enabled: bool, keep_up_to_step: int | None):
        self.path = path
        self.enabled = enabled
        self._file: paths.AppendFile | None = None
        if not enabled:
            return
        text = None
        if path.exists():
            # Entries after the restored step belong to a run that was interrupted
            # before its next checkpoint; the resumed run writes them again.
            limit = -1 if keep_up_to_step is None else keep_up_to_step
            kept = [r for r in plots.read_history(path) if r.get("step", 0) <= limit]
            text = "".join(json.dumps(r) + "\n" for r in kept)
        self._file = paths.AppendFile(path, text)

    def append(self, record: Mapping[str, Any]) -> None:
        """Adds one record (a JSON line)."""
        if self._file is not None:
            self._file.append(json.dumps(dict(record)) + "\n")

    def flush(self) -> None:
        """Makes every record so far durable (on Cloud Storage; local appends are written at once)."""
        if self._file is not None:
            self._file.flush()


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic | np.ndarray):
        return x.tolist()
    return str(x)


def _write_json(path: epath.Path, obj: Any) -> None:
    paths.write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return traverse_util.flatten_dict(config.to_dict(), sep=".")


def _nonfinite_error(what: str, step: int, last_good: int | None, config: ml_collections.ConfigDict) -> str:
    kept = (
        f"The last good checkpoint (step {last_good}) is kept in the workdir; a restart resumes from it."
        if last_good is not None
        else "No checkpoint had been saved yet."
    )
    return (
        f"{what} at step {step}: training diverged. {kept} Lower --config.learning_rate (now "
        f"{config.learning_rate}), keep gradient clipping on (--config.grad_clip_norm=1.0, now "
        f"{config.grad_clip_norm}), add warmup (--config.warmup_epochs) or compute in float32 "
        f"(--config.dtype=float32, now {config.dtype})."
    )


def _periodic_actions(config: ml_collections.ConfigDict, writer: Any, total_steps: int, workdir: str) -> list[Any]:
    """Periodic actions: clu's ReportProgress/Profile when clu.periodic_actions imports, else a profiler."""
    actions: list[Any] = []
    try:
        from clu import periodic_actions
    except Exception:  # TensorFlow/TensorBoard missing.
        periodic_actions = None
    if periodic_actions is not None and jax.process_index() == 0:
        actions.append(
            periodic_actions.ReportProgress(
                num_train_steps=total_steps, writer=writer, every_steps=config.log_every_steps
            )
        )
        if config.profile:
            actions.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))
    elif config.profile and jax.process_index() == 0:
        actions.append(_Profiler(os.path.join(workdir, "profile")))
    return actions


class _Profiler:
    """Traces 5 steps (from the 10th after the start) with ``jax.profiler`` (TensorBoard profile plugin)."""

    def __init__(self, logdir: str, first: int = 10, num: int = 5):
        self.logdir, self.first, self.num = logdir, first, num
        self._start: int | None = None
        self._active = False

    def __call__(self, step: int) -> None:
        if self._start is None:
            self._start = step
        if not self._active and step == self._start + self.first:
            jax.profiler.start_trace(self.logdir)
            self._active = True
        elif self._active and step == self._start + self.first + self.num:
            jax.profiler.stop_trace()
            self._active = False
            logging.info("Wrote a profile to %s.", self.logdir)


# ----------------------------------------------------------------------------- main entry


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains and evaluates a CvT as ``config`` says; resumable and preemption-safe.

    Args:
      config: The run config (see ``configs/default.py``).
      workdir: Directory for checkpoints, logs, metrics, curves and the summary: a local path or a Cloud
        Storage URL (``gs://bucket/run``).

    Returns:
      The summary (also written to ``<workdir>/summary.json``); with
      ``config.eval_only`` the eval metrics (also ``<workdir>/eval.json``).
    """
    t_start = time.time()
    writers.quiet_console()
    validate_config(config)
    compilation_cache.setup(config.get("compilation_cache_dir", "auto"))
    workdir_path = _prepare_workdir(workdir, create=not config.eval_only)
    is_main = jax.process_index() == 0

    # ------------------------------------------------------------------ data, model, schedule
    mesh = sharding.create_mesh()
    info = data.get_dataset_info(config)
    in_chans = int(info.channels)
    num_classes = int(info.num_classes)
    validate_image_size(config, models.get_spec(config.model))
    program = tu.build_program(
        config, mesh, num_classes=num_classes, in_chans=in_chans, num_train_examples=info.num_train_examples
    )
    # The train and eval steps compile on a thread from here, while the state is initialised or restored and the
    # data pipeline starts (tu.CompileAhead); the loop waits for them before their first call.
    ahead = tu.CompileAhead(program, mesh, config, train=not config.eval_only)
    model, run = program.model, program.run
    spec = model.spec
    num_params = program.num_params
    macs = float(flops.count_macs(spec, config.image_size, num_classes))
    logging.info(
        "%s: %d classes, %d train / %d eval examples, %d channel(s) at %dx%d. %s (%s parameters, %.3f GMACs per "
        "image, %s) on %d %s device(s), %d process(es).",
        info.name, num_classes, info.num_train_examples, info.num_eval_examples, in_chans, config.image_size,
        config.image_size, config.model, f"{num_params:,}", macs / 1e9, config.dtype, jax.device_count(),
        jax.devices()[0].platform, jax.process_count(),
    )  # fmt: skip
    c = program.choices
    logging.info(
        "Program for %s devices: depthwise %s, attention %s, random numbers %s, blocks %s, initialised on the %s.",
        c["platform"], c["depthwise_impl"], c["attention_impl"], c["rng_impl"],
        "scanned per stage" if c["scan_blocks"] == "true" else "unrolled", c["init"],
    )  # fmt: skip
    if not config.eval_only:
        logging.info(
            "Plan: %d steps (%.2f epochs of %d), batch %d, peak lr %.3g after %d warmup steps, eval every %d and "
            "checkpoint every %d steps.",
            run.total_steps, run.total_steps / run.steps_per_epoch, run.steps_per_epoch, config.batch_size,
            tu.peak_learning_rate(config), run.warmup_steps, run.eval_every_steps, run.checkpoint_every_steps,
        )  # fmt: skip
        log_param_groups(config, program)

    # ------------------------------------------------------------------ load checkpoint
    # Resume order (checkpoint.restore_or_initialize): the workdir's latest checkpoint (the whole state), else
    # config.init_from (weights only, head re-initialised for a new class count), else from scratch.
    ckpt_dir = workdir_path / ckpt_lib.CHECKPOINT_DIR
    # An eval-only run creates nothing in the workdir but eval.json.
    ckpts = (
        None if config.eval_only and not ckpt_dir.is_dir() else ckpt_lib.Checkpoints(ckpt_dir, config.keep_checkpoints)
    )
    # SIGTERM from here on (compilation included) stops the run cleanly after its next step, with a checkpoint.
    stop_flag = _StopFlag().install()
    try:
        start = ckpt_lib.restore_or_initialize(config, program, mesh, ckpts, workdir_path)
        state, best = start.state, start.best

        if config.eval_only:
            ahead.wait("eval")
            eval_metrics = tu.evaluate(
                program.eval_step, state.eval_variables(), data.create_eval_iterator(config, mesh)
            )
            result = {
                "step": start.source_step,
                "dataset": config.dataset,
                "split": config.eval_split,
                "model": config.model,
                "source": start.path,
                **eval_metrics,
            }
            logging.info(
                "Eval of %s (step %s) on %s (%d examples): loss %.4f, top-1 %.4f, top-5 %.4f.", start.path,
                start.source_step if start.source_step is not None else "?", config.eval_split,
                eval_metrics["count"], eval_metrics["loss"], eval_metrics["accuracy"], eval_metrics["top5_accuracy"],
            )  # fmt: skip
            if is_main:
                paths.makedirs(workdir_path)
                _write_json(workdir_path / EVAL_FILE, result)
            return result

        # The config and inputs are valid and the state is restored: only now does this run write its files.
        if start.source == "checkpoint":
            ckpt_lib.check_resume_config(config, workdir_path, int(state.step), info.num_train_examples)
        resumed_at, params = int(state.step), state.params

        def describe_run() -> None:
            """config.json (the previous one kept as config.step<resumed_at>.json) and parameters.txt."""
            if is_main:
                ckpt_lib.save_run_config(config, workdir_path, resumed_at)
                _write_parameter_overview(workdir_path / PARAMETERS_FILE, params)

        # A new run describes itself at once; a resumed one when its first checkpoint is committed (before that,
        # the files must keep describing the checkpoints on disk, and a failed resume changes nothing).
        deferred = start.source == "checkpoint" and ckpt_lib.run_config_changed(config, workdir_path)
        if not deferred:
            describe_run()
        assert ckpts is not None  # only eval-only runs go without
        return _train_loop(
            config, workdir_path, state, program, mesh, ckpts, best, info, macs, t_start, stop_flag, ahead,
            describe_on_commit=describe_run if deferred else None,
        )  # fmt: skip
    finally:
        stop_flag.uninstall()
        if ckpts is not None:
            if sys.exc_info()[0] is None:
                ckpts.close()
            else:  # the run is failing (e.g. a full disk): its error is reported once, not echoed by every thread
                with contextlib.suppress(Exception), errors.silenced_stderr():
                    ckpts.close()


def _prepare_workdir(workdir: str | os.PathLike, *, create: bool) -> epath.Path:
    """The workdir (absolute, or a ``gs://`` URL); unless eval-only, created and checked writable by process 0.

    Every process learns whether process 0 could write there, so that all of them stop with one clear message
    when it cannot (rather than the others waiting for it forever).
    """
    path = paths.as_path(workdir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--workdir={workdir} is a file, but a folder is needed. Choose another --workdir.")
    if not create:
        return path
    error: UserError | None = None
    if jax.process_index() == 0:
        try:
            _check_writable(path)
        except UserError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        writable = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not writable and error is None:
            raise UserError(f"Process 0 cannot write to --workdir={path} (its message says why); fix that first.")
    if error is not None:
        raise error
    return path


def _check_writable(path: epath.Path) -> None:
    """Creates the workdir and writes (then deletes) a probe file in it; a `UserError` says why that failed."""
    probe = path / f".write_test.{os.getpid()}"
    if not paths.is_remote(path):
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(
                f"Cannot write to --workdir={path} ({e.strerror or e}). Choose a folder you can write to."
            ) from e
        return
    # Cloud Storage has no folders to create (object names imply them), and a missing bucket must not be created.
    try:
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - each Cloud Storage client raises its own types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        bucket = "/".join(os.fspath(path).split("/")[:3])
        raise UserError(
            f"Cannot write to --workdir={path} ({type(e).__name__}: {reason}). Check that the bucket exists and that "
            f"this machine's credentials may write to it (`gcloud storage ls {bucket}`; on a TPU VM its service "
            "account needs e.g. roles/storage.objectUser on the bucket)."
        ) from e


def _write_parameter_overview(path: epath.Path, params: PyTree) -> None:
    """The parameter table (shapes, sizes, statistics) as a file of the workdir, not on the console."""
    try:
        from clu import parameter_overview

        text = parameter_overview.get_parameter_overview(params)
    except Exception as e:  # The overview is a convenience only.
        text = f"No parameter overview ({e})."
    paths.write_text(path, text + "\n")


def _train_loop(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    state: tu.TrainState,
    program: tu.TrainProgram,
    mesh: Any,
    ckpts: ckpt_lib.Checkpoints,
    best: dict[str, Any],
    info: Any,
    macs: float,
    t_start: float,
    stop_flag: _StopFlag,
    ahead: tu.CompileAhead,
    describe_on_commit: Callable[[], None] | None = None,
) -> dict[str, Any]:
    is_main = jax.process_index() == 0
    start_step = int(state.step)
    num_classes = int(info.num_classes)
    model, run, eval_fn, train_step = program.model, program.run, program.eval_step, program.train_step
    num_params = program.num_params
    history = History(workdir / plots.HISTORY_FILE, is_main, start_step if start_step > 0 else None)
    writer = writers.create_default_writer(workdir, just_logging=not is_main)
    if start_step == 0:
        writer.write_hparams({k: v for k, v in _flat_config(config).items() if v is not None})

    actions = _periodic_actions(config, writer, run.total_steps, str(workdir))
    reporter = writers.ProgressReporter(run.total_steps, config.batch_size, start_step)
    model_info = ckpt_lib.run_model_info(config, model.spec, num_classes, info)
    last_eval: dict[str, float] | None = None
    status = "completed"
    step = start_step
    t_loop = time.time()
    first_step_at = None

    def meta(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "epoch": step / run.steps_per_epoch,
            "best_accuracy": best["accuracy"],
            "best_step": best["step"],
            **model_info,
        }

    def save(step: int, eval_metrics: Mapping[str, float] | None) -> None:
        if not bool(tu.tree_all_finite(state.params)):
            what = "Non-finite parameters"
            raise errors.TrainingDivergedError(_nonfinite_error(what, step, ckpts.latest_step(), config))
        with reporter.timed("checkpoint"):
            history.flush()  # the metrics up to a checkpoint are durable with it (Cloud Storage rewrites lazily)
            ckpts.save(step, state, meta(step), {"accuracy": eval_metrics["accuracy"]} if eval_metrics else None)
        nonlocal describe_on_commit
        if describe_on_commit is not None:  # a resumed run: its first checkpoint is the first of this recipe
            ckpts.wait()
            describe_on_commit()
            describe_on_commit = None

    train_iter = data.create_train_iterator(config, mesh, seed=config.seed, start_step=start_step)
    eval_iter = data.create_eval_iterator(config, mesh)  # built once, one pass per evaluation
    if start_step >= run.total_steps:
        logging.info("The checkpoint is at step %d, the end of the run: nothing to train.", start_step)
    train_metrics = None
    for step in range(start_step + 1, run.total_steps + 1):
        batch = next(train_iter)
        if step == start_step + 1:
            ahead.wait("train")
        state, metrics = train_step(state, batch)
        if step == start_step + 1:
            jax.block_until_ready(metrics)  # the first step compiles: speed and ETA are measured from here
            reporter.first_step_done(step)
            first_step_at = time.time() - t_start
            logging.info(
                "First step done %.1f s after the start (%.1f s of set-up: data, model, initialisation or restore; "
                "%.1f s for the step; the train step compiled in %.1f s alongside).",
                first_step_at, t_loop - t_start, reporter.sections["first_step"], ahead.seconds.get("train", 0.0),
            )  # fmt: skip
        reporter.tick(step)
        train_metrics = metrics if train_metrics is None else train_metrics.merge(metrics)
        for action in actions:
            action(step)
        is_last = step == run.total_steps
        epoch = step / run.steps_per_epoch

        if step % run.log_every_steps == 0 or is_last:
            values = {k: float(v) for k, v in train_metrics.compute().items()}
            train_metrics = None
            if not np.isfinite(values["loss"]):
                what = f"Non-finite training loss ({values['loss']})"
                raise errors.TrainingDivergedError(_nonfinite_error(what, step, ckpts.latest_step(), config))
            speed = reporter.report(step)
            writer.write_scalars(
                step,
                {f"train/{k}": v for k, v in values.items()}
                | {"train/steps_per_sec": speed["steps_per_sec"], "train/images_per_sec": speed["images_per_sec"],
                   "epoch": epoch},
            )  # fmt: skip
            history.append({"step": step, "epoch": epoch, "split": "train", **values, **speed})
            rate = (
                f"{speed['steps_per_sec']:.2f} steps/s, {speed['images_per_sec']:.0f} img/s, ETA "
                f"{writers.format_duration(speed['eta_seconds'])}"
                if speed["steps_per_sec"] > 0
                else "compiled"
            )
            norm = f"  grad-norm {values['grad_norm']:.3g}" if "grad_norm" in values else ""
            logging.info(
                "step %d/%d (epoch %.2f) | loss %.4f  acc %.4f  lr %.3g%s | %s",
                step, run.total_steps, epoch, values["loss"], values["accuracy"], values["learning_rate"], norm, rate,
            )  # fmt: skip

        # Stop requests are combined over processes at log steps (every step on one process).
        stop = False
        if jax.process_count() == 1 or step % run.log_every_steps == 0 or is_last:
            timed_out = config.max_train_seconds > 0 and time.time() - t_loop > config.max_train_seconds
            preempted = _any_process(stop_flag.requested)
            stop = (preempted or _any_process(timed_out)) and not is_last
            if stop:
                status = "preempted" if preempted else "time_limit"

        eval_metrics = None
        if step % run.eval_every_steps == 0 or is_last:
            reporter.clear_bar()
            ahead.wait("eval")
            with reporter.timed("eval"):
                eval_metrics = tu.evaluate(eval_fn, state.eval_variables(), eval_iter)
            last_eval = {"step": step, **eval_metrics}
            if eval_metrics["accuracy"] > best["accuracy"]:
                best = {"accuracy": eval_metrics["accuracy"], "step": step}
            writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items() if k != "count"})
            history.append({"step": step, "epoch": epoch, "split": "eval", **eval_metrics})
            logging.info(
                "eval at step %d (epoch %.2f): loss %.4f  top-1 %.4f  top-5 %.4f  (best top-1 %.4f at step %d)",
                step, epoch, eval_metrics["loss"], eval_metrics["accuracy"], eval_metrics["top5_accuracy"],
                best["accuracy"], best["step"],
            )  # fmt: skip

        if step % run.checkpoint_every_steps == 0 or is_last or stop:
            save(step, eval_metrics)
        if stop:
            logging.warning("Stopped at step %d (%s); restart the same command to resume.", step, status)
            break
    writer.flush()
    history.flush()
    ckpts.wait()
    final_step = int(state.step)
    if status == "completed":
        ckpt_lib.export_model(workdir / ckpt_lib.MODEL_DIR, state, model_info)

    wall = time.time() - t_start
    summary = {
        "status": status,
        "step": final_step,
        "total_steps": run.total_steps,
        "epochs": final_step / run.steps_per_epoch,
        "steps_per_epoch": run.steps_per_epoch,
        "final_eval": last_eval,
        "best_eval": best if best["step"] >= 0 else None,
        "wall_time_s": wall,
        # From the call of train_and_evaluate to the end of the first step (set-up, compilation, one step).
        "time_to_first_step_s": first_step_at,
        "first_step_s": reporter.sections.get("first_step"),
        "setup_s": t_loop - t_start,
        # Compile time of each step function (on the CompileAhead thread; near 0 from the persistent cache).
        "compile_s": dict(ahead.seconds),
        "train_time_s": reporter.train_time,
        "eval_time_s": reporter.sections.get("eval", 0.0),
        # Throughput without the first log window (compilation), eval and checkpoint time.
        "train_images_per_sec": reporter.steady_images_per_sec(),
        "num_params": num_params,
        "gmacs_per_image": macs / 1e9,
        "model": config.model,
        "dataset": config.dataset,
        "num_classes": num_classes,
        "num_devices": jax.device_count(),
        "program": dict(program.choices),
        "num_processes": jax.process_count(),
        "device_kind": jax.devices()[0].device_kind,
        "resumed_from_step": start_step,
        "config": config.to_dict(),
    }
    if is_main:
        _write_json(workdir / SUMMARY_FILE, summary)
        try:
            title = f"{config.model} on {config.dataset}"
            plots.plot_curves(workdir / plots.HISTORY_FILE, workdir / plots.CURVES_FILE, title=title)
        except Exception as e:  # Plotting must never fail a finished run.
            logging.warning("Could not draw the curves: %s", e)
    writer.close()
    logging.info(
        "Done (%s): step %d, final top-1 %s, best top-1 %s, %.1f s.", status, final_step,
        f"{last_eval['accuracy']:.4f}" if last_eval else "-", f"{best['accuracy']:.4f}" if best["step"] >= 0 else "-",
        wall,
    )  # fmt: skip
    return summary


__all__ = [
    "train_and_evaluate",
    "validate_config",
    "validate_image_size",
]
