"""Input pipelines of cvt-flax (the data API contract: notes/DATA_CONTRACT.md).

    >>> from cvt_flax import data
    >>> info = data.get_dataset_info(config)
    >>> train_iter = data.create_train_iterator(config, mesh, seed=config.seed, start_step=step)
    >>> for batch in data.create_eval_iterator(config, mesh): ...
    >>> images, targets = data.mix_batch(rng, images, onehot, config.aug)   # inside the jitted step

``config.input.pipeline`` picks the implementation: 'tfdata' (TFDS + tf.data on the host,
:mod:`cvt_flax.data.tfdata`) or 'device' (``tfds.data_source`` read once, augmentation in JAX on the
accelerators, :mod:`cvt_flax.data.device`). Importing this package does not import TensorFlow; only the
'tfdata' pipeline does, when it is used.
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
    name = str(config.input.get("pipeline", "tfdata"))
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

    The last batch is padded and ``mask`` (bool [B]) marks the real examples; every example appears exactly once
    over all processes. ``B = config.eval_batch_size``.
    """
    return _pipeline(config).create_eval_iterator(config, mesh)
