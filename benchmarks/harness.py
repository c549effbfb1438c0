"""The one measurement harness of the benchmarks, for JAX and torch alike (no JAX or torch imports here).

A framework adapter (`Backend`) says how to wait for a result and how to read and reset the device's peak
memory; everything else is written once here: the timing loop (`measure`: compile, first step, warm-up, timed
steps, each synchronised), the per-phase record fields (`phase_fields`: images/s, TFLOP/s, model FLOP
utilisation), the largest-batch search (`find_max_batch`), the device peak table and the JSON/markdown helpers.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

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
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
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


# ----------------------------------------------------------------------------- measuring

_T0 = time.monotonic()


def progress(message: str) -> None:
    """One timestamped line on stderr (seconds since the process imported the harness), flushed at once.

    Every stage of a measurement reports itself, so that a run stopped by its time limit still shows where the
    time went (import, build, initialisation, compilation, first step, timed steps).
    """
    sys.stderr.write(f"[bench +{time.monotonic() - _T0:7.1f}s] {message}\n")
    sys.stderr.flush()


class Backend(Protocol):
    """What the harness needs of a framework on one device."""

    device_kind: str
    platform: str

    def sync(self, result: Any) -> None:
        """Blocks until ``result`` (what a step returned) is computed."""

    def reset_peak(self) -> None:
        """Resets the device's peak-memory counter where the framework can (XLA's cannot)."""

    def peak_bytes(self) -> int | None:
        """The device's peak bytes in use since the last reset (None when not reported)."""

    def free(self) -> None:
        """Releases cached device memory between measurements."""


@dataclasses.dataclass
class Phase:
    """One measured phase (training or inference) at one batch size.

    Attributes:
      batch: Images per step.
      times: Seconds of each timed step.
      compile_s: Explicit compile time (JAX: trace + lower + compile), or None where the first call compiles.
      first_step_s: Wall time of the first call (torch.compile compiles inside it).
      peak_bytes: Device peak bytes in use after the phase.
      memory_estimate: The executable's own memory need (XLA buffer assignment), where known.
      last: What the last step returned.
      minor_faults_per_step: Minor page faults of the whole process per timed step (host allocations that
        touch fresh memory; see `cvt_flax.hostmem`), where ``getrusage`` is available.
    """

    batch: int
    times: list[float]
    compile_s: float | None
    first_step_s: float
    peak_bytes: int | None
    memory_estimate: int | None = None
    last: Any = None
    minor_faults_per_step: float | None = None

    @property
    def step_s(self) -> float | None:
        """Median step time."""
        return median(self.times)

    @property
    def images_per_s(self) -> float | None:
        """Batch over the median step time."""
        sec = self.step_s
        return self.batch / sec if sec else None


def _minor_faults() -> int | None:
    """Minor page faults of this process so far (``getrusage``), or None where it is not available."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return None


def measure(
    step: Callable[[], Any],
    backend: Backend,
    *,
    batch: int,
    warmup: int,
    steps: int,
    compile_fn: Callable[[], Any] | None = None,
    memory_estimate: Callable[[], int | None] | None = None,
) -> Phase:
    """Times a step: optional explicit compile, the first call, ``warmup - 1`` more untimed calls, ``steps`` timed.

    Every call is synchronised with ``backend.sync`` (so a step's time is its whole device time), and the
    median of the timed calls is what `Phase.images_per_s` reports.

    Args:
      step: Runs one step and returns something to synchronise on (it may update state it closes over).
      backend: The framework adapter.
      batch: Images per step.
      warmup: Untimed calls (the first call included).
      steps: Timed calls.
      compile_fn: Compiles ahead of the first call (JAX's ``lower().compile()``); None where the first call
        compiles (torch.compile) or nothing compiles (eager).
      memory_estimate: Returns the executable's memory need after compiling (optional).

    Returns:
      The `Phase`.
    """
    backend.reset_peak()
    compile_s = None
    if compile_fn is not None:
        progress(f"compiling (batch {batch})")
        t0 = time.perf_counter()
        compile_fn()
        compile_s = time.perf_counter() - t0
        progress(f"compiled in {compile_s:.1f} s")
    t0 = time.perf_counter()
    last = step()
    backend.sync(last)
    first_step_s = time.perf_counter() - t0
    progress(f"first step {first_step_s:.2f} s; {max(0, warmup - 1)} warm-up + {steps} timed steps")
    for _ in range(max(0, warmup - 1)):
        last = step()
        backend.sync(last)
    times = []
    faults0 = _minor_faults()
    for _ in range(steps):
        t0 = time.perf_counter()
        last = step()
        backend.sync(last)
        times.append(time.perf_counter() - t0)
    faults1 = _minor_faults()
    progress(f"median step {1e3 * median(times):.2f} ms" if times else "no timed steps")
    return Phase(
        batch=batch,
        times=times,
        compile_s=compile_s,
        first_step_s=first_step_s,
        peak_bytes=backend.peak_bytes(),
        memory_estimate=memory_estimate() if memory_estimate else None,
        last=last,
        minor_faults_per_step=(faults1 - faults0) / steps if steps and faults0 is not None else None,
    )


def phase_fields(prefix: str, phase: Phase, flops_per_image: float, peak: float | None) -> dict[str, Any]:
    """The record fields of a phase: ``{prefix}_step_s``, ``_images_per_s``, ``_compile_s``, ``mfu_{prefix}``..."""
    ips = phase.images_per_s
    return {
        f"{prefix}_step_s": phase.step_s,
        f"{prefix}_step_s_all": phase.times,
        f"{prefix}_images_per_s": ips,
        f"{prefix}_compile_s": phase.compile_s,
        f"{prefix}_first_step_s": phase.first_step_s,
        f"{prefix}_peak_bytes_in_use": phase.peak_bytes,
        f"{prefix}_memory_estimate_bytes": phase.memory_estimate,
        f"{prefix}_minor_faults_per_step": phase.minor_faults_per_step,
        f"{prefix}_tflops_per_s": flops_per_image * ips / 1e12 if ips else None,
        f"mfu_{prefix}": mfu(flops_per_image, ips, peak),
    }


def find_max_batch(
    images_per_s_at: Callable[[int], float | None],
    start: int,
    limit: int,
    *,
    known: list[dict[str, Any]] | None = None,
    cleanup: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Doubles the training batch from ``start`` until the device runs out of memory or ``limit`` is passed.

    Args:
      images_per_s_at: Builds, compiles and times the train step at a batch size; raises on out-of-memory.
      start: First batch to try (when ``known`` has no fitting batch).
      limit: Largest batch tried.
      known: Tries already made (the benchmark's own batch, which fits); the search goes on after them.
      cleanup: Frees device memory after each try.

    Returns:
      ``{'max_train_batch': largest batch that ran (None if even the first failed), 'tries': [{'batch', 'fits',
      'images_per_s' | 'error'}], 'limit'}``.

    Raises:
      Exception: whatever a try raises other than out-of-memory.
    """
    tries: list[dict[str, Any]] = list(known or [])
    best = max((t["batch"] for t in tries if t["fits"]), default=None)
    batch = start if best is None else 2 * best
    while batch <= limit:
        try:
            ips = images_per_s_at(batch)
            tries.append({"batch": batch, "fits": True, "images_per_s": ips})
            best = batch
        except Exception as err:  # noqa: BLE001 - only OOM is expected; anything else is re-raised
            if not is_oom(err):
                raise
            tries.append({"batch": batch, "fits": False, "error": str(err).splitlines()[0][:300]})
            break
        finally:
            gc.collect()
            if cleanup:
                cleanup()
        batch *= 2
    return {"max_train_batch": best, "tries": tries, "limit": limit}


def base_record(
    framework: str,
    mode: str,
    workload: Any,
    backend: Backend,
    *,
    train_flops_per_image: float,
    inference_flops_per_image: float,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    """The fields every record has, whatever the framework (``workload``: a `benchmarks.recipe.Workload`)."""
    peak, peak_src = peak_tflops_for(backend.device_kind, peak_tflops)
    return {
        "framework": framework,
        "mode": mode,
        "model": workload.model,
        "image_size": workload.image_size,
        "num_classes": workload.num_classes,
        "dtype": workload.dtype,
        "act": workload.act,
        "recipe": workload.recipe,
        "train_batch": workload.train_batch,
        "infer_batch": workload.infer_batch,
        "steps": workload.steps,
        "warmup": workload.warmup,
        "device_kind": backend.device_kind,
        "platform": backend.platform,
        "train_flops_per_image": train_flops_per_image,
        "inference_flops_per_image": inference_flops_per_image,
        "peak_tflops": peak,
        "peak_tflops_source": peak_src,
    }


def finish_record(rec: dict[str, Any]) -> dict[str, Any]:
    """Adds ``peak_bytes_in_use`` (the larger of the phases') to a record."""
    peaks = [rec.get(k) for k in ("train_peak_bytes_in_use", "infer_peak_bytes_in_use")]
    rec["peak_bytes_in_use"] = max((v for v in peaks if v is not None), default=None)
    return rec
