"""Compile-only report: the training loop's programs compiled for GPUs and TPUs that are not here.

    python -m benchmarks.compile_only                                   # every default target, ours and plain
    python -m benchmarks.compile_only --targets h100,v5e:2x2 --json r.json --markdown r.md
    python -m benchmarks.compile_only --targets v5e:4x4 --programs ours --model cvt_w24 --image-size 384 \
        --recipe configs/imagenet.py:variant=w24,res=384 --global-batch 1024 --parts train --max-batch
    python -m benchmarks.compile_only --targets attached                # on a real GPU/TPU: autotuning included

For each target (`benchmarks.targets`: ``h100``, ``h200``, ``v5e:2x2``, ``v5e:4x4``, ``v4:2x2x1``, ``v6e:2x2``,
``cpu:N``, ``attached``) and program, a child process builds the program for the target's mesh and runs
``jit(...).trace``, ``.lower`` and ``.compile`` of its init, train and eval functions, timing each stage:

* ``ours``: `cvt_flax.train_utils.build_program` of the recipe config (default ``configs/imagenet.py:variant=13``),
  the very object `cvt_flax.train` trains with, resolved for the mesh's devices (depthwise implementation,
  compile options, init placement), not for this host;
* ``plain``: `benchmarks.plain_cvt`, the same model written straightforwardly (``jax.jit(model.init)`` on the
  mesh, ``optax.adamw``, no recipe extras), compiled the same way at the same moment, as the baseline of every
  ratio.

Per program and part: trace / lower / compile seconds, StableHLO operations of the lowered module, kernels of the
optimized HLO (`benchmarks.hlo_stats`: fusions + custom calls, cuDNN/cuBLAS calls, random-number arithmetic),
``memory_analysis`` per chip (arguments + outputs - donated + temporaries) against the chip's HBM, and the
compiler's own cost estimate. All of it is **compile-only**: nothing ran on the target; GPU compiles skip
autotuning (it needs the device) and are made with ``--xla_gpu_enable_triton_gemm=false``; compile times are this
host's CPU. Only ``init`` of ours runs (on the host CPU, as in training), so its run time is measured. The
estimated time to first step is build + init + train-step trace/lower/compile.

``--max-batch``: the largest global batch whose train step fits the chip's memory (compiled at two batch sizes,
extrapolated linearly in the batch, then checked by compiling at the answer and one chip-multiple above).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

from benchmarks import hlo_stats
from benchmarks.recipe import dataset_classes, load_config, parse_sets
from benchmarks.targets import DEFAULT_TARGETS, GIB, get_target

PROGRAMS = ("ours", "plain")
PARTS = ("init", "train", "eval")
DEFAULT_RECIPE = "configs/imagenet.py:variant=13"
# Per-chip batch when none is given: the figures (H100 128, TPU v5e 2x2 global 256).
DEFAULT_BATCH_PER_CHIP = {"gpu": 128, "tpu": 64, "cpu": 4, "attached": 128}
LABEL = "compile-only (nothing ran on the target; compile times are this host's CPU)"


# ----------------------------------------------------------------------------- the child: one program, one target


def _config(spec: dict[str, Any]) -> Any:
    config = load_config(spec["recipe"])
    config.model = spec["model"]
    config.image_size = int(spec["image_size"])
    config.batch_size = int(spec["global_batch"])
    config.eval_batch_size = int(spec["eval_batch"])
    config.dtype = spec["dtype"]
    config.num_channels = 3
    config.num_train_steps = 10_000
    for key, value in spec.get("sets", {}).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"--set {key}: the config has no field {key!r} (see configs/default.py).")
        old = node[leaf]
        if isinstance(old, bool):
            node[leaf] = str(value).lower() in ("1", "true", "yes")
        else:
            node[leaf] = type(old)(value) if old is not None else value
    return config


def _memory(compiled: Any, hbm: int | None) -> dict[str, Any]:
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - not every backend has it
        return {"error": str(e)[:200]}
    if m is None:
        return {}
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    out["need"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    if hbm:
        out["hbm"] = int(hbm)
        out["fits"] = out["need"] <= hbm
    return out


def _cost(compiled: Any) -> dict[str, Any]:
    try:
        c = compiled.cost_analysis()
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)[:200]}
    if isinstance(c, list):
        c = c[0] if c else {}
    out = {k: float(c[k]) for k in ("flops", "bytes accessed", "optimal_seconds", "transcendentals") if k in (c or {})}
    if "optimal_seconds" in out and out["optimal_seconds"] < 0:
        out["optimal_seconds_invalid"] = True  # the TPU cost model returns negative values for some programs
    return out


def _compile(
    fn: Any, args: tuple[Any, ...], hbm: int | None, run: bool = False, dump: str | None = None
) -> dict[str, Any]:
    """Trace, lower and compile ``fn(*args)`` with timings and counts; ``run``: also execute it once.

    ``dump``: write the optimized HLO text to this file.
    """
    t0 = time.perf_counter()
    traced = fn.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    rec: dict[str, Any] = {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0}
    mlir = lowered.as_text()
    rec["stablehlo_ops"] = hlo_stats.stablehlo_op_count(mlir)
    m = re.search(r"module @([\w.\-]+)", mlir)
    rec["module"] = m.group(1) if m else None
    hlo = compiled.as_text()
    if dump:
        with open(dump, "w") as f:
            f.write(hlo)
    try:
        rec.update(hlo_stats.kernel_stats(hlo))
    except Exception as e:  # noqa: BLE001 - an unexpected HLO dialect must not lose the timings
        rec["kernel_stats_error"] = str(e)[:200]
    rec["memory"] = _memory(compiled, hbm)
    rec["cost_estimate"] = _cost(compiled)
    if run:
        import jax

        t4 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        rec["run_s"] = time.perf_counter() - t4
        rec["total_s"] += rec["run_s"]
    rec["_compiled"] = compiled
    return rec


def _time_steps(compiled: Any, state: Any, batch: Any, steps: int, warmup: int = 2) -> dict[str, Any]:
    """Median seconds of ``steps`` train steps (state threaded through, each step synchronised); measured."""
    import jax
    import numpy as np

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"steps": steps, "step_s": float(np.median(times)), "min_step_s": float(min(times))}
    with contextlib.suppress(Exception):
        out["peak_bytes_in_use"] = int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
    return out


def _real_batch(mesh: Any, batch: int, size: int, num_classes: int) -> dict[str, Any]:
    import numpy as np

    from cvt_flax import sharding as sh

    rng = np.random.default_rng(0)
    host = {
        "image": rng.standard_normal((batch, size, size, 3), dtype=np.float32),
        "label": rng.integers(0, num_classes, (batch,), dtype=np.int32),
    }
    return sh.to_global(host, mesh)


def _abstract(tree: Any, sharding: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _batch(mesh: Any, batch: int, size: int, eval_: bool = False) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from cvt_flax import sharding as sh

    dat = sh.data_sharding(mesh)
    out = {
        "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=dat),
        "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=dat),
    }
    if eval_:
        out["mask"] = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=dat)
    return out


def run_child(spec: dict[str, Any], cold: bool = True) -> dict[str, Any]:
    """Compiles one program for one target as ``spec`` says (in this process); returns its record.

    ``cold``: switch JAX's persistent compilation cache off first, so that every figure is a full compile (the
    child processes of the report do; a caller in a process of its own may keep it).
    """
    import jax

    if cold:
        jax.config.update("jax_enable_compilation_cache", False)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from cvt_flax import sharding as sh

    target = get_target(spec["target"])
    t0 = time.perf_counter()
    devices = target.devices()
    mesh = Mesh(__import__("numpy").array(devices), (sh.DATA_AXIS,))
    hbm = target.hbm_bytes
    if target.platform == "attached":
        with contextlib.suppress(Exception):
            hbm = int(devices[0].memory_stats()["bytes_limit"])
    rec: dict[str, Any] = {
        "target": target.name,
        "program": spec["program"],
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "chips": len(devices),
        "processes": len({d.process_index for d in devices}),
        "hbm_bytes": hbm,
        "global_batch": int(spec["global_batch"]),
        "topology_s": time.perf_counter() - t0,
        "jax_version": jax.__version__,
    }
    config = _config(spec)
    num_classes = dataset_classes(config)
    size, batch = config.image_size, config.batch_size
    rep = NamedSharding(mesh, PartitionSpec())
    parts = spec.get("parts", list(PARTS))
    # Steps that really run (a real accelerator only: `attached`), timed after the compile.
    run_steps = int(spec.get("run_steps", 0)) if target.platform in ("attached", "cpu") else 0
    dump_dir = spec.get("dump_hlo")

    def dump(part: str) -> str | None:
        if not dump_dir:
            return None
        os.makedirs(dump_dir, exist_ok=True)
        return os.path.join(dump_dir, f"{target.name.replace(':', '_')}_{spec['program']}_{part}.hlo.txt")

    t0 = time.perf_counter()
    if spec["program"] == "ours":
        from cvt_flax import train_utils as tu

        program = tu.build_program(config, mesh, num_classes=num_classes, in_chans=3, num_train_examples=batch * 10)
        rec["build_s"] = time.perf_counter() - t0
        rec["num_params"] = program.num_params
        rec["choices"] = dict(getattr(program, "choices", {}) or {})
        state = _abstract(program.abstract_state, rep)
        host_init = getattr(program, "host_init", None)
        if "init" in parts:
            if host_init is not None:  # initialised on the host CPU in parallel parts, then placed (training's path)
                t1 = time.perf_counter()
                host_init(program.init_rng)  # compiles its parts and runs them
                rec["init"] = {
                    "trace_s": 0.0,  # traced once with the program (build_s), for the state's shapes too
                    "lower_s": 0.0,
                    "compile_s": host_init.timings["compile_s"],
                    "run_s": 0.0,  # included: each part runs as soon as it is compiled
                    "total_s": time.perf_counter() - t1,
                    "parts": host_init.parts,
                }
                rec["init"]["where"] = "host cpu"
            else:
                rec["init"] = _compile(program.init_state, (program.init_rng,), hbm, dump=dump("init"))
                rec["init"]["where"] = "mesh"
        if "train" in parts:
            rec["train"] = _compile(program.train_step, (state, _batch(mesh, batch, size)), hbm, dump=dump("train"))
            if run_steps:
                real = program.init_state(program.init_rng)
                rec["train"]["measured"] = _time_steps(
                    rec["train"]["_compiled"], real, _real_batch(mesh, batch, size, num_classes), run_steps
                )
        if "eval" in parts:
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            eval_batch = _batch(mesh, config.eval_batch_size, size, True)
            rec["eval"] = _compile(program.eval_step, (variables, eval_batch), hbm, dump=dump("eval"))
    elif spec["program"] == "plain":
        from benchmarks import plain_cvt
        from cvt_flax import models

        p = plain_cvt.make_programs(
            models.get_spec(config.model), num_classes, mesh, image_size=size, dtype=models.as_dtype(config.dtype)
        )
        rec["build_s"] = time.perf_counter() - t0
        state = _abstract(p["abstract_state"], rep)
        rec["num_params"] = sum(int(__import__("numpy").prod(x.shape)) for x in jax.tree.leaves(state.params))
        if "init" in parts:
            rec["init"] = _compile(p["init"], (jax.random.PRNGKey(0),), hbm, dump=dump("init"))
            rec["init"]["where"] = "mesh"
        if "train" in parts:
            rec["train"] = _compile(p["train"], (state, _batch(mesh, batch, size)), hbm, dump=dump("train"))
            if run_steps:
                real = p["init"](jax.random.PRNGKey(0))
                rec["train"]["measured"] = _time_steps(
                    rec["train"]["_compiled"], real, _real_batch(mesh, batch, size, num_classes), run_steps
                )
        if "eval" in parts:
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            eval_batch = _batch(mesh, config.eval_batch_size, size, True)
            rec["eval"] = _compile(p["eval"], (variables, eval_batch), hbm, dump=dump("eval"))
    else:
        raise ValueError(f"Unknown program {spec['program']!r}; choose from {PROGRAMS}.")
    rec["time_to_first_step_s"] = rec["build_s"] + sum(rec[k]["total_s"] for k in ("init", "train") if k in rec)
    for part in PARTS:
        if part in rec:
            rec[part].pop("_compiled", None)
            m = rec[part].get("measured")
            if m:
                m["images_per_s"] = batch / m["step_s"]
    return rec


# ----------------------------------------------------------------------------- the parent: children, tables


def run_spec(spec: dict[str, Any], timeout_s: float, log_path: str | None = None) -> dict[str, Any]:
    """Runs `run_child` for ``spec`` in a fresh process with the target's environment; returns its record."""
    target = get_target(spec["target"])
    env = dict(os.environ)
    env.update(target.environment())
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if target.platform in ("gpu", "attached"):
        # XLA's GPU compiler logs the time of its phases (HLO passes, autotuning included on a device; LLVM to
        # PTX; ptxas), which `xla_phase_times` adds up per program.
        env["TF_CPP_MIN_LOG_LEVEL"] = "0"
        env["TF_CPP_VMODULE"] = "gpu_compiler=1,nvptx_compiler=1"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.compile_only", "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        _write_log(log_path, err)
        return {**_ident(spec), "error": f"timed out after {timeout_s:.0f} s", "wall_s": time.perf_counter() - t0}
    _write_log(log_path, proc.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            rec = json.loads(line)
            rec["wall_s"] = time.perf_counter() - t0
            phases = xla_phase_times(proc.stderr)
            for part in PARTS:
                if part in rec and rec[part].get("module") in phases:
                    rec[part]["xla_phases_s"] = phases[rec[part]["module"]]
            return rec
    return {**_ident(spec), "error": child_error(proc.returncode, proc.stderr), "wall_s": time.perf_counter() - t0}


def child_error(returncode: int, stderr: str) -> str:
    """A failed child's error in one line: the exception's own line (e.g. XLA's RESOURCE_EXHAUSTED with the bytes
    it needed), not the traceback above it (the whole stderr is in ``--log-dir``)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if "RESOURCE_EXHAUSTED" in line or ("Error" in line.split(":")[0] and not line.startswith("File ")):
            return f"exit {returncode}: {line[:600]}"
    return f"exit {returncode}: {(lines[-1] if lines else 'no output')[:600]}"


_PHASE = re.compile(r"(RunHloPasses|CompileToPtx|PtxToCubin|RunBackend)\w* for (\S+) time: [^(]*\((\d+) us\)")


def xla_phase_times(stderr: str) -> dict[str, dict[str, float]]:
    """``{module: {phase: seconds}}`` from XLA's GPU compiler log lines (``TF_CPP_VMODULE=gpu_compiler=1,...``).

    ``RunHloPasses`` (optimisation passes, with autotuning when a device is attached), ``CompileToPtx`` (LLVM) and
    ``PtxToCubin`` (ptxas); the last two run on several threads, so their sums exceed their wall time.
    """
    out: dict[str, dict[str, float]] = {}
    for phase, module, micros in _PHASE.findall(stderr or ""):
        mod = out.setdefault(module, {})
        mod[phase] = mod.get(phase, 0.0) + int(micros) / 1e6
    return out


def _write_log(path: str | None, text: str) -> None:
    if path:
        with open(path, "w") as f:
            f.write(text or "")


def _ident(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in ("target", "program", "global_batch")}


def _f(x: Any, nd: int = 1) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


def _gib(x: Any) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def _part(rec: dict[str, Any], part: str) -> dict[str, Any]:
    return rec.get(part) or {}


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report's tables: one row per (target, program), a ratio row ours/plain per target."""
    only = sorted({r["target"] for r in records if get_target(r["target"]).compile_only})
    real = sorted({r["target"] for r in records} - set(only))
    if not real:
        label = LABEL
    elif not only:
        label = "compiled and timed on the devices named in the target column"
    else:  # never mixed silently: say which rows ran
        label = f"{', '.join(only)}: {LABEL}; {', '.join(real)}: compiled and timed on those devices"
    lines = [
        f"Compile figures ({label}): {meta['model']}@{meta['image_size']} {meta['dtype']}, recipe "
        f"`{meta['recipe']}`, jax {meta.get('jax_version', '?')}, host {meta.get('host', '?')}, {meta['date']}.",
        "",
        "| target | program | global batch | init s | train trace / lower / compile s | eval s | StableHLO ops "
        "(train) | kernels (train) | temp / need per chip GiB (fits) | est. first step s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    by_target: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        by_target.setdefault(r["target"], {})[r["program"]] = r
    for target, progs in by_target.items():
        for name, r in progs.items():
            if "error" in r:
                lines.append(f"| {target} | {name} | {r.get('global_batch')} | error: {r['error'][:150]} |||||||")
                continue
            i, t, e = _part(r, "init"), _part(r, "train"), _part(r, "eval")
            init = _f(i.get("total_s"))
            if i.get("where") == "host cpu":
                init += f" (host CPU, {i.get('parts', 1)} parts)"
            mem = t.get("memory", {})
            fits = {True: "yes", False: "**no**"}.get(mem.get("fits"), "?")
            kern = f"{t['kernels']:,}" if t.get("kernels") is not None else "-"
            if t.get("custom_calls"):
                kern += f" ({t['custom_calls']} custom calls)"
            ops = f"{t['stablehlo_ops']:,}" if t.get("stablehlo_ops") is not None else "-"
            train = f"{_f(t.get('trace_s'))} / {_f(t.get('lower_s'))} / {_f(t.get('compile_s'))}" if t else "-"
            lines.append(
                f"| {target} | {name} | {r['global_batch']} | {init} | {train} | {_f(e.get('total_s'))} | {ops} | "
                f"{kern} | {_gib(mem.get('temp'))} / {_gib(mem.get('need'))} ({fits}) | "
                f"{_f(r.get('time_to_first_step_s'))} |"
            )
        ours, plain = progs.get("ours"), progs.get("plain")
        if ours and plain and "error" not in ours and "error" not in plain:
            lines.append(_ratio_row(target, ours, plain))
    phases = [r for r in records if _part(r, "train").get("xla_phases_s")]
    if phases:
        lines += [
            "",
            "Where the GPU train-step compile goes (XLA's own log; LLVM and ptxas run on several threads, their sums "
            "exceed the wall time; on a device the HLO passes include autotuning):",
            "",
            "| target | program | HLO passes s | LLVM to PTX s (sum) | ptxas s (sum) |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for r in phases:
            ph = r["train"]["xla_phases_s"]
            lines.append(
                f"| {r['target']} | {r['program']} | {_f(ph.get('RunHloPasses'))} | {_f(ph.get('CompileToPtx'))} | "
                f"{_f(ph.get('PtxToCubin'))} |"
            )
    measured = [r for r in records if _part(r, "train").get("measured")]
    if measured:
        lines += ["", "Measured on the device (train step, median):", "",
                  "| target | program | device | global batch | step ms | img/s | peak GiB |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for r in measured:
            m = r["train"]["measured"]
            lines.append(
                f"| {r['target']} | {r['program']} | {r['device_kind']} | {r['global_batch']} | "
                f"{_f(1e3 * m['step_s'], 2)} | {_f(m['images_per_s'])} | {_gib(m.get('peak_bytes_in_use'))} |"
            )
    return "\n".join(lines) + "\n"


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _ratio_row(target: str, ours: dict[str, Any], plain: dict[str, Any]) -> str:
    oi, pi, ot, pt, oe, pe = _part(ours, "init"), _part(plain, "init"), _part(ours, "train"), _part(plain, "train"), \
        _part(ours, "eval"), _part(plain, "eval")  # fmt: skip
    om, pm = ot.get("memory", {}), pt.get("memory", {})
    return (
        f"| {target} | ours / plain | | {_ratio(oi.get('total_s'), pi.get('total_s'))} | compile "
        f"{_ratio(ot.get('compile_s'), pt.get('compile_s'))} | {_ratio(oe.get('total_s'), pe.get('total_s'))} | "
        f"{_ratio(ot.get('stablehlo_ops'), pt.get('stablehlo_ops'))} | {_ratio(ot.get('kernels'), pt.get('kernels'))}"
        f" | {_ratio(om.get('temp'), pm.get('temp'))} / {_ratio(om.get('need'), pm.get('need'))} | "
        f"{_ratio(ours.get('time_to_first_step_s'), plain.get('time_to_first_step_s'))} |"
    )


def max_batch_search(base: dict[str, Any], timeout_s: float, log_dir: str | None = None) -> dict[str, Any]:
    """The largest global batch whose train step fits the target's memory per chip (see the module docstring).

    Batches are multiples of the chip count. The need per chip is compiled at 4 and 16 examples per chip and
    extrapolated linearly; the answer is then checked by compiling at it and one chip-multiple above, and
    bisected further (to about 3%) when the extrapolation was off. A compile that fails for memory (TPU:
    RESOURCE_EXHAUSTED) counts as not fitting.
    """
    target = get_target(base["target"])
    chips = target.chips or 1
    hbm = int(target.hbm_bytes or 0)
    tries: list[dict[str, Any]] = []
    known: dict[int, int | None] = {}

    def need(batch: int) -> int | None:
        if batch in known:
            return known[batch]
        spec = {**base, "global_batch": batch, "eval_batch": batch, "parts": ["train"], "run_steps": 0}
        log = os.path.join(log_dir, f"maxbatch_{target.name}_{base['program']}_{batch}.log") if log_dir else None
        r = run_spec(spec, timeout_s, log)
        err = r.get("error", "")
        n = _part(r, "train").get("memory", {}).get("need")
        oom = "RESOURCE_EXHAUSTED" in err or "Ran out of memory" in err or "out of memory" in err.lower()
        if err and not oom:
            raise RuntimeError(f"compiling at global batch {batch} failed: {err[:500]}")
        known[batch] = None if oom else n
        tries.append({
            "batch": batch, "need_bytes": known[batch], "fits": fits(batch),
            "compile_s": _part(r, "train").get("compile_s"),
        })  # fmt: skip
        print(f"[compile_only]   max batch: {batch} -> {_gib(known[batch])} GiB per chip", file=sys.stderr, flush=True)
        return known[batch]

    def fits(batch: int) -> bool:
        n = known.get(batch)
        return n is not None and n <= hbm

    b1, b2 = 4 * chips, 16 * chips
    n1 = need(b1)
    if not fits(b1):
        return {"max_global_batch": None, "tries": tries, "note": f"{b1 // chips} examples per chip do not fit"}
    n2 = need(b2)
    per = (n2 - n1) / (b2 - b1) if n2 is not None and n2 > n1 else None
    lo, hi = (b2, None) if fits(b2) else (b1, b2)
    if per:
        guess = max(chips, int((hbm - n1) / per + b1) // chips * chips)
        need(guess)
        if fits(guess):
            lo = max(lo, guess)
            need(guess + chips)
            if not fits(guess + chips):
                hi = guess + chips
        else:
            hi = guess if hi is None else min(hi, guess)
    while hi is None:  # doubling until it does not fit
        nxt = lo * 2
        need(nxt)
        lo, hi = (nxt, None) if fits(nxt) else (lo, nxt)
    # Bisection to ~3% (each compile of a large batch takes minutes on a TPU target): the answer is a verified
    # lower bound, the first batch known not to fit is reported beside it.
    while hi - lo > max(chips, lo // 32 // chips * chips):
        mid = (lo + hi) // 2 // chips * chips
        need(mid)
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {
        "max_global_batch": lo, "per_chip": lo // chips, "first_not_fitting": hi, "bytes_per_example": per,
        "hbm_bytes": hbm,
        "tries": sorted(tries, key=lambda t: t["batch"]),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated (benchmarks.targets)")
    p.add_argument("--programs", default="ours,plain", help="ours, plain or both")
    p.add_argument("--model", default="cvt_13")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="training config of ours (configs/FILE.py[:args])")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field of ours")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-per-chip", type=int, default=0, help="default: 128 on GPUs, 64 on TPUs")
    p.add_argument("--global-batch", type=int, default=0, help="overrides --batch-per-chip")
    p.add_argument("--parts", default=",".join(PARTS), help="of init, train, eval")
    p.add_argument("--max-batch", action="store_true", help="also search the largest global batch that fits")
    p.add_argument("--run-steps", type=int, default=0, help="real devices (attached, cpu:N): time this many steps")
    p.add_argument("--timeout-s", type=float, default=3600, help="per child process")
    p.add_argument("--log-dir", default=None, help="each child's stderr here")
    p.add_argument("--dump-hlo", default=None, help="write each program's optimized HLO text into this folder")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        rec = run_child(json.loads(args.child))
        print(json.dumps(rec, default=str), flush=True)
        return [rec]

    parts = [x for x in args.parts.split(",") if x]
    programs = [x for x in args.programs.split(",") if x]
    for x in parts:
        if x not in PARTS:
            p.error(f"unknown part {x!r}; choose from {PARTS}")
    for x in programs:
        if x not in PROGRAMS:
            p.error(f"unknown program {x!r}; choose from {PROGRAMS}")
    try:
        targets = [get_target(t) for t in args.targets.split(",") if t]
        sets = parse_sets(args.set)
        load_config(args.recipe)
    except ValueError as e:
        p.error(str(e))
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    records: list[dict[str, Any]] = []
    import platform as host_platform

    meta = {
        "label": LABEL,
        "model": args.model,
        "image_size": args.image_size,
        "recipe": args.recipe,
        "sets": sets,
        "dtype": args.dtype,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{host_platform.machine()}, {os.cpu_count()} CPU cores",
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    for target in targets:
        chips = target.chips or 1
        if target.platform == "attached":
            chips = _attached_chips()
        per_chip = args.batch_per_chip or DEFAULT_BATCH_PER_CHIP[target.platform]
        batch = args.global_batch or per_chip * chips
        for program in programs:
            spec = {
                "target": target.name, "program": program, "model": args.model, "image_size": args.image_size,
                "recipe": args.recipe, "sets": sets, "global_batch": batch, "eval_batch": batch,
                "dtype": args.dtype, "parts": parts, "run_steps": args.run_steps,
                "dump_hlo": os.path.abspath(args.dump_hlo) if args.dump_hlo else None,
            }  # fmt: skip
            print(f"[compile_only] {target.describe()} | {program} | global batch {batch} ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            log = os.path.join(args.log_dir, f"{target.name}_{program}.log") if args.log_dir else None
            rec = run_spec(spec, args.timeout_s, log)
            if args.max_batch and "error" not in rec and target.hbm_bytes:
                rec["max_batch"] = max_batch_search(spec, args.timeout_s, args.log_dir)
            records.append(rec)
            meta.setdefault("jax_version", rec.get("jax_version"))
            print(f"[compile_only]   {_oneline(rec)}", file=sys.stderr, flush=True)
    text = markdown(records, meta)
    mb = [r for r in records if "max_batch" in r]
    if mb:
        text += "\n| target | program | largest global batch that fits (per chip) | bytes per example |\n"
        text += "| --- | --- | ---: | ---: |\n"
        for r in mb:
            m = r["max_batch"]
            text += (f"| {r['target']} | {r['program']} | {m.get('max_global_batch')} ({m.get('per_chip')}) | "
                     f"{_f(m.get('bytes_per_example'), 0)} |\n")  # fmt: skip
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": records}, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return records


def _attached_chips() -> int:
    out = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.device_count())"], capture_output=True, text=True, check=False
    )
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 1


def _oneline(rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"error: {rec['error'][:300]}"
    bits = []
    for part in PARTS:
        r = rec.get(part)
        if r:
            bits.append(f"{part} {r['total_s']:.1f} s (compile {r['compile_s']:.1f})")
    t = rec.get("train", {})
    if t:
        bits.append(f"train kernels {t.get('kernels')}, need {_gib(t.get('memory', {}).get('need'))} GiB")
    return "; ".join(bits)


if __name__ == "__main__":
    main()
