"""Input pipelines of cvt-flax.

    >>> from cvt_flax import data
    >>> info = data.get_dataset_info(config)
    >>> train_iter = data.create_train_iterator(config, mesh, seed=config.seed, start_step=step)
    >>> eval_batches = data.create_eval_iterator(config, mesh)  # once per run
    >>> for batch in eval_batches: ...                            # one pass per evaluation
    >>> images, targets = data.mix_batch(rng, images, onehot, config.aug)   # inside the jitted step

``config.input.pipeline`` picks the implementation: 'tfdata' (TFDS + tf.data on the host,
:mod:`cvt_flax.data.tfdata`) or 'device' (``tfds.data_source`` read once, augmentation in JAX on the
accelerators, :mod:`cvt_flax.data.device`). Importing this package does not import TensorFlow; only the
'tfdata' pipeline does, when it is used.

The contract both pipelines keep:

* Config: they read a full run config (``configs.default.get_config()`` plus overrides); every default lives
  in ``configs/default.py``.
* `get_dataset_info` checks that the dataset is known and prepared and returns its `DatasetInfo`; a dataset
  that cannot be used raises `DatasetError` (a ValueError) whose message says the fix (how to prepare it, which
  split or field to set).
* Train batches: ``{'image': float32 [B, S, S, C], 'label': int32 [B]}`` with ``B = config.batch_size``,
  ``S = config.image_size``, ``C = DatasetInfo.channels``, images normalised by ``config.input.normalization``;
  global `jax.Array`s sharded over the mesh's 'data' axis. The iterator is infinite and shuffles afresh every
  epoch when ``config.input.shuffle_buffer > 1`` ('device': a full permutation; 'tfdata': a buffer of that many
  examples over each process's share of the split).
* Determinism and resume: batch ``k`` is a pure function of (config, seed, k), so ``start_step=k`` continues
  exactly where a run from step 0 was at step ``k``.
* Augmentation: both pipelines run the same train policy, :mod:`cvt_flax.data.policy` (settings, constants and
  step order), with their own kernels; they share the policy, not their random streams, so the two pipelines
  give different batches for the same seed.
* Eval: `create_eval_iterator` returns a re-iterable meant to be built once per run; each ``iter()`` is one
  pass over ``config.eval_split`` in batches ``{'image', 'label', 'mask'}`` of ``B = config.eval_batch_size``.
  The last batches are padded and ``mask`` (bool [B]) marks the real examples; every example appears exactly
  once over all processes. Eval images are resized, or centre-cropped (``config.aug.eval_crop``), and
  normalised; nothing random.
* Mixup / CutMix are not part of the input pipeline: `mix_batch` runs inside the jitted train step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import jax
from jax.sharding import Mesh

from cvt_flax.data.info import (
    IMAGE_FOLDER,
    KNOWN_DATASETS,
    DatasetError,
    DatasetInfo,
    get_dataset_info,
)
from cvt_flax.data.mix import mix_batch

__all__ = [
    "IMAGE_FOLDER",
    "KNOWN_DATASETS",
    "DatasetError",
    "DatasetInfo",
    "create_eval_iterator",
    "create_train_iterator",
    "get_dataset_info",
    "mix_batch",
]

_PIPELINES = ("tfdata", "device")


def _pipeline(config: Any):
    name = str(config.input.pipeline)
    if name == "tfdata":
        try:
            from cvt_flax.data import tfdata
        except ImportError as e:
            raise ImportError(
                f"config.input.pipeline='tfdata' needs TensorFlow ({e}). Install it (`pip install tensorflow-cpu`) "
                "or use --config.input.pipeline=device (tfds.data_source + JAX, no TensorFlow)."
            ) from e
        return tfdata
    if name == "device":
        from cvt_flax.data import device

        return device
    raise ValueError(f"Unknown config.input.pipeline={name!r}; use one of {_PIPELINES}.")


def create_train_iterator(
    config: Any, mesh: Mesh, seed: int | None = None, start_step: int = 0
) -> Iterator[dict[str, jax.Array]]:
    """Infinite iterator of global train batches {'image': f32 [B, S, S, C], 'label': int32 [B]}.

    Batches are sharded over the mesh's 'data' axis (``B = config.batch_size``). Batch ``k`` is a pure function of
    (config, seed, k): ``start_step=k`` yields exactly the batches a start at 0 yields from position ``k`` on.

    Args:
      config: Run config.
      mesh: Device mesh (axis 'data').
      seed: Seed of data order and augmentation (default ``config.seed``).
      start_step: Index of the first batch (for resuming).

    Returns:
      An iterator of dicts of global `jax.Array`s.
    """
    return _pipeline(config).create_train_iterator(config, mesh, seed=seed, start_step=start_step)


def create_eval_iterator(config: Any, mesh: Mesh) -> Iterable[dict[str, jax.Array]]:
    """Re-iterable eval batches {'image', 'label', 'mask'}; each ``iter()`` is one pass over ``config.eval_split``.

    Build it once per run and iterate it at every evaluation (building it reads the split and compiles the
    preprocessing; with ``config.input.cache`` later passes read the cache). The last batch is padded and
    ``mask`` (bool [B]) marks the real examples; every example appears exactly once over all processes.
    ``B = config.eval_batch_size``.

    Args:
      config: Run config.
      mesh: Device mesh (axis 'data').

    Returns:
      A re-iterable of dicts of global `jax.Array`s (``len()`` is the number of batches of a pass).
    """
    return _pipeline(config).create_eval_iterator(config, mesh)
