"""Accelerators that XLA compiles for without having them: GPU target configs and TPU topologies by name.

    h100, h200            one NVIDIA GPU, from the GpuTargetConfig text protos in benchmarks/gpu_targets/
    v5e:2x2  v6e:2x2      one TPU host of 4 chips
    v4:2x2x1              one TPU v4 host of 4 chips (megacore: one device per chip)
    v5e:4x4               a 16-chip TPU v5e pod slice on 4 hosts
    cpu:N                 N devices of this host's CPU (XLA_FLAGS=--xla_force_host_platform_device_count=N)
    attached              the devices JAX finds (a real GPU or TPU: compile times then include autotuning)

GPU and TPU targets give compile-only devices (`jax.experimental.topologies.get_topology_desc`; the jax CUDA
plugin or libtpu must be installed: ``requirements-compile-only.txt``); programs are lowered and compiled for
them exactly as for real ones but cannot run. Chip facts (HBM per chip, dense bf16 peak) are the vendors'
published figures, cited per target. No JAX import at module level.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

GPU_TARGET_DIR = pathlib.Path(__file__).resolve().parent / "gpu_targets"
GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Target:
    """A named compile target.

    Attributes:
      name: The name used on the command line.
      platform: ``gpu``, ``tpu``, ``cpu`` or ``attached``.
      chips: Devices of the mesh (one per chip).
      hosts: Processes a real run of the target would have (one per host).
      hbm_bytes: Memory per chip (None: unknown, e.g. the host CPU).
      peak_bf16_tflops: Dense bf16 peak per chip (None: unknown).
      topology: TPU topology name (``v5e:2x2``) or the GPU target-config file.
      topology_kwargs: Further arguments of ``get_topology_desc``.
      source: Where the chip facts come from.
    """

    name: str
    platform: str
    chips: int
    hosts: int = 1
    hbm_bytes: int | None = None
    peak_bf16_tflops: float | None = None
    topology: str = ""
    topology_kwargs: tuple[tuple[str, Any], ...] = ()
    source: str = ""

    @property
    def compile_only(self) -> bool:
        """True for targets whose devices are not here (GPU/TPU by name)."""
        return self.platform in ("gpu", "tpu")

    def environment(self) -> dict[str, str]:
        """Environment a child process that compiles for this target needs (before importing jax)."""
        env: dict[str, str] = {}
        if self.compile_only:
            # No real accelerator client: the host is the default backend, the target's devices compile-only.
            env["JAX_PLATFORMS"] = "cpu"
        if self.platform == "gpu":
            # Without a device, XLA's Triton GEMM emitter cannot pick tile sizes (it autotunes them on the device:
            # "Couldn't find output tile sizes"); GEMMs go to cuBLAS instead, as they do on the device for most
            # shapes after autotuning.
            env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
        if self.platform == "cpu":
            flags = os.environ.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={self.chips}".strip()
            env["JAX_PLATFORMS"] = "cpu"
        return env

    def devices(self) -> list[Any]:
        """The target's devices (compile-only ones for GPU/TPU targets)."""
        import jax

        if self.platform in ("cpu", "attached"):
            devices = jax.devices()
            return devices[: self.chips] if self.platform == "cpu" else devices
        from jax.experimental import topologies

        if self.platform == "gpu":
            text = (GPU_TARGET_DIR / self.topology).read_text()
            return list(topologies.get_topology_desc(platform="cuda", target_config=text, topology="1x1x1").devices)
        return list(topologies.get_topology_desc(self.topology, "tpu", **dict(self.topology_kwargs)).devices)

    def describe(self) -> str:
        """One line: chips, hosts, memory."""
        mem = f", {self.hbm_bytes / GIB:.0f} GiB per chip" if self.hbm_bytes else ""
        return f"{self.name}: {self.chips} chip(s) on {self.hosts} host(s){mem}"


_TPU_SOURCE = "Google Cloud TPU documentation, system architecture pages (HBM per chip, peak bf16 per chip)"
TARGETS: dict[str, Target] = {
    "h100": Target(
        "h100", "gpu", 1, 1, 84_929_347_584, 989.0, "h100.txtpb",
        source="gpu_targets/h100.txtpb (device memory); NVIDIA H100 SXM datasheet: 989 dense bf16 TFLOP/s",
    ),
    "h200": Target(
        "h200", "gpu", 1, 1, 150_754_820_096, 989.0, "h200.txtpb",
        source="gpu_targets/h200.txtpb (device memory); NVIDIA H200 datasheet: 989 dense bf16 TFLOP/s",
    ),
    "v5e:2x2": Target("v5e:2x2", "tpu", 4, 1, 16 * GIB, 197.0, "v5e:2x2", source=_TPU_SOURCE),
    "v5e:4x4": Target("v5e:4x4", "tpu", 16, 4, 16 * GIB, 197.0, "v5e:4x4", source=_TPU_SOURCE),
    "v4:2x2x1": Target(
        "v4:2x2x1", "tpu", 4, 1, 32 * GIB, 275.0, "v4:2x2x1", (("chip_config_name", "megacore"),),
        source=_TPU_SOURCE,
    ),
    "v6e:2x2": Target("v6e:2x2", "tpu", 4, 1, 32 * GIB, 918.0, "v6e:2x2", source=_TPU_SOURCE),
}  # fmt: skip
DEFAULT_TARGETS = ("h100", "h200", "v5e:2x2", "v5e:4x4", "v4:2x2x1", "v6e:2x2")


def get_target(name: str) -> Target:
    """The `Target` called ``name`` (also ``cpu:N`` and ``attached``).

    Raises:
      ValueError: an unknown name (the message lists the known ones).
    """
    if name in TARGETS:
        return TARGETS[name]
    if name == "attached":
        return Target("attached", "attached", 0)
    if name.startswith("cpu:") and name[4:].isdigit() and int(name[4:]) > 0:
        return Target(name, "cpu", int(name[4:]))
    raise ValueError(f"Unknown target {name!r}; choose from {', '.join(TARGETS)}, cpu:N or attached.")
