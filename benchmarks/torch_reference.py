"""PyTorch reference throughput: HuggingFace ``CvtForImageClassification`` built from our variant's spec.

    python -m benchmarks.torch_reference --model cvt_13 --image-size 224 --train-batch 128 --infer-batch 256 \
        --dtype bfloat16 --modes eager,compile [--channels-last] [--find-max-batch] [--json OUT]

No download: the model is built from a `CvtConfig` that maps our `CvTSpec` field by field (random weights;
throughput does not depend on them). Train step: forward under autocast (``--dtype bfloat16`` on CUDA, or on
CPU where it is slow but works), cross-entropy, backward, AdamW (``fused=True`` on CUDA), ``zero_grad``;
inference under ``torch.inference_mode``. ``--modes eager,compile`` runs eager and ``torch.compile`` (default
inductor mode; ``--compile-mode max-autotune`` etc.). Timing: median step with ``torch.cuda.synchronize``.

Differences from our model that the numbers carry (HuggingFace port): exact-erf GELU instead of the
official quick-GELU (compare.py builds ours with ``act='gelu'`` to match), and the port's stochastic depth
drops the whole block output, residual included (same cost). `build_model` works around the port's per-stage
drop-path rate (``linspace(0, rate, depth)[stage]``, an IndexError for shallow stages) by setting the official
per-block rates. ``qkv_proj_method='avg'`` has no HF equivalent (an error says so).

This module never initialises a JAX backend (it imports cvt_flax only for the spec and FLOP counts).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from typing import Any

import numpy as np
import torch

from benchmarks import _util
from cvt_flax import flops
from cvt_flax.models.spec import CvTSpec

MODES = ("eager", "compile")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _get_spec(name: str) -> CvTSpec:
    # The registry module imports jax.numpy (for dtypes); importing it here is cheap once compare.py has
    # imported JAX, and standalone it only initialises JAX's Python side (no device is touched).
    from cvt_flax.models.registry import get_spec

    return get_spec(name)


def cvt_config_from_spec(spec: CvTSpec, num_classes: int = 1000) -> Any:
    """A HuggingFace `CvtConfig` with the architecture of ``spec``.

    Args:
      spec: Our architecture.
      num_classes: Classifier outputs.

    Returns:
      ``transformers.CvtConfig``.

    Raises:
      ValueError: for ``qkv_proj_method='avg'``, which the HuggingFace port does not implement.
    """
    from transformers import CvtConfig

    if "avg" in spec.qkv_proj_method:
        raise ValueError(
            "The HuggingFace CvT has no 'avg' key/value projection (only dw_bn and linear); benchmark a variant "
            f"with qkv_proj_method in ('dw_bn', 'linear'), got {spec.qkv_proj_method}."
        )
    return CvtConfig(
        num_channels=spec.in_chans,
        patch_sizes=list(spec.patch_size),
        patch_stride=list(spec.patch_stride),
        patch_padding=list(spec.patch_padding),
        embed_dim=list(spec.dim_embed),
        num_heads=list(spec.num_heads),
        depth=list(spec.depth),
        mlp_ratio=list(spec.mlp_ratio),
        attention_drop_rate=list(spec.attn_drop_rate),
        drop_rate=list(spec.drop_rate),
        drop_path_rate=list(spec.drop_path_rate),
        qkv_bias=list(spec.qkv_bias),
        cls_token=list(spec.cls_token),
        qkv_projection_method=list(spec.qkv_proj_method),
        kernel_qkv=list(spec.kernel_qkv),
        padding_kv=list(spec.padding_kv),
        stride_kv=list(spec.stride_kv),
        padding_q=list(spec.padding_q),
        stride_q=list(spec.stride_q),
        num_labels=num_classes,
        layer_norm_eps=1e-5,
    )


def build_model(spec: CvTSpec, num_classes: int, device: torch.device, channels_last: bool = False) -> torch.nn.Module:
    """``CvtForImageClassification`` with random weights on ``device`` (float32 parameters)."""
    from transformers import CvtForImageClassification
    from transformers.models.cvt import modeling_cvt

    config = cvt_config_from_spec(spec, num_classes)
    # The port picks each stage's drop-path rate as ``linspace(0, rate, depth)[stage]``, which raises an
    # IndexError when a stage has no more blocks than its index (cvt_tiny, cvt_mini) and gives all blocks of a
    # stage one rate. Build with enough blocks, cut back to the spec's depth, and set the official per-block
    # rates (as our model has them), so that both frameworks run the same stochastic depth.
    config.depth = [max(d, i + 1) for i, d in enumerate(spec.depth)]
    model = CvtForImageClassification(config)
    for i, stage in enumerate(model.cvt.encoder.stages):
        stage.layers = torch.nn.Sequential(*list(stage.layers)[: spec.depth[i]])
        for layer, rate in zip(stage.layers, np.linspace(0.0, spec.drop_path_rate[i], spec.depth[i]), strict=True):
            layer.drop_path = modeling_cvt.CvtDropPath(float(rate)) if rate > 0 else torch.nn.Identity()
    model.config.depth = list(spec.depth)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class _Logits(torch.nn.Module):
    """Wraps the HF model to return plain logits (simpler graphs for torch.compile)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x, return_dict=False)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str) -> Any:
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_TORCH_DTYPES[dtype])


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: torch.device | None = None) -> None:
    """Collects garbage and returns torch's cached CUDA blocks (so that JAX can use them)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()


def _inputs(
    batch: int,
    image_size: int,
    in_chans: int,
    num_classes: int,
    device: torch.device,
    channels_last: bool,
    images_nhwc: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    if images_nhwc is None:
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        x = torch.randn(batch, in_chans, image_size, image_size, generator=g)
        y = torch.randint(0, num_classes, (batch,), generator=g)
    else:
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc, np.float32).transpose(0, 3, 1, 2)))
        y = torch.from_numpy(np.asarray(labels if labels is not None else np.zeros(len(x)), np.int64))
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device)


def make_optimizer(model: torch.nn.Module, name: str, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (``fused=True`` on CUDA; decay on matrices only, as ours) or SGD with momentum 0.9."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    if name != "adamw":
        raise ValueError(f"Unknown optimizer {name!r}; choose adamw or sgd.")
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")


def _train_run(
    spec: CvTSpec,
    mode: str,
    batch: int,
    image_size: int,
    num_classes: int,
    dtype: str,
    device: torch.device,
    warmup: int,
    steps: int,
    channels_last: bool,
    compile_mode: str | None,
    seed: int,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    optimizer: str = "adamw",
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = build_model(spec, num_classes, device, channels_last).train()
    net = _Logits(model)
    if mode == "compile":
        net = torch.compile(net, mode=compile_mode)
    opt = make_optimizer(model, optimizer, device)
    x, y = _inputs(batch, image_size, spec.in_chans, num_classes, device, channels_last, images, labels, seed)

    box: dict[str, torch.Tensor] = {}

    def one() -> torch.Tensor:
        with _autocast(device, dtype):
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        box["loss"] = loss
        return loss

    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    one()
    _sync(device)
    first_step_s = time.perf_counter() - t0
    times = _util.time_calls(one, lambda _: _sync(device), max(0, warmup - 1), steps)
    loss = float(box["loss"].detach())
    out = {
        "times": times,
        "first_step_s": first_step_s,
        "peak": _peak(device),
        "loss": loss,
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "model": model,
    }
    return out


def _infer_run(
    model: torch.nn.Module,
    mode: str,
    batch: int,
    image_size: int,
    num_classes: int,
    dtype: str,
    device: torch.device,
    warmup: int,
    steps: int,
    channels_last: bool,
    compile_mode: str | None,
    seed: int,
    images: np.ndarray | None = None,
) -> dict[str, Any]:
    model.eval()
    net = _Logits(model)
    if mode == "compile":
        net = torch.compile(net, mode=compile_mode)
    x, _ = _inputs(batch, image_size, model.config.num_channels, num_classes, device, channels_last, images, None, seed)

    def one() -> torch.Tensor:
        with torch.inference_mode(), _autocast(device, dtype):
            return net(x)

    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    one()
    _sync(device)
    first_step_s = time.perf_counter() - t0
    times = _util.time_calls(one, lambda _: _sync(device), max(0, warmup - 1), steps)
    return {"times": times, "first_step_s": first_step_s, "peak": _peak(device)}


def find_max_batch(
    spec: CvTSpec,
    mode: str,
    start: int,
    image_size: int,
    num_classes: int,
    dtype: str,
    device: torch.device,
    limit: int,
    channels_last: bool = False,
    compile_mode: str | None = None,
    steps: int = 2,
    seed: int = 0,
    optimizer: str = "adamw",
    known: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Doubles the training batch from ``start`` until CUDA runs out of memory (or ``limit`` is passed).

    ``known``: tries already made (e.g. the benchmark's own batch, which fits); the search continues after them.
    """
    tries: list[dict[str, Any]] = list(known or [])
    best = max((t["batch"] for t in tries if t["fits"]), default=None)
    batch = start if best is None else 2 * best
    while batch <= limit:
        try:
            run = _train_run(
                spec,
                mode,
                batch,
                image_size,
                num_classes,
                dtype,
                device,
                1,
                steps,
                channels_last,
                compile_mode,
                seed,
                optimizer=optimizer,
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
            free_memory(device)
        batch *= 2
    return {"max_train_batch": best, "tries": tries, "limit": limit}


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def benchmark(
    model_name: str = "cvt_13",
    image_size: int = 224,
    train_batch: int = 128,
    infer_batch: int = 256,
    dtype: str = "bfloat16",
    mode: str = "eager",
    steps: int = 20,
    warmup: int = 3,
    num_classes: int = 1000,
    channels_last: bool = False,
    compile_mode: str | None = None,
    optimizer: str = "adamw",
    peak_tflops: float | None = None,
    find_max: bool = False,
    max_batch_limit: int | None = None,
    skip_train: bool = False,
    skip_infer: bool = False,
    seed: int = 0,
    inputs: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Benchmarks the HuggingFace CvT in one mode; returns a record with the same keys as throughput.py's.

    Args:
      model_name: Registered variant of ours; its spec is mapped to a `CvtConfig`.
      image_size: Input side.
      train_batch: Training batch.
      infer_batch: Inference batch.
      dtype: ``float32`` (no autocast) or ``bfloat16``/``float16`` (autocast).
      mode: ``eager`` or ``compile``.
      steps: Timed steps (median reported).
      warmup: Untimed steps (the first, which compiles, included).
      num_classes: Classifier outputs.
      channels_last: Model and input in ``channels_last`` memory format.
      compile_mode: ``torch.compile`` mode (None: default).
      optimizer: ``adamw`` (fused on CUDA) or ``sgd`` (momentum 0.9; smoke tests).
      peak_tflops: Override of the device's peak TFLOP/s for MFU.
      find_max: Also search the largest training batch that fits.
      max_batch_limit: Largest batch the search tries (default 8192 on CUDA, 4x the start on CPU).
      skip_train: Skip training.
      skip_infer: Skip inference.
      seed: Seed.
      inputs: Optional host arrays ``{'train_images', 'train_labels', 'infer_images'}`` (NHWC float32).
      device: Torch device (default: CUDA if available).

    Returns:
      The record (dict).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown torch mode {mode!r}; choose from {MODES}.")
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(_TORCH_DTYPES)}.")
    device = device or default_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotuned convolutions (XLA autotunes as well)
        # float32 runs: TF32 matmuls, as XLA's default precision on Ampere and newer (no effect on bf16 autocast).
        torch.set_float32_matmul_precision("high")
    spec = _get_spec(model_name)
    spec.token_grid(image_size, image_size)
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak, peak_src = _util.peak_tflops_for(kind, peak_tflops)
    train_fpi = flops.train_flops_per_image(spec, image_size, num_classes)
    infer_fpi = flops.inference_flops_per_image(spec, image_size, num_classes)
    import transformers

    rec: dict[str, Any] = {
        "framework": "torch",
        "mode": mode
        + (f"/{compile_mode}" if mode == "compile" and compile_mode else "")
        + ("/channels_last" if channels_last else ""),
        "model": model_name,
        "image_size": image_size,
        "num_classes": num_classes,
        "dtype": dtype,
        "channels_last": channels_last,
        "act": "gelu",
        "train_batch": train_batch,
        "infer_batch": infer_batch,
        "steps": steps,
        "warmup": warmup,
        "device": str(device),
        "device_kind": kind,
        "platform": device.type,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "optimizer": optimizer,
        "fused_adamw": optimizer == "adamw" and device.type == "cuda",
        "train_flops_per_image": train_fpi,
        "inference_flops_per_image": infer_fpi,
        "peak_tflops": peak,
        "peak_tflops_source": peak_src,
    }
    inputs = inputs or {}
    model = None
    if not skip_train:
        run = _train_run(
            spec,
            mode,
            train_batch,
            image_size,
            num_classes,
            dtype,
            device,
            warmup,
            steps,
            channels_last,
            compile_mode,
            seed,
            inputs.get("train_images"),
            inputs.get("train_labels"),
            optimizer,
        )
        sec = _util.median(run["times"])
        ips = train_batch / sec if sec else None
        model = run.pop("model")
        rec.update(
            train_step_s=sec,
            train_step_s_all=run["times"],
            train_images_per_s=ips,
            # torch.compile compiles inside the first call: its time (compile + one step) is the compile time.
            train_compile_s=run["first_step_s"] if mode == "compile" else None,
            train_first_step_s=run["first_step_s"],
            train_peak_bytes_in_use=run["peak"],
            train_loss=run["loss"],
            train_tflops_per_s=train_fpi * ips / 1e12 if ips else None,
            mfu_train=_util.mfu(train_fpi, ips, peak),
            num_params=run["num_params"],
        )
        del run
    if not skip_infer:
        if model is None:
            torch.manual_seed(seed)
            model = build_model(spec, num_classes, device, channels_last)
            rec["num_params"] = int(sum(p.numel() for p in model.parameters()))
        free_memory(device)
        inf = _infer_run(
            model,
            mode,
            infer_batch,
            image_size,
            num_classes,
            dtype,
            device,
            warmup,
            steps,
            channels_last,
            compile_mode,
            seed,
            inputs.get("infer_images"),
        )
        sec = _util.median(inf["times"])
        ips = infer_batch / sec if sec else None
        rec.update(
            infer_step_s=sec,
            infer_step_s_all=inf["times"],
            infer_images_per_s=ips,
            infer_compile_s=inf["first_step_s"] if mode == "compile" else None,
            infer_first_step_s=inf["first_step_s"],
            infer_peak_bytes_in_use=inf["peak"],
            infer_tflops_per_s=infer_fpi * ips / 1e12 if ips else None,
            mfu_infer=_util.mfu(infer_fpi, ips, peak),
        )
    del model
    free_memory(device)
    rec["peak_bytes_in_use"] = max(
        (v for v in (rec.get("train_peak_bytes_in_use"), rec.get("infer_peak_bytes_in_use")) if v is not None),
        default=None,
    )
    if find_max:
        if max_batch_limit is None:
            max_batch_limit = 4 * train_batch if device.type == "cpu" else 8192
        rec["max_batch_search"] = find_max_batch(
            spec,
            mode,
            train_batch,
            image_size,
            num_classes,
            dtype,
            device,
            max_batch_limit,
            channels_last,
            compile_mode,
            seed=seed,
            optimizer=optimizer,
            known=[{"batch": train_batch, "fits": True, "images_per_s": rec["train_images_per_s"]}]
            if "train_images_per_s" in rec
            else [],
        )
        rec["max_train_batch"] = rec["max_batch_search"]["max_train_batch"]
    return rec


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cvt_13")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_TORCH_DTYPES))
    p.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--find-max-batch", action="store_true")
    p.add_argument("--max-batch-limit", type=int, default=None)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    recs = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        rec = benchmark(
            model_name=args.model,
            image_size=args.image_size,
            train_batch=args.train_batch,
            infer_batch=args.infer_batch,
            dtype=args.dtype,
            mode=mode,
            steps=args.steps,
            warmup=args.warmup,
            num_classes=args.num_classes,
            channels_last=args.channels_last,
            compile_mode=args.compile_mode,
            optimizer=args.optimizer,
            peak_tflops=args.peak_tflops,
            find_max=args.find_max_batch,
            max_batch_limit=args.max_batch_limit,
            skip_train=args.skip_train,
            skip_infer=args.skip_infer,
            seed=args.seed,
            device=device,
        )
        rec["host"] = _util.host_info()
        rec["argv"] = sys.argv[1:] if argv is None else list(argv)
        print(summary(rec))
        recs.append(rec)
    _util.write_json(args.json, recs)
    return recs


def summary(rec: dict[str, Any]) -> str:
    """A few human-readable lines of a record."""
    lines = [f"{rec['model']}@{rec['image_size']} torch/{rec['mode']} {rec['dtype']} on {rec['device_kind']}"]
    if "train_images_per_s" in rec:
        lines.append(
            f"  train  batch {rec['train_batch']}: {_util.fmt(rec['train_images_per_s'])} img/s, "
            f"MFU {_util.pct(rec.get('mfu_train'))}, first step {_util.fmt(rec['train_first_step_s'], 2)} s, "
            f"peak {_util.gib(rec.get('train_peak_bytes_in_use'))} GiB"
        )
    if "infer_images_per_s" in rec:
        lines.append(
            f"  infer  batch {rec['infer_batch']}: {_util.fmt(rec['infer_images_per_s'])} img/s, "
            f"MFU {_util.pct(rec.get('mfu_infer'))}, first step {_util.fmt(rec['infer_first_step_s'], 2)} s"
        )
    if "max_train_batch" in rec:
        lines.append(f"  largest training batch that fits: {rec['max_train_batch']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
