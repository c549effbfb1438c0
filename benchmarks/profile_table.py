"""A profile of a few steps (`jax.profiler`) and where their device time goes, as a text table.

    python -m benchmarks.profile_table TRACE_DIR [--top 40]      # table of an existing trace

`trace_steps` runs a step function under ``jax.profiler.trace`` (TensorBoard/XProf trace and a Chrome-format
``*.trace.json.gz``); `summarise` reads the Chrome-format trace and sums the time of the device's operations
(on GPUs the kernels of the ``/device:GPU:N`` streams; where no device stream exists, as on the CPU backend,
the host's XLA events) by operation and by kind (matmul, convolution, fusion, copy/transpose, reduction, ...),
and writes ``op_table.txt`` beside the trace. No TensorFlow or TensorBoard plugin needed.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

TABLE_FILE = "op_table.txt"
# (kind, substrings of a lower-cased kernel / op name); first match wins.
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention (cuDNN fused)", ("fmha", "flash", "cudnn_fused_mha", "__cudnn$fmha")),
    ("convolution", ("conv", "cudnn", "implicit_gemm", "dgrad", "wgrad", "fprop")),
    ("matmul", ("gemm", "cublas", "cutlass", "xmma", "sm90_", "sm80_", "dot", "matmul")),
    ("reduction", ("reduce", "reduction")),
    ("copy/transpose", ("transpose", "copy", "memcpy", "memset", "concatenate", "slice", "pad")),
    ("fusion (elementwise)", ("fusion", "loop_", "input_", "triton", "wrapped_")),
)
# Host events that are not XLA operations; "end: <op>" is the CPU runtime's second event of each operation
# (counting it would count every operation twice).
_HOST_SKIP = ("$", "PjitFunction", "PjRt", "Pjrt", "ParseArguments", "Handle ", "Wait for", "ThreadpoolListener",
              "PythonRefManager", "AllocateOutput", "CreateOutputs", "ExecuteHelper", "ExecutePrepare",
              "ThunkExecutor", "end: ")  # fmt: skip


def trace_steps(step: Callable[[], Any], sync: Callable[[Any], None], log_dir: str | pathlib.Path, steps: int) -> float:
    """Runs ``steps`` synchronised calls of ``step`` under ``jax.profiler.trace(log_dir)``; returns their seconds."""
    import jax

    sync(step())  # outside the trace: nothing left to compile
    with jax.profiler.trace(str(log_dir)):
        t0 = time.perf_counter()
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                sync(step())
        seconds = time.perf_counter() - t0
    pathlib.Path(log_dir, "steps.json").write_text(json.dumps({"steps": steps, "seconds": seconds}))
    return seconds


def kind_of(name: str) -> str:
    """The kind of an operation from its kernel or HLO name."""
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def _events(trace_file: pathlib.Path) -> tuple[list[dict[str, Any]], str]:
    with gzip.open(trace_file) as f:
        data = json.loads(f.read())
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, n in names.items() if n.startswith("/device:") and "CPU" not in n}
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if device_pids:
        return [e for e in spans if e["pid"] in device_pids], "device streams"
    threads = {
        (e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"
    }
    host = [
        e for e in spans
        if threads.get((e["pid"], e.get("tid")), "") != "python" and not e["name"].startswith(_HOST_SKIP)
    ]  # fmt: skip
    return host, "host XLA events (no device stream in this trace)"


def summarise(log_dir: str | pathlib.Path, top: int = 40) -> dict[str, Any]:
    """Sums the newest trace under ``log_dir`` by operation and kind; writes ``op_table.txt``; returns a digest.

    Returns:
      ``{'source', 'trace', 'steps', 'device_ms_per_step', 'kinds': {kind: ms per step}, 'table'}``, or
      ``{'error': ...}`` when there is no trace.
    """
    log_dir = pathlib.Path(log_dir)
    traces = sorted(log_dir.glob("plugins/profile/*/*.trace.json.gz"))
    if not traces:
        return {"error": f"no *.trace.json.gz under {log_dir}/plugins/profile"}
    events, source = _events(traces[-1])
    meta_file = log_dir / "steps.json"
    steps = json.loads(meta_file.read_text())["steps"] if meta_file.exists() else 1
    by_op: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        name = (e.get("args") or {}).get("hlo_op") or e["name"]
        by_op[name][0] += 1
        by_op[name][1] += float(e["dur"])
    total_us = sum(v[1] for v in by_op.values()) or 1.0
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, (_, us) in by_op.items():
        kinds[kind_of(name)] += us
    lines = [
        f"Trace: {traces[-1]}",
        f"Source: {source}; {steps} step(s); {total_us / 1e3 / steps:.3f} ms of operation time per step "
        "(summed over streams; overlapping kernels count twice); "
        f"{sum(v[0] for v in by_op.values()) / steps:.0f} operation calls per step",
        "",
        f"{'kind':28s} {'ms/step':>10s} {'share':>7s}",
    ]
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"{kind:28s} {us / 1e3 / steps:10.3f} {100 * us / total_us:6.1f}%")
    lines += ["", f"{'ms/step':>10s} {'share':>7s} {'calls/step':>10s}  {'kind':22s} operation"]
    for name, (count, us) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(
            f"{us / 1e3 / steps:10.3f} {100 * us / total_us:6.1f}% {count / steps:10.1f}  {kind_of(name):22s} "
            f"{name[:140]}"
        )
    table = "\n".join(lines) + "\n"
    (log_dir / TABLE_FILE).write_text(table)
    return {
        "source": source,
        "trace": str(traces[-1]),
        "steps": steps,
        "device_ms_per_step": total_us / 1e3 / steps,
        "kinds": {k: v / 1e3 / steps for k, v in kinds.items()},
        "table": str(log_dir / TABLE_FILE),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args(argv)
    digest = summarise(args.trace_dir, args.top)
    if "error" in digest:
        raise SystemExit(digest["error"])
    print(pathlib.Path(digest["table"]).read_text())


if __name__ == "__main__":
    main()
