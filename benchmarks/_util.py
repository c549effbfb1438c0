"""Helpers shared by the benchmarks (no JAX or torch imports at module level)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# Dense bf16 peak TFLOP/s per accelerator, matched as a lower-case substring of the device kind (first match
# wins, so more specific names come first). JAX's device_kind: "NVIDIA H100 80GB HBM3", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB", "TPU v4", "TPU v5 lite" (v5e), "TPU v5" (v5p); torch.cuda.get_device_name() agrees
# for GPUs. CPUs have no entry: model FLOP utilisation is then not reported (pass --peak-tflops to force one).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("gh200", 989.0),
    ("h200", 989.0),
    ("a100", 312.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
)

OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemory", "OOM")


def peak_tflops_for(device_kind: str | None, override: float | None = None) -> tuple[float | None, str]:
    """Peak dense bf16 TFLOP/s of a device and where the number came from.

    Args:
      device_kind: The device's name (``jax.devices()[0].device_kind`` or ``torch.cuda.get_device_name()``).
      override: A user-given peak (``--peak-tflops``); wins when not None.

    Returns:
      ``(peak or None, source)``; None for devices without an entry (CPUs).
    """
    if override is not None and override > 0:
        return float(override), "--peak-tflops"
    kind = (device_kind or "").lower()
    for key, value in PEAK_BF16_TFLOPS:
        if key in kind:
            return value, f"table ({key}: bf16 dense)"
    return None, f"no entry for device kind {device_kind!r}"


def mfu(flops_per_image: float, images_per_s: float | None, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation: achieved model FLOP/s over the device's peak (None when unknown)."""
    if not peak_tflops or not images_per_s:
        return None
    return flops_per_image * images_per_s / (peak_tflops * 1e12)


def median(xs: Sequence[float]) -> float | None:
    """Median of a sequence (None when empty)."""
    return float(statistics.median(xs)) if xs else None


def time_calls(fn: Callable[[], Any], sync: Callable[[Any], Any], warmup: int, steps: int) -> list[float]:
    """Times ``steps`` calls of ``fn`` (after ``warmup`` untimed ones), each synchronised with ``sync``.

    Args:
      fn: Runs one step and returns something ``sync`` can wait on.
      sync: Blocks until the result of ``fn`` is computed (``block_until_ready``, ``cuda.synchronize``).
      warmup: Untimed calls first.
      steps: Timed calls.

    Returns:
      Seconds of each timed call.
    """
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return times


def is_oom(err: BaseException) -> bool:
    """Whether an exception is an accelerator out-of-memory error (XLA RESOURCE_EXHAUSTED, CUDA OOM)."""
    text = f"{type(err).__name__}: {err}"
    return any(m in text for m in OOM_MARKERS)


def host_info() -> dict[str, Any]:
    """Python, OS and CPU facts for the JSON record."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: str | None, payload: Any) -> None:
    """Writes ``payload`` as indented JSON to ``path`` (creating folders); no-op for None/empty."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")


def fmt(x: Any, digits: int = 1) -> str:
    """Formats a number for tables ('-' for None)."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def gib(x: float | None) -> str:
    """Bytes as GiB with two decimals ('-' for None)."""
    return "-" if x is None else f"{x / 2**30:.2f}"


def pct(x: float | None) -> str:
    """A fraction as a percentage ('-' for None)."""
    return "-" if x is None else f"{100 * x:.1f}%"
