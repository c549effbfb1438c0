"""Global-array and prefetch helpers shared by the input pipelines (no TensorFlow)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

T = TypeVar("T")
DATA_AXIS = "data"


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading axis split over the mesh's 'data' axis (all axes if it has none)."""
    axis = DATA_AXIS if DATA_AXIS in mesh.axis_names else tuple(mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding over ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global arrays sharded over the batch axis (each process gives its rows)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate_numpy(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A numpy array identical on every process -> a replicated global array on every mesh device."""
    return jax.make_array_from_callback(x.shape, replicated(mesh), lambda index: x[index])


def prefetch(iterator: Iterable[T], size: int, transform: Callable[[Any], T] | None = None) -> Iterator[T]:
    """Yields ``transform(item)`` while keeping ``size`` transformed items in flight.

    With ``transform`` a host-to-device conversion (asynchronous in JAX), this overlaps the transfer of the
    next batches with the current step.
    """
    fn = transform or (lambda item: item)
    queue: collections.deque[T] = collections.deque()
    it = iter(iterator)
    for item in it:
        queue.append(fn(item))
        if len(queue) > max(size, 0):
            yield queue.popleft()
    while queue:
        yield queue.popleft()
