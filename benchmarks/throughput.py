"""JAX/Flax training and inference throughput of a CvT variant on one device.

    python -m benchmarks.throughput --model cvt_13 --image-size 224 --train-batch 128 --infer-batch 256 \
        --dtype bfloat16 --attention explicit --steps 20 --warmup 3 [--remat] [--find-max-batch] [--json OUT]

The train step is the real thing minus the data: forward in ``--dtype`` (parameters float32), softmax
cross-entropy, backward, AdamW (optax; weight decay on matrices only), BatchNorm statistics update, dropout /
stochastic-depth rngs, jitted with the train state donated. Inference is ``train=False`` (BatchNorm running
averages). Inputs are synthetic and already on the device, so this measures the model, not the input pipeline
(see benchmarks/input_pipeline.py for that).

Reported (and written with ``--json``): median step time and images/s (each step synchronised with
``block_until_ready``), compile time (trace + lower + compile), the executables' memory estimate from XLA's
buffer assignment, the device's peak bytes in use, and model FLOP utilisation (MFU) from
`cvt_flax.flops` against the device's bf16 peak.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from typing import Any

from benchmarks import _util

# Let JAX share the accelerator with torch (compare.py) and measure what it really uses; harmless alone.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from cvt_flax import flops  # noqa: E402
from cvt_flax.models import create_model, get_spec  # noqa: E402

ATTENTION_IMPLS = ("explicit", "xla", "cudnn")
# --fast-compile: XLA options that halve CPU compile times at the cost of slower code (smoke tests only).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
DTYPES = ("float32", "bfloat16", "float16")


def _device() -> Any:
    return jax.devices()[0]


def peak_bytes_in_use(device: Any = None) -> int | None:
    """The device's ``peak_bytes_in_use`` (XLA allocator, whole process so far), or None when not reported."""
    device = device or _device()
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if not stats:
        return None
    value = stats.get("peak_bytes_in_use")
    return int(value) if value is not None else None


def memory_estimate(compiled: Any) -> int | None:
    """Bytes an executable needs by XLA's buffer assignment: arguments + outputs - aliased (donated) + temps."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if m is None:
        return None
    try:
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)
    except AttributeError:
        return None


def _decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(
    name: str = "adamw", learning_rate: float = 1e-3, weight_decay: float = 0.05
) -> optax.GradientTransformation:
    """The benchmarked optimizer.

    Args:
      name: ``adamw`` (the training recipe: no decay on biases, norms and class tokens) or ``sgd`` (momentum
        0.9; compiles about twice as fast on CPU, for smoke tests).
      learning_rate: Learning rate.
      weight_decay: AdamW's decoupled weight decay.

    Raises:
      ValueError: for an unknown name.
    """
    if name == "adamw":
        return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, mask=_decay_mask)
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=0.9)
    raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


def init_state(
    model: Any,
    tx: optax.GradientTransformation,
    image_size: int,
    in_chans: int,
    seed: int = 0,
    compiler_options: dict[str, Any] | None = None,
) -> dict:
    """Initialises the train state (params, batch_stats, opt_state, step, rng) on the default device.

    The parameters are drawn with the ``unsafe_rbg`` generator, whose initialisation graph XLA compiles several
    times faster on CPUs than threefry's (throughput does not depend on the values); the dropout rng of the train
    step stays the default (threefry), as in training.
    """

    @jax.jit
    def _init(key):
        variables = model.init(
            {"params": key, "dropout": key},
            jnp.zeros((1, image_size, image_size, in_chans), jnp.float32),
            train=False,
        )
        params = variables["params"]
        return {
            "params": params,
            "batch_stats": variables.get("batch_stats", {}),
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
        }

    key = jax.random.key(seed, impl="unsafe_rbg")
    state = _init.lower(key).compile(compiler_options=compiler_options)(key)
    state["rng"] = jax.random.PRNGKey(seed + 1)
    return state


def make_train_step(model: Any, tx: optax.GradientTransformation) -> Any:
    """The jitted train step ``(state, images, labels) -> (state, loss)`` with the state donated."""

    def train_step(state, images, labels):
        rng = jax.random.fold_in(state["rng"], state["step"])

        def loss_fn(params):
            logits, new_vars = model.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                images,
                train=True,
                rngs={"dropout": rng},
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
            return loss, new_vars.get("batch_stats", {})

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {
            "params": params,
            "batch_stats": batch_stats,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        return new_state, loss

    return jax.jit(train_step, donate_argnums=(0,))


def make_infer_step(model: Any) -> Any:
    """The jitted inference step ``(variables, images) -> logits``."""

    def infer_step(variables, images):
        return model.apply(variables, images, train=False)

    return jax.jit(infer_step)


def synthetic_batch(batch: int, image_size: int, in_chans: int, num_classes: int, seed: int = 0):
    """Normalised-looking float32 images and int32 labels, put on the default device."""
    rng = np.random.default_rng(seed + 1)
    images = rng.standard_normal((batch, image_size, image_size, in_chans), dtype=np.float32)
    labels = rng.integers(0, num_classes, (batch,), dtype=np.int32)
    return jax.device_put(images, _device()), jax.device_put(labels, _device())


def _check_args(model_name: str, image_size: int, attention: str, dtype: str) -> None:
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown --attention {attention!r}; choose one of {ATTENTION_IMPLS}.")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown --dtype {dtype!r}; choose one of {DTYPES}.")
    if attention == "cudnn" and _device().platform != "gpu":
        raise ValueError(
            f"--attention cudnn needs an NVIDIA GPU (this device is {_device().platform}); "
            "use --attention explicit or xla."
        )
    get_spec(model_name).token_grid(image_size, image_size)  # clear error for too-small inputs


def _train_run(
    model: Any,
    tx: optax.GradientTransformation,
    batch: int,
    image_size: int,
    in_chans: int,
    num_classes: int,
    warmup: int,
    steps: int,
    seed: int,
    inputs: tuple[Any, Any] | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compiles and times the train step at one batch size. Returns timings and the final state."""
    state = init_state(model, tx, image_size, in_chans, seed, compiler_options)
    if inputs is None:
        images, labels = synthetic_batch(batch, image_size, in_chans, num_classes, seed)
    else:
        images, labels = (jax.device_put(np.asarray(a), _device()) for a in inputs)
    jax.block_until_ready((state, images, labels))
    step_fn = make_train_step(model, tx)
    t0 = time.perf_counter()
    lowered = step_fn.lower(state, images, labels)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options)
    t2 = time.perf_counter()
    box = {"state": state}

    def one():
        box["state"], box["loss"] = compiled(box["state"], images, labels)
        return box["loss"]

    t3 = time.perf_counter()
    jax.block_until_ready(one())
    first_step_s = time.perf_counter() - t3
    times = _util.time_calls(one, jax.block_until_ready, max(0, warmup - 1), steps)
    loss = float(box["loss"])
    return {
        "state": box["state"],
        "times": times,
        "lower_s": t1 - t0,
        "compile_s": t2 - t0,
        "first_step_s": first_step_s,
        "memory_estimate": memory_estimate(compiled),
        "loss": loss,
    }


def _infer_run(
    model: Any,
    variables: Any,
    batch: int,
    image_size: int,
    in_chans: int,
    num_classes: int,
    warmup: int,
    steps: int,
    seed: int,
    inputs: Any = None,
    compiler_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    images = (
        synthetic_batch(batch, image_size, in_chans, num_classes, seed)[0]
        if inputs is None
        else jax.device_put(np.asarray(inputs), _device())
    )
    step_fn = make_infer_step(model)
    t0 = time.perf_counter()
    compiled = step_fn.lower(variables, images).compile(compiler_options=compiler_options)
    compile_s = time.perf_counter() - t0
    times = _util.time_calls(lambda: compiled(variables, images), jax.block_until_ready, warmup, steps)
    return {"times": times, "compile_s": compile_s, "memory_estimate": memory_estimate(compiled)}


def find_max_batch(
    model: Any,
    tx: optax.GradientTransformation,
    start: int,
    image_size: int,
    in_chans: int,
    num_classes: int,
    limit: int,
    steps: int = 2,
    seed: int = 0,
    known: list[dict[str, Any]] | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Doubles the training batch from ``start`` until XLA runs out of memory (or ``limit`` is passed).

    ``known``: tries already made (e.g. the benchmark's own batch, which fits); the search continues after them.

    Returns:
      ``{'max_train_batch': largest batch that compiled and ran (None if even ``start`` failed),
      'tries': [{'batch', 'fits', 'images_per_s' | 'error'}]}``.
    """
    tries: list[dict[str, Any]] = list(known or [])
    best = max((t["batch"] for t in tries if t["fits"]), default=None)
    batch = start if best is None else 2 * best
    while batch <= limit:
        try:
            run = _train_run(
                model, tx, batch, image_size, in_chans, num_classes, 1, steps, seed, compiler_options=compiler_options
            )
            sec = _util.median(run["times"])
            tries.append({"batch": batch, "fits": True, "images_per_s": batch / sec if sec else None})
            best = batch
            del run
        except Exception as err:  # noqa: BLE001 - only OOM is expected; anything else is re-raised
            if not _util.is_oom(err):
                raise
            tries.append({"batch": batch, "fits": False, "error": str(err).splitlines()[0][:300]})
            break
        finally:
            gc.collect()
        batch *= 2
    gc.collect()
    jax.clear_caches()
    return {"max_train_batch": best, "tries": tries, "limit": limit}


def benchmark(
    model_name: str = "cvt_13",
    image_size: int = 224,
    train_batch: int = 128,
    infer_batch: int = 256,
    dtype: str = "bfloat16",
    attention: str = "explicit",
    remat: bool = False,
    steps: int = 20,
    warmup: int = 3,
    num_classes: int = 1000,
    act: str = "quick_gelu",
    optimizer: str = "adamw",
    peak_tflops: float | None = None,
    find_max: bool = False,
    max_batch_limit: int | None = None,
    skip_train: bool = False,
    skip_infer: bool = False,
    seed: int = 0,
    inputs: dict[str, Any] | None = None,
    fast_compile: bool = False,
) -> dict[str, Any]:
    """Benchmarks one configuration; returns a JSON-serialisable record (see the module docstring).

    Args:
      model_name: Registered variant.
      image_size: Input side length.
      train_batch: Training batch (one device).
      infer_batch: Inference batch.
      dtype: Compute dtype name.
      attention: ``explicit``, ``xla`` or ``cudnn``.
      remat: Rematerialise blocks.
      steps: Timed steps (median reported).
      warmup: Untimed steps after compilation.
      num_classes: Classifier width.
      act: MLP activation (``quick_gelu`` official; ``gelu`` as the HuggingFace port).
      optimizer: ``adamw`` (default) or ``sgd`` (see `make_optimizer`).
      peak_tflops: Override of the device's peak TFLOP/s for MFU.
      find_max: Also search the largest training batch that fits.
      max_batch_limit: Largest batch the search tries (default 8192 on accelerators, 4x the start on CPU).
      skip_train: Skip the training benchmark.
      skip_infer: Skip the inference benchmark.
      seed: Seed of the parameters and synthetic data.
      inputs: Optional host arrays ``{'train_images', 'train_labels', 'infer_images'}`` (NHWC float32) to
        use instead of on-device random data (compare.py feeds both frameworks the same arrays).
      fast_compile: Compile with `FAST_COMPILE_OPTIONS` (quicker CPU compiles, slower steps; smoke tests only).

    Returns:
      The record (dict).
    """
    _check_args(model_name, image_size, attention, dtype)
    copts = dict(FAST_COMPILE_OPTIONS) if fast_compile else None
    dev = _device()
    spec = get_spec(model_name)
    in_chans = spec.in_chans
    model = create_model(
        model_name, num_classes=num_classes, dtype=dtype, attention_impl=attention, remat=remat, act=act
    )
    tx = make_optimizer(optimizer)
    peak, peak_src = _util.peak_tflops_for(dev.device_kind, peak_tflops)
    train_fpi = flops.train_flops_per_image(spec, image_size, num_classes)
    infer_fpi = flops.inference_flops_per_image(spec, image_size, num_classes)
    rec: dict[str, Any] = {
        "framework": "jax",
        "mode": f"jit/{attention}" + ("/remat" if remat else ""),
        "model": model_name,
        "image_size": image_size,
        "num_classes": num_classes,
        "dtype": dtype,
        "attention": attention,
        "remat": remat,
        "act": act,
        "optimizer": optimizer,
        "fast_compile": fast_compile,
        "train_batch": train_batch,
        "infer_batch": infer_batch,
        "steps": steps,
        "warmup": warmup,
        "device": str(dev),
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "train_flops_per_image": train_fpi,
        "inference_flops_per_image": infer_fpi,
        "peak_tflops": peak,
        "peak_tflops_source": peak_src,
    }
    try:
        import flax

        rec["flax_version"] = flax.__version__
    except Exception:  # noqa: BLE001
        pass
    inputs = inputs or {}
    with warnings.catch_warnings():
        # CPUs cannot donate buffers; XLA says so once per executable.
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        variables = None
        if not skip_train:
            tr_inputs = None
            if "train_images" in inputs:
                tr_inputs = (inputs["train_images"], inputs["train_labels"])
            run = _train_run(
                model, tx, train_batch, image_size, in_chans, num_classes, warmup, steps, seed, tr_inputs, copts
            )
            sec = _util.median(run["times"])
            ips = train_batch / sec if sec else None
            state = run.pop("state")
            rec.update(
                train_step_s=sec,
                train_step_s_all=run["times"],
                train_images_per_s=ips,
                train_compile_s=run["compile_s"],
                train_lower_s=run["lower_s"],
                train_first_step_s=run["first_step_s"],
                train_memory_estimate_bytes=run["memory_estimate"],
                train_peak_bytes_in_use=peak_bytes_in_use(dev),
                train_loss=run["loss"],
                train_tflops_per_s=train_fpi * ips / 1e12 if ips else None,
                mfu_train=_util.mfu(train_fpi, ips, peak),
            )
            rec["num_params"] = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(state["params"])))
            variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
            del state, run
        if not skip_infer:
            if variables is None:
                st = init_state(model, tx, image_size, in_chans, seed, copts)
                variables = {"params": st["params"], "batch_stats": st["batch_stats"]}
                rec["num_params"] = int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(st["params"])))
                del st
            inf = _infer_run(
                model,
                variables,
                infer_batch,
                image_size,
                in_chans,
                num_classes,
                warmup,
                steps,
                seed,
                inputs.get("infer_images"),
                copts,
            )
            sec = _util.median(inf["times"])
            ips = infer_batch / sec if sec else None
            rec.update(
                infer_step_s=sec,
                infer_step_s_all=inf["times"],
                infer_images_per_s=ips,
                infer_compile_s=inf["compile_s"],
                infer_memory_estimate_bytes=inf["memory_estimate"],
                infer_tflops_per_s=infer_fpi * ips / 1e12 if ips else None,
                mfu_infer=_util.mfu(infer_fpi, ips, peak),
            )
        del variables
        gc.collect()
        rec["peak_bytes_in_use"] = peak_bytes_in_use(dev)
        if find_max:
            if max_batch_limit is None:
                max_batch_limit = 4 * train_batch if dev.platform == "cpu" else 8192
            known = (
                [{"batch": train_batch, "fits": True, "images_per_s": rec["train_images_per_s"]}]
                if ("train_images_per_s" in rec)
                else []
            )
            rec["max_batch_search"] = find_max_batch(
                model,
                tx,
                train_batch,
                image_size,
                in_chans,
                num_classes,
                max_batch_limit,
                seed=seed,
                known=known,
                compiler_options=copts,
            )
            rec["max_train_batch"] = rec["max_batch_search"]["max_train_batch"]
    return rec


def summary(rec: dict[str, Any]) -> str:
    """A few human-readable lines of a record."""
    lines = [
        f"{rec['model']}@{rec['image_size']} {rec['framework']}/{rec['mode']} {rec['dtype']} on {rec['device_kind']}",
    ]
    if "train_images_per_s" in rec:
        lines.append(
            f"  train  batch {rec['train_batch']}: {_util.fmt(rec['train_images_per_s'])} img/s "
            f"(step {_util.fmt(1e3 * rec['train_step_s'], 2)} ms), MFU {_util.pct(rec.get('mfu_train'))}, "
            f"compile {_util.fmt(rec.get('train_compile_s'), 2)} s, "
            f"peak {_util.gib(rec.get('train_peak_bytes_in_use'))} GiB, "
            f"XLA estimate {_util.gib(rec.get('train_memory_estimate_bytes'))} GiB"
        )
    if "infer_images_per_s" in rec:
        lines.append(
            f"  infer  batch {rec['infer_batch']}: {_util.fmt(rec['infer_images_per_s'])} img/s "
            f"(step {_util.fmt(1e3 * rec['infer_step_s'], 2)} ms), MFU {_util.pct(rec.get('mfu_infer'))}, "
            f"compile {_util.fmt(rec.get('infer_compile_s'), 2)} s"
        )
    if "max_train_batch" in rec:
        lines.append(
            f"  largest training batch that fits: {rec['max_train_batch']} ({rec['max_batch_search']['tries']})"
        )
    return "\n".join(lines)


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared with compare.py."""
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="compute dtype (params stay float32)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="sgd: faster compiles (smoke tests)")
    p.add_argument("--fast-compile", action="store_true", help="ours: unoptimised XLA codegen (smoke tests only)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak TFLOP/s for MFU")
    p.add_argument("--find-max-batch", action="store_true", help="double the train batch until out of memory")
    p.add_argument("--max-batch-limit", type=int, default=None, help="largest batch --find-max-batch tries")
    p.add_argument("--json", default=None, help="write the record(s) to this JSON file")
    p.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cvt_13", help="registered variant (cvt_flax.models.list_models())")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--attention", default="explicit", choices=ATTENTION_IMPLS)
    p.add_argument("--remat", action="store_true", help="rematerialise blocks in the backward pass")
    p.add_argument("--act", default="quick_gelu", help="MLP activation: quick_gelu (official) or gelu (HF)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-infer", action="store_true")
    add_common_args(p)
    args = p.parse_args(argv)
    rec = benchmark(
        model_name=args.model,
        image_size=args.image_size,
        train_batch=args.train_batch,
        infer_batch=args.infer_batch,
        dtype=args.dtype,
        attention=args.attention,
        remat=args.remat,
        steps=args.steps,
        warmup=args.warmup,
        num_classes=args.num_classes,
        act=args.act,
        optimizer=args.optimizer,
        fast_compile=args.fast_compile,
        peak_tflops=args.peak_tflops,
        find_max=args.find_max_batch,
        max_batch_limit=args.max_batch_limit,
        skip_train=args.skip_train,
        skip_infer=args.skip_infer,
        seed=args.seed,
    )
    rec["host"] = _util.host_info()
    rec["argv"] = sys.argv[1:] if argv is None else list(argv)
    print(summary(rec))
    _util.write_json(args.json, rec)
    return rec


if __name__ == "__main__":
    main()
