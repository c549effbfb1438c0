"""Meshes, shardings and global arrays: the one home of how cvt-flax lays data over devices.

Training runs ``jax.jit`` over a one-axis `jax.sharding.Mesh` (``'data'``) spanning every device of every
process: batches are global arrays split along their leading (batch) axis, the train state is replicated,
and XLA inserts the gradient all-reduce (BatchNorm statistics therefore cover the global batch, as in
synchronised BatchNorm). The input pipelines build their global batches with `to_global` (each process gives
its own rows) and overlap host-to-device copies with `prefetch`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

T = TypeVar("T")
PyTree = Any
DATA_AXIS = "data"


def create_mesh(devices: Iterable[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh (``'data'``) over all global devices (every host's), or over ``devices``."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of the train state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of batches: the leading axis split over the mesh's ``'data'`` axis (all axes if it has none)."""
    axis = DATA_AXIS if DATA_AXIS in mesh.axis_names else tuple(mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axis))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places host arrays (identical on every process) replicated on the mesh; a single array works too.

    Works with several processes (each one provides its addressable copies), unlike ``jax.device_put`` of host
    data onto non-addressable devices.
    """
    sharding = replicated_sharding(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global arrays sharded over the batch axis (each process gives its rows)."""
    sharding = data_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def check_batch_size(
    batch_size: int, what: str, num_devices: int | None = None, process_count: int | None = None
) -> int:
    """Checks that a global batch divides over the devices and processes; returns the per-process batch.

    Args:
      batch_size: The global batch.
      what: The config field (for the message), e.g. ``batch_size``.
      num_devices: Devices it is split over (default: all global devices).
      process_count: Processes (default: ``jax.process_count()``).

    Raises:
      ValueError: It does not; the message names the nearest valid sizes.
    """
    num_devices = jax.device_count() if num_devices is None else int(num_devices)
    process_count = jax.process_count() if process_count is None else int(process_count)
    batch_size = int(batch_size)
    unit = int(np.lcm(num_devices, process_count))
    if batch_size <= 0 or batch_size % unit:
        lo = max(unit, batch_size // unit * unit)
        raise ValueError(
            f"--config.{what}={batch_size} must be a positive multiple of the device count ({num_devices}) and the "
            f"process count ({process_count}); use e.g. --config.{what}={lo} or {lo + unit}."
        )
    return batch_size // process_count


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
