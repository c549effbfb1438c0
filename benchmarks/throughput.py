"""JAX/Flax training and inference throughput of CvT on one device: the very step that main.py trains with.

    python -m benchmarks.throughput --model cvt_13 --image-size 224 --train-batch 128 --infer-batch 256 \
        [--recipe configs/imagenet.py:variant=13] [--set grad_clip_norm=0 ...] [--attention explicit] \
        [--steps 10 --warmup 2] [--find-max-batch] [--profile-dir DIR] [--json OUT]

The train step is `cvt_flax.train_utils.build_program(config).train_step`, the function the training loop
runs, built from a recipe config (default: `benchmarks.recipe.auto_recipe`, the ImageNet recipe for official
variants and the CIFAR-100 recipe for the others) with the benchmark's model, size, batch and dtype: forward in
the compute dtype (parameters float32), label smoothing, on-device Mixup/CutMix when the recipe has them,
softmax cross-entropy, backward, gradient clipping when the recipe clips, the optimizer with its weight-decay
mask and learning-rate schedule, BatchNorm statistics, stochastic depth, and the train metrics (loss, accuracy,
learning rate, gradient norm), jitted with the state donated. Inference is the training loop's eval step
(``train=False`` forward plus its metrics). Inputs are synthetic and already on the device: this measures the
model, not the input pipeline (see benchmarks/input_pipeline.py).

Reported (and written with ``--json``): median step time and images/s, compile time (trace + lower +
compile), XLA's memory estimate, the device's peak bytes in use, model FLOP utilisation (MFU). With
``--profile-dir`` a few train steps are also traced with `jax.profiler` and the per-operation device time is
written as a text table (`benchmarks.profile_table`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import warnings
from typing import Any

from benchmarks import harness
from benchmarks.recipe import DTYPES, Workload, add_workload_args, workload_from_args

harness.progress("importing jax")

# Let JAX share the accelerator with torch (compare.py) and measure what it really uses; harmless alone.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cvt_flax import flops, sharding  # noqa: E402
from cvt_flax import train_utils as tu  # noqa: E402
from cvt_flax.models import get_spec  # noqa: E402

harness.progress(f"jax {jax.__version__} imported")

ATTENTION_IMPLS = ("explicit", "xla", "cudnn")
# --fast-compile: XLA options that halve CPU compile times at the cost of slower code (smoke tests only).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Train-split size the schedule is derived from (its length changes values, not work).
NOMINAL_EPOCH_BATCHES = 10


class JaxBackend:
    """`harness.Backend` for JAX on its first device."""

    def __init__(self, device: Any = None):
        self.device = device or jax.devices()[0]
        self.device_kind = self.device.device_kind
        self.platform = self.device.platform

    def sync(self, result: Any) -> None:
        jax.block_until_ready(result)

    def reset_peak(self) -> None:
        """XLA's allocator keeps its peak for the process (compare.py runs each variant in its own)."""

    def peak_bytes(self) -> int | None:
        try:
            stats = self.device.memory_stats()
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None
            return None
        value = (stats or {}).get("peak_bytes_in_use")
        return int(value) if value is not None else None

    def free(self) -> None:
        gc.collect()


def memory_estimate(compiled: Any) -> int | None:
    """Bytes an executable needs by XLA's buffer assignment: arguments + outputs - aliased (donated) + temps."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def build_program(config: Any, num_classes: int, device: Any = None) -> tu.TrainProgram:
    """The training loop's program (`train_utils.build_program`) on one device, for ``config``."""
    mesh = sharding.create_mesh([device or jax.devices()[0]])
    examples = int(config.batch_size) * NOMINAL_EPOCH_BATCHES
    return tu.build_program(config, mesh, num_classes=num_classes, in_chans=3, num_train_examples=examples)


def synthetic_batch(
    batch: int, image_size: int, num_classes: int, seed: int = 0, inputs: tuple[Any, Any] | None = None
) -> dict[str, Any]:
    """A global batch ``{'image', 'label', 'mask'}`` on the default device (normal images, uniform labels)."""
    if inputs is None:
        rng = np.random.default_rng(seed + 1)
        images = rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
        labels = rng.integers(0, num_classes, (batch,), dtype=np.int32)
    else:
        images, labels = np.asarray(inputs[0], np.float32), np.asarray(inputs[1], np.int32)
    return jax.device_put({"image": images, "label": labels, "mask": np.ones(len(labels), bool)})


def train_phase(
    w: Workload,
    config: Any,
    backend: JaxBackend,
    batch: int,
    *,
    inputs: tuple[Any, Any] | None = None,
    compiler_options: dict[str, Any] | None = None,
    profile_dir: str | None = None,
    profile_steps: int = 5,
) -> tuple[harness.Phase, tu.TrainProgram, Any]:
    """Compiles and times the training loop's train step at ``batch``; returns the phase, program and state."""
    harness.progress(f"{w.model}@{w.image_size}: building the training program ({w.recipe})")
    program = build_program(config, w.num_classes, backend.device)
    harness.progress(f"initialising the train state on {backend.device} ({program.num_params:,} parameters)")
    state = program.init_state(program.init_rng)
    data = synthetic_batch(batch, w.image_size, w.num_classes, w.seed, inputs)
    jax.block_until_ready((state, data))
    harness.progress("train state ready; timing the train step")
    box: dict[str, Any] = {"state": state}

    def compile_fn() -> None:
        box["compiled"] = program.train_step.lower(box["state"], data).compile(compiler_options=compiler_options)

    def step() -> Any:
        box["state"], metrics = box["compiled"](box["state"], data)
        return metrics

    phase = harness.measure(
        step,
        backend,
        batch=batch,
        warmup=w.warmup,
        steps=w.steps,
        compile_fn=compile_fn,
        memory_estimate=lambda: memory_estimate(box["compiled"]),
    )
    if profile_dir:
        from benchmarks import profile_table

        harness.progress(f"tracing 5 train steps into {profile_dir}")
        profile_table.trace_steps(step, backend.sync, profile_dir, profile_steps)
    return phase, program, box["state"]


def infer_phase(
    w: Workload,
    program: tu.TrainProgram,
    variables: Any,
    backend: JaxBackend,
    *,
    images: Any = None,
    compiler_options: dict[str, Any] | None = None,
) -> harness.Phase:
    """Compiles and times the training loop's eval step (``train=False`` forward and metrics)."""
    harness.progress(f"{w.model}@{w.image_size}: timing the eval step")
    inputs = None if images is None else (images, np.zeros(len(images), np.int32))
    data = synthetic_batch(w.infer_batch, w.image_size, w.num_classes, w.seed + 7, inputs)
    box: dict[str, Any] = {}

    def compile_fn() -> None:
        box["compiled"] = program.eval_step.lower(variables, data).compile(compiler_options=compiler_options)

    return harness.measure(
        lambda: box["compiled"](variables, data),
        backend,
        batch=w.infer_batch,
        warmup=w.warmup,
        steps=w.steps,
        compile_fn=compile_fn,
        memory_estimate=lambda: memory_estimate(box["compiled"]),
    )


def _check(w: Workload, attention: str) -> None:
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown --attention {attention!r}; choose one of {ATTENTION_IMPLS}.")
    if w.dtype not in DTYPES:
        raise ValueError(f"Unknown --dtype {w.dtype!r}; choose one of {DTYPES}.")
    if attention == "cudnn" and jax.devices()[0].platform != "gpu":
        raise ValueError(
            f"--attention cudnn needs an NVIDIA GPU (this device is {jax.devices()[0].platform}); "
            "use --attention explicit or xla."
        )
    get_spec(w.model).token_grid(w.image_size, w.image_size)  # clear error for too-small inputs


def benchmark(
    w: Workload,
    *,
    attention: str = "explicit",
    remat: bool = False,
    peak_tflops: float | None = None,
    find_max: bool = False,
    max_batch_limit: int | None = None,
    skip_train: bool = False,
    skip_infer: bool = False,
    inputs: dict[str, Any] | None = None,
    fast_compile: bool = False,
    profile_dir: str | None = None,
) -> dict[str, Any]:
    """Benchmarks one workload; returns a JSON-serialisable record (see the module docstring).

    Args:
      w: The workload (recipe config, model, size, batches, dtype, steps).
      attention: ``explicit``, ``xla`` or ``cudnn`` (``config.attention_impl``).
      remat: Rematerialise blocks (``config.remat``).
      peak_tflops: Override of the device's peak TFLOP/s for MFU.
      find_max: Also search the largest training batch that fits.
      max_batch_limit: Largest batch the search tries (default 8192 on accelerators, 4x the start on CPU).
      skip_train: Skip the training benchmark.
      skip_infer: Skip the inference benchmark.
      inputs: Optional host arrays ``{'train_images', 'train_labels', 'infer_images'}`` (NHWC float32) to
        use instead of random data (compare.py feeds both frameworks the same arrays).
      fast_compile: Compile with `FAST_COMPILE_OPTIONS` (quicker CPU compiles, slower steps; smoke tests only).
      profile_dir: Also trace a few train steps into this folder and write ``op_table.txt`` there.

    Returns:
      The record (dict).
    """
    _check(w, attention)
    backend = JaxBackend()
    harness.progress(f"device {backend.device} ({backend.device_kind}); attention {attention}")
    copts = dict(FAST_COMPILE_OPTIONS) if fast_compile else None
    config = w.config()
    config.attention_impl = attention
    config.remat = remat
    spec = get_spec(w.model, **tu.spec_overrides(config, 3))
    train_fpi = flops.train_flops_per_image(spec, w.image_size, w.num_classes)
    infer_fpi = flops.inference_flops_per_image(spec, w.image_size, w.num_classes)
    rec = harness.base_record(
        "jax",
        f"jit/{attention}" + ("/remat" if remat else ""),
        w,
        backend,
        train_flops_per_image=train_fpi,
        inference_flops_per_image=infer_fpi,
        peak_tflops=peak_tflops,
    )
    peak = rec["peak_tflops"]
    rec.update(
        attention=attention,
        remat=remat,
        fast_compile=fast_compile,
        device=str(backend.device),
        jax_version=jax.__version__,
        optimizer=str(config.optimizer),
        step_source="cvt_flax.train_utils.build_program",
    )
    try:
        import flax

        rec["flax_version"] = flax.__version__
    except Exception:  # noqa: BLE001
        pass
    inputs = inputs or {}
    with warnings.catch_warnings():
        # CPUs cannot donate buffers; XLA says so once per executable.
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        program = variables = None
        if not skip_train:
            tr = (inputs["train_images"], inputs["train_labels"]) if "train_images" in inputs else None
            phase, program, state = train_phase(
                w, config, backend, w.train_batch, inputs=tr, compiler_options=copts, profile_dir=profile_dir
            )
            rec.update(harness.phase_fields("train", phase, train_fpi, peak))
            metrics = {k: float(v) for k, v in phase.last.compute().items()}
            rec.update(train_loss=metrics["loss"], train_grad_norm=metrics.get("grad_norm"))
            variables = state.eval_variables()
            del state
        if program is None:
            program = build_program(config, w.num_classes, backend.device)
        rec["num_params"] = program.num_params
        if not skip_infer:
            if variables is None:
                variables = program.init_state(program.init_rng).eval_variables()
            phase = infer_phase(
                w, program, variables, backend, images=inputs.get("infer_images"), compiler_options=copts
            )
            rec.update(harness.phase_fields("infer", phase, infer_fpi, peak))
        del variables
        gc.collect()
        harness.finish_record(rec)
        if profile_dir and os.path.isdir(profile_dir):
            from benchmarks import profile_table

            rec["profile"] = profile_table.summarise(profile_dir)
        if find_max:
            if max_batch_limit is None:
                max_batch_limit = 4 * w.train_batch if backend.platform == "cpu" else 8192
            known = [{"batch": w.train_batch, "fits": True, "images_per_s": rec.get("train_images_per_s")}]

            def at(batch: int) -> float | None:
                cfg = w.config(batch)
                cfg.attention_impl, cfg.remat = attention, remat
                quick = dataclasses.replace(w, warmup=1, steps=2)
                return train_phase(quick, cfg, backend, batch, compiler_options=copts)[0].images_per_s

            rec["max_batch_search"] = harness.find_max_batch(
                at, w.train_batch, max_batch_limit, known=known if "train_images_per_s" in rec else [],
                cleanup=jax.clear_caches,
            )  # fmt: skip
            rec["max_train_batch"] = rec["max_batch_search"]["max_train_batch"]
    return rec


def summary(rec: dict[str, Any]) -> str:
    """A few human-readable lines of a record."""
    fmt, gib, pct = harness.fmt, harness.gib, harness.pct
    lines = [
        f"{rec['model']}@{rec['image_size']} {rec['framework']}/{rec['mode']} {rec['dtype']} on {rec['device_kind']} "
        f"({rec.get('recipe')})",
    ]
    if "train_images_per_s" in rec:
        lines.append(
            f"  train  batch {rec['train_batch']}: {fmt(rec['train_images_per_s'])} img/s "
            f"(step {fmt(1e3 * rec['train_step_s'], 2)} ms), MFU {pct(rec.get('mfu_train'))}, "
            f"compile {fmt(rec.get('train_compile_s'), 2)} s, peak {gib(rec.get('train_peak_bytes_in_use'))} GiB, "
            f"XLA estimate {gib(rec.get('train_memory_estimate_bytes'))} GiB"
        )
    if "infer_images_per_s" in rec:
        lines.append(
            f"  infer  batch {rec['infer_batch']}: {fmt(rec['infer_images_per_s'])} img/s "
            f"(step {fmt(1e3 * rec['infer_step_s'], 2)} ms), MFU {pct(rec.get('mfu_infer'))}, "
            f"compile {fmt(rec.get('infer_compile_s'), 2)} s"
        )
    if "max_train_batch" in rec:
        lines.append(
            f"  largest training batch that fits: {rec['max_train_batch']} ({rec['max_batch_search']['tries']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cvt_13", help="registered variant (cvt_flax.models.list_models())")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--attention", default="explicit", choices=ATTENTION_IMPLS)
    p.add_argument("--remat", action="store_true", help="rematerialise blocks in the backward pass")
    p.add_argument("--fast-compile", action="store_true", help="unoptimised XLA codegen (CPU smoke tests only)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument("--profile-dir", default=None, help="trace 5 train steps here and write op_table.txt")
    add_workload_args(p)
    args = p.parse_args(argv)
    w = workload_from_args(args, args.model, args.image_size, args.train_batch, args.infer_batch)
    rec = benchmark(
        w,
        attention=args.attention,
        remat=args.remat,
        peak_tflops=args.peak_tflops,
        find_max=args.find_max_batch,
        max_batch_limit=args.max_batch_limit,
        skip_train=args.skip_train,
        skip_infer=args.skip_infer,
        fast_compile=args.fast_compile,
        profile_dir=args.profile_dir,
    )
    rec["host"] = harness.host_info()
    rec["argv"] = sys.argv[1:] if argv is None else list(argv)
    print(summary(rec))
    harness.write_json(args.json, rec)
    return rec


if __name__ == "__main__":
    from cvt_flax import hostmem

    hostmem.reexec_with_huge_pages()  # Both frameworks get the same allocator settings (see cvt_flax.hostmem).
    main()
