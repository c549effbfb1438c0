"""Checkpoints of cvt-flax: model checkpoints, train-state checkpoints, init_from and the resume order.

* **Model checkpoints** (`save_model`, `load_model`, `model_from_info`): the variables of a CvT plus a
  description of the model; what ``python -m cvt_flax.convert`` and the end of every run write.
* **Train-state checkpoints** (`Checkpoints`): Orbax checkpoints of the whole train state in
  ``<workdir>/checkpoints/<step>``, the last few plus the best by eval accuracy.
* **init_from** (`load_init_from`, `check_pretrained`, `merge_pretrained`, `apply_init_from`): pretrained
  variables checked against the model (all but the classifier head, `models.weights.CLASSIFIER`) and copied in.
* **Where a run starts** (`restore_or_initialize`): latest checkpoint, else init_from, else scratch.

A model checkpoint is a directory::

    DIR/model.json    # format, variant, full CvTSpec, num_classes, act, source, ...
    DIR/variables/    # Orbax checkpoint of {'params', 'batch_stats'}

It is what ``python -m cvt_flax.convert`` writes and what fine-tuning can start
from. Restoring needs no model (the variables come back as a raw numpy
pytree); `model_from_info` then builds the matching module::

    variables, info = load_model("/tmp/cvt13")
    model = model_from_info(info)
    logits = model.apply(variables, images)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers

from cvt_flax import errors, param_groups, paths, sharding
from cvt_flax.errors import UserError
from cvt_flax.models import weights

if TYPE_CHECKING:
    from cvt_flax.train_utils import TrainState
else:
    TrainState = Any

PyTree = Any
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
MODEL_DIR = "model"

FORMAT = "cvt-flax-model"
FORMAT_VERSION = 1
INFO_FILE = "model.json"
VARIABLES_DIR = "variables"
COLLECTIONS = ("params", "batch_stats")
_HOW_TO_MAKE = (
    "Make one with `python -m cvt_flax.convert --input CHECKPOINT.pth --output DIR` (official microsoft/CvT or "
    "HuggingFace weights) or `cvt_flax.checkpoint.save_model(DIR, variables, info)`."
)


def _to_numpy_tree(tree: Any) -> Any:
    """Nested mappings (dict/FrozenDict) of arrays -> plain dicts of numpy arrays."""
    if isinstance(tree, Mapping):
        return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


def _json_ready(info: Mapping[str, Any]) -> dict[str, Any]:
    from cvt_flax.models.spec import CvTSpec

    out = dict(info)
    if isinstance(out.get("spec"), CvTSpec):
        out["spec"] = out["spec"].to_dict()
    return out


@contextlib.contextmanager
def full_disk_is_user_error(message: Callable[[], str]) -> Iterator[None]:
    """A full disk in the block (an Orbax save) becomes one `UserError` of ``message()``.

    The tracebacks that Orbax's writer threads print after such a failure are held back (`errors.held_stderr`).
    """
    try:
        with errors.held_stderr(drop_if=_is_disk_full):
            yield
    except Exception as e:
        if not _is_disk_full(e):
            raise
        raise UserError(message()) from e


def save_model(
    directory: str | os.PathLike,
    variables: Mapping[str, Any],
    model_info: Mapping[str, Any],
    *,
    overwrite: bool = True,
) -> epath.Path:
    """Writes a model checkpoint (Orbax variables + ``model.json``).

    With several processes (`jax.distributed`), every process must call it (Orbax's save is collective); process 0
    alone writes ``model.json``.

    Args:
      directory: Output directory (created; parents too), local or ``gs://``.
      variables: ``{'params': ..., 'batch_stats': ...}`` (jax or numpy arrays;
        other collections are ignored; ``batch_stats`` may be absent).
      model_info: Description of the model; must hold ``spec`` (a `CvTSpec` or
        its ``to_dict()``) and ``num_classes``; usually also ``variant``, ``act``
        and ``source_file``. ``format``/``format_version`` are added.
      overwrite: Replace an existing checkpoint in ``directory``; if False, an
        existing one raises.

    Returns:
      The checkpoint directory.

    Raises:
      ValueError: when ``params`` or the spec/num_classes are missing.
      FileExistsError: when a checkpoint exists and ``overwrite`` is False.
    """
    import orbax.checkpoint as ocp

    directory = paths.as_path(directory)
    if "params" not in variables:
        raise ValueError(f"save_model needs variables with a 'params' collection; got {sorted(variables)}.")
    info = _json_ready(model_info)
    missing = [k for k in ("spec", "num_classes") if k not in info]
    if missing:
        raise ValueError(
            f"model_info lacks {missing}; give at least the CvTSpec ('spec', spec.to_dict()) and 'num_classes' "
            "so that the model can be rebuilt."
        )
    info.setdefault("act", "quick_gelu")
    info.update(format=FORMAT, format_version=FORMAT_VERSION)
    target = directory / VARIABLES_DIR
    if target.exists() and not overwrite:
        raise FileExistsError(f"{directory} already holds a model checkpoint; pass overwrite=True to replace it.")
    if jax.process_index() == 0:
        paths.makedirs(directory)
    tree = {c: _to_numpy_tree(variables.get(c, {})) for c in COLLECTIONS}
    # Orbax writes into a temporary directory and renames it when complete (on Cloud Storage: writes in place and
    # marks the end with commit_success.txt).
    with full_disk_is_user_error(
        lambda: (
            f"No space left on the device of {directory} while writing the model there. Free space there or "
            "choose another --workdir, then restart the same command; the checkpoints already saved stay restorable."
        )
    ):
        ocp.PyTreeCheckpointer().save(target, tree, force=True)
        # model.json is written last (atomically), so its presence marks a complete checkpoint.
        if jax.process_index() == 0:
            paths.write_text(directory / INFO_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return directory


def read_model_info(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads ``model.json`` of a model checkpoint.

    Raises:
      FileNotFoundError: when ``directory`` is missing or is not a cvt-flax model
        checkpoint (says what was expected and how to make one).
    """
    directory = paths.as_path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"No cvt-flax model checkpoint at {directory}: the directory does not exist. {_HOW_TO_MAKE}"
        )
    info_file = directory / INFO_FILE
    if not info_file.is_file():
        hint = ""
        if any(p.suffix in (".pth", ".bin", ".safetensors", ".pt") for p in directory.iterdir()):
            hint = " It holds PyTorch weights: convert them first."
        elif any(p.name.isdigit() or p.name.startswith("checkpoint") for p in directory.iterdir()):
            hint = " It looks like a training checkpoint directory, which the training code restores itself."
        raise FileNotFoundError(
            f"{directory} is not a cvt-flax model checkpoint: expected {INFO_FILE} and {VARIABLES_DIR}/ "
            f"(an Orbax checkpoint of params and batch_stats).{hint} {_HOW_TO_MAKE}"
        )
    info = json.loads(info_file.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(
            f"{info_file} is not a cvt-flax model description (format {info.get('format')!r}). {_HOW_TO_MAKE}"
        )
    if info.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(
            f"{info_file} has format_version {info['format_version']}, newer than this cvt-flax understands "
            f"({FORMAT_VERSION}); update cvt-flax."
        )
    return info


def load_model(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores a model checkpoint written by `save_model` (no model needed).

    Args:
      directory: The checkpoint directory.

    Returns:
      ``(variables, info)``: ``{'params', 'batch_stats'}`` as nested dicts of
      numpy arrays, and the ``model.json`` dict.

    Raises:
      FileNotFoundError: for a missing directory or one that is not a cvt-flax
        model checkpoint, naming what was expected and how to make one.
    """
    import orbax.checkpoint as ocp

    directory = paths.as_path(directory)
    info = read_model_info(directory)
    target = directory / VARIABLES_DIR
    if not target.is_dir():
        raise FileNotFoundError(
            f"{directory} has {INFO_FILE} but no {VARIABLES_DIR}/ (an incomplete or damaged checkpoint). {_HOW_TO_MAKE}"
        )
    try:
        with errors.quiet_reader_threads(), _quiet_failed_reads():
            restored = ocp.PyTreeCheckpointer().restore(target)
    except Exception as e:  # noqa: BLE001 - model.json was readable: the array files are at fault
        raise DamagedCheckpointError(target, e) from e
    variables = {c: _to_numpy_tree(restored.get(c, {}) or {}) for c in COLLECTIONS}
    return variables, info


def model_from_info(info: Mapping[str, Any], **kwargs: Any) -> Any:
    """Builds the `cvt_flax.models.CvT` described by a ``model.json`` dict.

    Args:
      info: The dict from `load_model` / `read_model_info` (``spec``,
        ``num_classes``, ``act``).
      **kwargs: Passed to `cvt_flax.models.create_model`, overriding the stored
        values (e.g. ``dtype='bfloat16'``, ``attention_impl='xla'``,
        ``drop_path_rate=(0, 0, 0.2)``; ``num_classes``/``act`` too).

    Returns:
      The (uninitialised) Flax module.
    """
    from cvt_flax.models import CvTSpec, create_model

    spec = info["spec"]
    spec = spec if isinstance(spec, CvTSpec) else CvTSpec.from_dict(spec)
    kwargs.setdefault("num_classes", int(info["num_classes"]))
    kwargs.setdefault("act", info.get("act", "quick_gelu"))
    return create_model(spec, **kwargs)


def load_pretrained(directory: str | os.PathLike, **kwargs: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """`load_model` plus `model_from_info`: returns ``(model, variables, info)``."""
    variables, info = load_model(directory)
    return model_from_info(info, **kwargs), variables, info


# ----------------------------------------------------------------------------- train-state checkpoints


def _state_dict(state: TrainState) -> dict[str, Any]:
    d = flax.serialization.to_state_dict(state)
    if d.get("ema_params") is None:
        d.pop("ema_params", None)
    return d


class DamagedCheckpointError(UserError):
    """A checkpoint whose files cannot be read back (truncated, missing or corrupt)."""

    def __init__(self, path: epath.PathLike, cause: Any, message: str | None = None):
        self.path = epath.Path(path)
        reason = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(cause)
        first = reason.strip().splitlines()[0] if reason.strip() else ""
        super().__init__(message or f"The checkpoint {self.path} is damaged and cannot be restored ({first[:300]}).")


class CheckpointMismatchError(UserError):
    """A readable checkpoint written by another model or optimizer setting than this config's."""


@contextlib.contextmanager
def _quiet_failed_reads() -> Any:
    """Silences the echoes of a failed Orbax read (the first error is raised and reported once).

    Orbax reads arrays in parallel asyncio tasks: when one fails (a damaged file), the others' errors would be
    printed as "Task exception was never retrieved" and "Exception ignored in: <coroutine ...>" tracebacks, one
    per array.
    """
    import asyncio  # noqa: F401 - the logger exists once asyncio is imported
    import gc
    import logging as std_logging

    logger = std_logging.getLogger("asyncio")
    level, hook = logger.level, sys.unraisablehook
    logger.setLevel(std_logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = hook
        logger.setLevel(level)


def _is_disk_full(err: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) is a full disk, however Orbax or TensorStore wrap it."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err) or "RESOURCE_EXHAUSTED" in str(err) and "space" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _dir_size(path: epath.Path) -> int:
    return sum(p.stat().length for p in paths.files_under(path)) if path.is_dir() else 0


class Checkpoints:
    """Orbax checkpoints of the train state: the last ``keep`` plus the best by eval accuracy.

    One `ocp.CheckpointManager` with a preservation policy that keeps a checkpoint
    when either ``LatestN(keep)`` or ``BestN(accuracy, n=1)`` keeps it. Saves are
    asynchronous and atomic (temporary directory, renamed when complete; on Cloud
    Storage, written in place and marked complete by ``commit_success.txt``). Every
    process of a multi-process run takes part in each save and restore.

    The state is replicated; Orbax's default "replica-parallel" writing would cut
    every array into one slice per device with eager ops (seconds per save for a
    few hundred arrays on 8 devices), so the first replica writes whole arrays.
    """

    def __init__(self, directory: str | os.PathLike, keep: int):
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=max(1, int(keep))),
                checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m["accuracy"], reverse=False, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True, create=True)
        self.directory = paths.as_path(directory)
        registry = ocp.type_handlers.create_type_handler_registry(
            (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False))
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "meta"),
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None when there is none)."""
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, meta: Mapping[str, Any], metrics: Mapping[str, float] | None):
        """Starts an asynchronous save (waits for the previous one first)."""
        self._state_bytes = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(_state_dict(state)))
        with self._disk_errors(step):
            self._save(step, state, meta, metrics)

    @contextlib.contextmanager
    def _disk_errors(self, step: int | None = None) -> Any:
        """Turns a full disk during a save into one message naming the folder and the space a checkpoint needs."""

        def message() -> str:
            steps = [s for s in self.all_steps() if s != step]
            need = _dir_size(self.directory / str(steps[-1])) if steps else getattr(self, "_state_bytes", 0)
            kept = (
                f"the checkpoints already saved (steps {steps}) stay restorable" if steps else "no checkpoint existed"
            )
            return (
                f"No space left on the device of {self.directory} while saving "
                f"{'step ' + str(step) if step is not None else 'a checkpoint'} (a checkpoint needs about "
                f"{need / 2**20:.1f} MiB). Free space there or choose another --workdir, then restart the same "
                f"command; {kept}."
            )

        with full_disk_is_user_error(message):
            yield

    def _save(self, step: int, state: TrainState, meta: Mapping[str, Any], metrics: Mapping[str, float] | None):
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(_state_dict(state)), meta=ocp.args.JsonSave(dict(meta))),
            metrics=dict(metrics) if metrics else None,
            force=True,
        )

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(int(x) for x in self.manager.all_steps())

    def _stored_shapes(self, step: int) -> dict[str, tuple[int, ...]] | None:
        """``{path: shape}`` of the arrays a checkpoint holds, from its metadata (None when that is unreadable)."""
        try:
            tree = self.manager.item_metadata(step)["state"]
            tree = getattr(tree, "tree", tree)
            return {
                param_groups.path_name(path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            }
        except Exception:  # noqa: BLE001 - unreadable metadata means a damaged checkpoint
            return None

    def restore(
        self,
        step: int,
        abstract_state: TrainState,
        sharding: jax.sharding.Sharding,
        expected: Mapping[str, Any] | None = None,
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restores ``step`` into the structure of ``abstract_state`` (shapes only), placed with ``sharding``.

        Args:
          step: The checkpoint step.
          abstract_state: The train state's structure (``jax.eval_shape`` of its init).
          sharding: Where the restored arrays go (replicated on the mesh).
          expected: Model description of this run (``variant``, ``num_classes``,
            ``spec``); a checkpoint written for another model is refused up front.

        Raises:
          CheckpointMismatchError: the checkpoint was written by another model or optimizer setting.
          DamagedCheckpointError: the checkpoint's files cannot be read (truncated, missing, corrupt).
        """
        fix = (
            "Resume with the config that wrote it, or start this config in a new --workdir (use "
            "--config.init_from to start from those weights)."
        )
        where = f"The checkpoint at step {step} in {self.directory}"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            meta = dict(meta or {})
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpointError(self.directory / str(step), e) from e
        for key in ("variant", "num_classes", "spec"):
            if expected and key in meta and key in expected and _arch(meta[key]) != _arch(expected[key]):
                raise CheckpointMismatchError(
                    f"{where} was written for {key} {_arch(meta[key])!r}, but this config has "
                    f"{_arch(expected[key])!r}. {fix}"
                )
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _state_dict(abstract_state)
        )
        state_dir = self.directory / str(step) / "state"
        if not (state_dir / "_METADATA").exists():
            # Without its index Orbax sees an empty tree, which would pass for a checkpoint of another structure.
            missing = f"{state_dir / '_METADATA'} (the index of its arrays) is missing"
            raise DamagedCheckpointError(state_dir.parent, missing)
        stored = self._stored_shapes(step)
        if not stored:
            raise DamagedCheckpointError(self.directory / str(step), "its array metadata cannot be read")
        wanted = {param_groups.path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
        if stored != wanted:
            groups = sorted({k.split("/")[0] for k in set(stored) ^ set(wanted)} |
                            {k.split("/")[0] for k in set(stored) & set(wanted) if stored[k] != wanted[k]})  # fmt: skip
            raise CheckpointMismatchError(
                f"{where} holds a train state of another structure ({', '.join(groups)} differ: another optimizer, "
                f"gradient clipping or EMA setting than this config's?). {fix}"
            )
        try:
            with _quiet_failed_reads():
                restore_args = ocp.checkpoint_utils.construct_restore_args(target)
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(target, restore_args=restore_args))
                )
        except Exception as e:  # noqa: BLE001 - the structure matches, so the files are at fault
            raise DamagedCheckpointError(self.directory / str(step), e) from e
        state_dict = {"ema_params": None, **restored["state"]}  # _state_dict drops an absent EMA
        state = flax.serialization.from_state_dict(abstract_state, state_dict)
        return state, meta

    def restore_latest_intact(
        self,
        abstract_state: TrainState,
        sharding: jax.sharding.Sharding,
        expected: Mapping[str, Any] | None = None,
    ) -> tuple[TrainState, dict[str, Any], int] | None:
        """Restores the newest checkpoint that reads back; damaged newer ones are moved aside, never deleted.

        A damaged checkpoint (a truncated or missing file) gets a warning naming it and is moved to
        ``<workdir>/damaged_checkpoints/<step>`` (so that the resumed run can save that step again); the next
        older one is tried.

        Returns:
          ``(state, meta, step)``, or None when there is no checkpoint at all.

        Raises:
          CheckpointMismatchError: a readable checkpoint of another model or optimizer setting.
          DamagedCheckpointError: every checkpoint is damaged (the message lists them).
        """
        steps = self.all_steps()
        damaged: list[DamagedCheckpointError] = []
        # The reader threads of a failed read print a traceback per array still in flight: into error.log.
        log = None if paths.is_remote(self.directory) else self.directory.parent / "error.log"
        with errors.quiet_reader_threads(log_file=log) as held:
            for step in reversed(steps):
                try:
                    state, meta = self.restore(step, abstract_state, sharding, expected)
                except DamagedCheckpointError as err:
                    logging.warning("%s", err)
                    damaged.append(err)
                    held.linger = True
                    continue
                self._move_aside(damaged)
                return state, meta, step
        if damaged:
            listing = "\n  ".join(str(d) for d in damaged)
            raise DamagedCheckpointError(
                self.directory,
                "all damaged",
                f"{self.directory}: none of its {len(damaged)} checkpoints can be restored:\n  {listing}\nNothing "
                "was deleted. Start the run in a new --workdir, or remove the damaged step folders to start this one "
                "afresh.",
            )
        return None

    def _move_aside(self, damaged: list[DamagedCheckpointError]) -> None:
        """Process 0 moves the damaged step folders aside; every process then re-reads the step list."""
        if not damaged:
            return
        if jax.process_index() == 0:
            self._move(damaged)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("cvt_flax_move_damaged_checkpoints")
        self.manager.reload()

    def _move(self, damaged: list[DamagedCheckpointError]) -> None:
        aside = self.directory.parent / DAMAGED_DIR
        for err in damaged:
            target = aside / err.path.name
            try:
                paths.makedirs(aside)
                if target.exists():
                    target = aside / f"{err.path.name}.{int(time.time())}"
                paths.rename(err.path, target)
                logging.warning("Moved the damaged checkpoint %s to %s (not deleted).", err.path, target)
            except OSError as e:
                logging.warning("Could not move the damaged checkpoint %s aside (%s).", err.path, e)

    def wait(self) -> None:
        """Blocks until pending saves are complete."""
        with self._disk_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        with self._disk_errors():
            self.manager.close()


def _arch(value: Any) -> Any:
    """A spec dict without its regularisation rates (they may change between runs); other values unchanged."""
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if k not in ("drop_rate", "attn_drop_rate", "drop_path_rate")}
    return value


def restore_raw(step_dir: epath.Path) -> dict[str, Any]:
    """Restores a training checkpoint's ``state`` item as numpy arrays (no target, no devices)."""
    item = step_dir / "state"
    ckptr = ocp.PyTreeCheckpointer()
    try:
        with errors.quiet_reader_threads(), _quiet_failed_reads():
            meta = ckptr.metadata(item)
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            return ckptr.restore(item, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:  # noqa: BLE001 - a finalized checkpoint that does not read back
        raise DamagedCheckpointError(step_dir, e) from e


def _numeric_dirs(path: epath.Path) -> list[int]:
    """Steps of the complete train-state checkpoints in ``path`` (on Cloud Storage, unfinished ones are skipped)."""
    if not path.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in path.iterdir()
        if p.name.isdigit() and p.is_dir() and (p / "state").is_dir() and ocp.step.is_checkpoint_finalized(p)
    )


INIT_FROM_HELP = (
    "Point --config.init_from at a cvt-flax workdir, one of its checkpoints/<step> directories, a model "
    "directory with model.json (from `python -m cvt_flax.convert --input WEIGHTS --output DIR`), or a HuggingFace "
    "hub id such as microsoft/cvt-13 (downloaded and converted once, see cvt_flax.pretrained)."
)


def load_init_from(path: str) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """Loads ``{'params', 'batch_stats'}`` (numpy) and a description of the model from ``init_from``.

    Args:
      path: A cvt-flax workdir (its latest checkpoint; else its ``model/``), a
        ``checkpoints`` directory, one ``checkpoints/<step>`` directory, a model
        directory with ``model.json`` (converted official/HF weights), or a
        HuggingFace hub id (``microsoft/cvt-13``; `cvt_flax.pretrained.resolve_hub`).

    Returns:
      ``(variables, info)``; ``info`` has what is known about the architecture
      (``spec``, ``num_classes``, ``act``, ``variant``/``model``, ``source``).

    Raises:
      ValueError: when the path holds none of these.
    """
    p = paths.as_path(path)
    if not p.exists():
        from cvt_flax import pretrained

        if not pretrained.looks_like_hub_id(path):
            raise ValueError(f"--config.init_from={path!r} does not exist. {INIT_FROM_HELP}")
        p = pretrained.resolve_hub(path)  # the converted model directory (PretrainedError says the fix)

    def from_step_dir(step_dir: epath.Path) -> tuple[dict[str, PyTree], dict[str, Any]]:
        raw = restore_raw(step_dir)
        meta_file = step_dir / "meta" / "metadata"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        variables = {"params": raw["params"], "batch_stats": raw.get("batch_stats") or {}}
        meta["source"] = str(step_dir)
        return variables, meta

    for ckpt_dir in (p / CHECKPOINT_DIR, p):
        steps = _numeric_dirs(ckpt_dir)
        if steps:
            return from_step_dir(ckpt_dir / str(steps[-1]))
    if (p / "state").is_dir():
        return from_step_dir(p)
    for model_dir in (p, p / MODEL_DIR):
        if (model_dir / "model.json").is_file():
            variables, info = load_model(model_dir)
            info = dict(info)
            info.setdefault("source", str(model_dir))
            return variables, info
    raise ValueError(f"--config.init_from={path!r} holds no cvt-flax checkpoint or model. {INIT_FROM_HELP}")


def _describe(info: Mapping[str, Any]) -> str:
    name = info.get("variant") or info.get("model")
    spec = info.get("spec")
    parts = []
    if name:
        parts.append(f"model {name!r}")
    elif spec:
        keys = ("dim_embed", "depth", "num_heads", "patch_size", "patch_stride")
        parts.append("spec " + ", ".join(f"{k}={spec.get(k)}" for k in keys if k in spec))
    if "num_classes" in info:
        parts.append(f"{info['num_classes']} classes")
    return ", ".join(parts) or "an unknown architecture"


def _flat_variables(tree: Mapping[str, PyTree]) -> dict[str, Any]:
    return traverse_util.flatten_dict({c: dict(tree.get(c) or {}) for c in ("params", "batch_stats")}, sep="/")


def check_pretrained(
    target: Mapping[str, PyTree],
    loaded: Mapping[str, PyTree],
    *,
    info: Mapping[str, Any] | None = None,
    model_name: str = "",
    head: str = weights.CLASSIFIER,
) -> bool:
    """Checks that pretrained variables fit the model (all but the classifier head).

    Args:
      target: ``{'params', 'batch_stats'}`` of the model being trained (arrays or
        ``jax.ShapeDtypeStruct``: only shapes are read).
      loaded: Pretrained ``{'params', 'batch_stats'}``.
      info: Description of the pretrained model (for the error message).
      model_name: ``config.model`` (for the error message).
      head: Top-level name of the classifier head.

    Returns:
      Whether the head must be re-initialised (its shapes differ, e.g. another
      class count, or the checkpoint has none).

    Raises:
      ValueError: naming the missing, unexpected and shape-mismatched paths when
        the architectures differ anywhere but the head, and how to fix it.
    """
    flat_t, flat_l = _flat_variables(target), _flat_variables(loaded)

    def is_head(key: str) -> bool:
        return key.split("/")[1] == head

    stem = f"params/{weights.FIRST_CONV}/kernel"
    chans = {k: tuple(np.shape(v) if isinstance(v, np.ndarray) else v.shape)[2:3] for k, v in
             (("model", flat_t.get(stem)), ("checkpoint", flat_l.get(stem))) if v is not None}  # fmt: skip
    head_keys = [k for k in flat_t if is_head(k)]
    head_ok = all(k in flat_l and tuple(np.shape(flat_l[k])) == tuple(flat_t[k].shape) for k in head_keys)
    missing = [k for k in flat_t if not is_head(k) and k not in flat_l]
    mismatched = [
        f"{k}: checkpoint {tuple(np.shape(flat_l[k]))} vs model {tuple(v.shape)}"
        for k, v in flat_t.items()
        if not is_head(k) and k in flat_l and tuple(np.shape(flat_l[k])) != tuple(v.shape)
    ]
    unexpected = [k for k in flat_l if k not in flat_t and not is_head(k)]
    if missing or mismatched or unexpected:

        def listing(items: list[str]) -> str:
            shown = "\n    ".join(items[:12])
            more = f"\n    ... and {len(items) - 12} more" if len(items) > 12 else ""
            return shown + more

        lines = [
            f"The init_from checkpoint ({_describe(info or {})}) does not match model {model_name!r} "
            f"({len(mismatched)} shape mismatches, {len(missing)} missing, {len(unexpected)} unexpected):"
        ]
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}):\n    {listing(mismatched)}")
        if missing:
            lines.append(f"  in the model but not in the checkpoint ({len(missing)}):\n    {listing(missing)}")
        if unexpected:
            lines.append(f"  in the checkpoint but not in the model ({len(unexpected)}):\n    {listing(unexpected)}")
        if len(chans) == 2 and chans["model"] != chans["checkpoint"]:
            lines.append(
                f"  The checkpoint takes {chans['checkpoint'][0]}-channel images, the model "
                f"{chans['model'][0]}: set --config.num_channels={chans['checkpoint'][0]}."
            )
        name = (info or {}).get("variant") or (info or {}).get("model")
        hint = f" (the checkpoint says {name!r})" if name else ""
        lines.append(
            f"Set --config.model to the checkpoint's architecture{hint}, or choose another --config.init_from."
        )
        raise ValueError("\n".join(lines))
    return not head_ok


def merge_pretrained(
    target: Mapping[str, PyTree],
    loaded: Mapping[str, PyTree],
    *,
    info: Mapping[str, Any] | None = None,
    model_name: str = "",
    head: str = weights.CLASSIFIER,
    new_head: bool = False,
    skip: Sequence[str] = (),
) -> tuple[dict[str, PyTree], bool]:
    """Copies pretrained variables into freshly initialised ones, keeping the fresh head when it differs.

    Args:
      target: Fresh ``{'params', 'batch_stats'}`` of the model being trained (numpy).
      loaded: Pretrained ``{'params', 'batch_stats'}``.
      info: Description of the pretrained model (for error messages).
      model_name: ``config.model`` (for error messages).
      head: Top-level name of the classifier head.
      new_head: Keep the fresh head even when the pretrained one fits (a new task with as many classes).
      skip: Regular expressions; variables whose name (``params/stage2/blocks_0/mlp/fc1/kernel``,
        ``batch_stats/...``) matches one in full keep their fresh initialisation (as big_vision's ``dont_load``).

    Returns:
      ``(variables, head_reinitialised)``; values take ``target``'s dtypes.

    Raises:
      ValueError: as `check_pretrained`, or a ``skip`` pattern that is not a regular expression or matches
        no variable.
    """
    head_reinit = check_pretrained(target, loaded, info=info, model_name=model_name, head=head) or new_head
    flat_t, flat_l = _flat_variables(target), _flat_variables(loaded)
    patterns = param_groups.parse_patterns(skip, option="--config.init_from_skip")
    for p in patterns:
        if not any(p.fullmatch(k) for k in flat_t):
            raise ValueError(
                f"--config.init_from_skip: {p.pattern!r} matches no variable of {model_name or 'the model'}; names "
                f"look like {sorted(flat_t)[0]!r} (a full match, e.g. 'params/stage2/.*')."
            )
    out = {}
    for k, v in flat_t.items():
        keep_fresh = (head_reinit and k.split("/")[1] == head) or any(p.fullmatch(k) for p in patterns)
        out[k] = np.asarray(v) if keep_fresh else np.asarray(flat_l[k]).astype(np.asarray(v).dtype)
    return traverse_util.unflatten_dict(out, sep="/"), head_reinit


def apply_init_from(
    config: ml_collections.ConfigDict,
    state: TrainState,
    mesh: Any,
    loaded: Mapping[str, PyTree],
    info: Mapping[str, Any],
) -> TrainState:
    """Copies checked pretrained variables into a freshly initialised state (new head when needed)."""
    target = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    skip = [p.strip() for p in param_groups.split_patterns(str(config.init_from_skip)) if p.strip()]
    merged, head_reinit = merge_pretrained(
        target, loaded, info=info, model_name=config.model, new_head=bool(config.new_head), skip=skip
    )
    if skip:
        logging.info("init_from: kept the fresh initialisation of the variables matching %s.", ", ".join(skip))
    act = info.get("act")
    if act and act != config.act:
        logging.warning(
            "init_from was trained with activation %r but --config.act=%r; the weights fit but the function "
            "differs. Set --config.act=%s to fine-tune the same network.",
            act, config.act, act,
        )  # fmt: skip
    if head_reinit:
        logging.info(
            "init_from: new classifier head (checkpoint: %s classes, now %s%s).",
            info.get("num_classes", "?"), merged["params"][weights.CLASSIFIER]["kernel"].shape[-1],
            "; --config.new_head" if config.new_head else "",
        )  # fmt: skip
    merged = sharding.replicate(merged, mesh)
    state = state.replace(params=merged["params"], batch_stats=merged.get("batch_stats", {}))
    if state.ema_params is not None:
        state = state.replace(ema_params=merged["params"])
    logging.info("Initialised from %s (%s).", info.get("source", config.init_from), _describe(info))
    return state


def export_model(directory: str | os.PathLike, state: TrainState, model_info: Mapping[str, Any]) -> None:
    """Writes a run's final model (eval variables) as a model checkpoint, for `init_from` and inference."""
    variables = jax.device_get(state.eval_variables())
    save_model(directory, variables, {**model_info, "source": "cvt-flax training", "step": int(state.step)})
    logging.info("Exported the final model to %s.", directory)


# ----------------------------------------------------------------------------- where a run starts


def run_model_info(
    config: ml_collections.ConfigDict, spec: Any, num_classes: int, dataset_info: Any = None
) -> dict[str, Any]:
    """The model description a run stores with its checkpoints and exported model.

    With ``dataset_info`` (`cvt_flax.data.DatasetInfo`) it also holds the class names and the eval preprocessing
    (`cvt_flax.metadata.run_metadata`), so that the exported model predicts named classes from image files.
    """
    info = {
        "variant": config.model,
        "model": config.model,
        "spec": spec.to_dict(),
        "num_classes": int(num_classes),
        "act": config.act,
        "image_size": int(config.image_size),
        "dataset": config.dataset,
    }
    if dataset_info is not None:
        from cvt_flax import metadata

        info.update(metadata.run_metadata(config, dataset_info))
    return info


@dataclasses.dataclass
class Start:
    """Where a run starts: its state, the best eval so far, and where the state came from.

    Attributes:
      state: The train state (replicated on the mesh).
      best: ``{'accuracy', 'step'}`` of the best evaluation so far (-1 when none).
      source: ``'checkpoint'``, ``'init_from'`` or ``'scratch'``.
      path: The checkpoint directory or init_from source (None from scratch).
      source_step: The training step the weights come from (the checkpoint's, or init_from's when known).
    """

    state: TrainState
    best: dict[str, Any]
    source: str
    path: str | None = None
    source_step: int | None = None


def restore_or_initialize(
    config: ml_collections.ConfigDict,
    program: Any,
    mesh: Any,
    ckpts: Checkpoints | None,
    workdir: str | os.PathLike,
) -> Start:
    """Restores or initialises the train state, in the resume order of `cvt_flax.train`.

    1. The latest checkpoint in ``<workdir>/checkpoints``: the full train state (step, parameters, optimizer
       state, BatchNorm statistics, EMA) and the best eval accuracy so far.
    2. Else ``config.init_from``: parameters and BatchNorm statistics, checked against the model before anything
       is compiled; the classifier head is re-initialised when the class count differs. Optimizer and step fresh.
    3. Else from scratch (``config.seed``), unless the config requires init_from (fine-tuning configs).

    Args:
      config: The run config.
      program: The run's `train_utils.TrainProgram` (init function, abstract state, model).
      mesh: The device mesh.
      ckpts: The workdir's `Checkpoints` (None: the workdir has none, e.g. an eval-only run that creates nothing).
      workdir: The workdir (for messages).

    Returns:
      The `Start`.

    Raises:
      ValueError: eval_only or require_init_from without weights; a checkpoint of another model; an init_from
        that does not fit (naming the paths).
    """
    rep = sharding.replicated_sharding(mesh)
    latest = ckpts.latest_step() if ckpts is not None else None
    if config.eval_only and latest is None and not config.init_from:
        raise UserError(
            f"--config.eval_only=True needs weights: {workdir} has no checkpoint and --config.init_from is empty. "
            f"{INIT_FROM_HELP}"
        )
    if ckpts is not None and latest is not None:
        expected = run_model_info(config, program.model.spec, program.num_classes)
        found = ckpts.restore_latest_intact(program.abstract_state, rep, expected=expected)
        if found is not None:
            state, meta, step = found
            best = {"accuracy": float(meta.get("best_accuracy", -1.0)), "step": int(meta.get("best_step", -1))}
            path = str(ckpts.directory / str(step))
            logging.info("Resumed from %s at step %d.", path, int(state.step))
            return Start(state, best, "checkpoint", path, int(state.step))
    best = {"accuracy": -1.0, "step": -1}
    if config.init_from:
        # Load and check the architecture before compiling anything (mismatches fail fast).
        loaded, init_info = load_init_from(config.init_from)
        abstract = program.abstract_state
        check_pretrained(
            {"params": abstract.params, "batch_stats": abstract.batch_stats}, loaded, info=init_info,
            model_name=config.model,
        )  # fmt: skip
        state = apply_init_from(config, program.init_state(program.init_rng), mesh, loaded, init_info)
        step = init_info.get("step")
        source = str(init_info.get("source", config.init_from))
        return Start(state, best, "init_from", source, int(step) if step is not None else None)
    if config.require_init_from:
        raise UserError(
            f"This config fine-tunes a pretrained model but --config.init_from is empty and {workdir} has no "
            f"checkpoint to resume. {INIT_FROM_HELP}"
        )
    logging.info("Starting from scratch (seed %d).", config.seed)
    return Start(program.init_state(program.init_rng), best, "scratch")


# ----------------------------------------------------------------------------- resuming with a changed config

CONFIG_FILE = "config.json"
# Fields that define what the checkpoint holds: a change cannot resume (another model, data or state layout).
IDENTITY_FIELDS = ("model", "dataset", "train_split", "image_size", "num_channels", "act", "optimizer")
# Fields that only steer the run or its implementation: free to change between restarts.
FREE_FIELDS = (
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "max_train_seconds",
    "eval_only", "profile", "eval_batch_size", "eval_split", "data_dir", "download", "input.prefetch",
    "input.cache", "attention_impl", "depthwise_impl", "remat", "scan_blocks", "rng_impl", "dtype", "init_from",
    "require_init_from", "allow_recipe_change", "compilation_cache_dir", "log_grad_norm",
)  # fmt: skip


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, list[tuple[str, Any, Any]]]:
    """Differences between a workdir's saved config and this run's, by kind.

    Returns:
      ``{'identity': [...], 'recipe': [...], 'free': [...]}`` of ``(field, saved, current)``. ``identity``: the
      model, data or train-state layout changed (`IDENTITY_FIELDS`; EMA, gradient clipping or layer decay
      switched on or off, or another ``freeze``, which change the optimizer state); ``free``: run control and
      implementation (`FREE_FIELDS`), and fields the saved config does not have (added to cvt-flax after that
      run started);
      ``recipe``: everything else (schedule, optimisation, augmentation, regularisation, seed).
    """
    a, b = _flat(saved), _flat(current)
    out: dict[str, list[tuple[str, Any, Any]]] = {"identity": [], "recipe": [], "free": []}
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key), b.get(key)
        if old == new:
            continue
        toggled = key in ("ema_decay", "grad_clip_norm") and (float(old or 0) > 0) != (float(new or 0) > 0)
        # The optimizer state's layout follows the frozen set and whether layer decay is on.
        toggled = toggled or (key == "freeze" and (old or "") != (new or ""))
        toggled = toggled or (key == "layer_decay" and (0 < float(old or 0) < 1) != (0 < float(new or 0) < 1))
        if key in IDENTITY_FIELDS or toggled:
            kind = "identity"
        elif key in FREE_FIELDS or key not in a:  # not in the saved config: a field added to cvt-flax since
            kind = "free"
        else:
            kind = "recipe"
        out[kind].append((key, old, new))
    return out


def _listing(changes: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {old!r} -> {new!r}" for k, old, new in changes)


def check_resume_config(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, step: int, num_train_examples: int
) -> None:
    """Compares this run's config with the one saved in the workdir before resuming at ``step``.

    The rule (README, "Resuming"): a change of model, data or train-state layout cannot resume (an error lists
    the differences); a change of the training recipe (epochs, steps, batch size, learning rate, schedule,
    optimizer settings, augmentation, regularisation, seed) resumes only with ``--config.allow_recipe_change=True``
    and then prints the new schedule; run-control and implementation fields (logging, evaluation and checkpoint
    intervals, eval split, data_dir, dtype, attention kernel, ...) change freely.

    Raises:
      CheckpointMismatchError: identity changes.
      UserError: recipe changes without ``allow_recipe_change``.
    """
    path = paths.as_path(workdir) / CONFIG_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logging.warning("Cannot read %s (%s); resuming without comparing configs.", path, e)
        return
    changes = config_changes(saved, config.to_dict())
    if changes["identity"]:
        raise CheckpointMismatchError(
            f"{workdir} holds a run of another model, data or optimizer state than this config "
            f"(saved in {path}):\n{_listing(changes['identity'])}\nResume with the saved config, or start this "
            "config in a new --workdir (--config.init_from=<this workdir> starts from its weights)."
        )
    if changes["recipe"]:
        from cvt_flax import train_utils as tu

        def schedule_of(cfg: ml_collections.ConfigDict) -> tuple[Any, Any]:
            run = tu.derive_run_length(cfg, num_train_examples)
            return run, tu.create_learning_rate_schedule(cfg, run)

        old_cfg = ml_collections.ConfigDict(saved)
        (old_run, old_lr), (new_run, new_lr) = schedule_of(old_cfg), schedule_of(config)
        plan = (
            f"At step {step} the learning rate was {float(old_lr(step)):.3g} and becomes {float(new_lr(step)):.3g}; "
            f"the run ends at step {new_run.total_steps} (was {old_run.total_steps})."
        )
        if not config.allow_recipe_change:
            raise UserError(
                f"{workdir} was trained to step {step} with another recipe (saved in {path}):\n"
                f"{_listing(changes['recipe'])}\n{plan}\nTo resume with the new values set "
                "--config.allow_recipe_change=True; to continue the saved run, use its config; to train this "
                "recipe from scratch, choose a new --workdir."
            )
        logging.warning("Resuming at step %d with a changed recipe:\n%s\n%s", step, _listing(changes["recipe"]), plan)
    if changes["free"]:
        logging.info("Changed since the last start (allowed):\n%s", _listing(changes["free"]))


def _config_text(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


def run_config_changed(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> bool:
    """Whether ``config`` differs from the workdir's ``config.json`` (True when there is none)."""
    path = paths.as_path(workdir) / CONFIG_FILE
    return not path.is_file() or path.read_text() != _config_text(config)


def save_run_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike, step: int) -> None:
    """Writes ``config.json`` (atomically), keeping a differing previous one as ``config.step<N>.json``."""
    path = paths.as_path(workdir) / CONFIG_FILE
    text = _config_text(config)
    if path.is_file():
        old = path.read_text()
        if old == text:
            return
        paths.write_text(path.with_name(f"config.step{step}.json"), old)
    paths.write_text(path, text)
