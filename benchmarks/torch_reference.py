"""PyTorch reference throughput: HuggingFace ``CvtForImageClassification`` doing our training recipe's work.

    python -m benchmarks.torch_reference --model cvt_13 --image-size 224 --train-batch 128 --infer-batch 256 \
        [--recipe configs/imagenet.py:variant=13] [--set KEY=VALUE ...] --modes eager,compile [--channels-last] \
        [--find-max-batch] [--json OUT]

No download: the model is built from a `CvtConfig` that maps our `CvTSpec` (with the recipe's stochastic
depth) field by field (random weights; throughput does not depend on them). The train step does what the
recipe's JAX step does (`benchmarks.recipe.train_recipe`): label smoothing, Mixup/CutMix of the batch with its
reverse (timm batch mode) when the recipe mixes, forward under autocast (``--dtype bfloat16``), soft-target
cross-entropy in float32, backward, the gradient norm (clipped when the recipe clips), AdamW
(``fused=True`` on CUDA) with the same decay groups (no decay on biases, norms and the class token), the
warmup-cosine learning rate per step, ``zero_grad``, and the accuracy metric. Inference: ``eval()`` and
``torch.inference_mode``, with the eval metrics (loss, top-1, top-5) as our eval step. ``--modes
eager,compile`` runs eager and ``torch.compile`` of the model (default inductor mode; ``--compile-mode
max-autotune`` etc.). Timing: `benchmarks.harness.measure`, each step synchronised (``torch.cuda.synchronize``).

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
import dataclasses
import gc
import math
import sys
from typing import Any

import numpy as np
import torch

from benchmarks import harness
from benchmarks.recipe import Workload, add_workload_args, train_recipe, workload_from_args
from cvt_flax import flops
from cvt_flax.models.spec import CvTSpec

MODES = ("eager", "compile")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def workload_spec(config: Any) -> CvTSpec:
    """The spec our model trains with under ``config`` (variant plus the recipe's drop rates), RGB input."""
    # These modules import jax.numpy (for dtypes): only JAX's Python side, no device is touched.
    from cvt_flax import train_utils as tu
    from cvt_flax.models.registry import get_spec

    return get_spec(config.model, **tu.spec_overrides(config, 3))


def cvt_config_from_spec(spec: CvTSpec, num_classes: int = 1000) -> Any:
    """A HuggingFace `CvtConfig` with the architecture of ``spec`` (`cvt_flax.models.weights.hf_config_from_spec`).

    Raises:
      ValueError: for ``qkv_proj_method='avg'``, which the HuggingFace port does not implement.
    """
    from transformers import CvtConfig

    from cvt_flax.models.weights import hf_config_from_spec

    return CvtConfig(**hf_config_from_spec(spec, num_classes))


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


class TorchBackend:
    """`harness.Backend` for one torch device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.platform = device.type
        self.device_kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def sync(self, result: Any) -> None:
        del result
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None

    def free(self) -> None:
        free_memory(self.device)


def _autocast(device: torch.device, dtype: str) -> Any:
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_TORCH_DTYPES[dtype])


def free_memory(device: torch.device | None = None) -> None:
    """Collects garbage and returns torch's cached CUDA blocks (so that JAX can use them)."""
    del device
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


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups as our `weight_decay_mask`: no decay on biases, norms (ndim <= 1) and class tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or "cls_token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, recipe: dict[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimizer: AdamW (``fused=True`` on CUDA) or SGD with momentum, with our decay groups."""
    groups = decay_groups(model, recipe["weight_decay"])
    lr = recipe["learning_rate"]
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=recipe["momentum"], nesterov=recipe["nesterov"])
    if recipe["optimizer"] != "adamw":
        raise ValueError(f"Unknown optimizer {recipe['optimizer']!r}; choose adamw or sgd.")
    betas = (recipe["b1"], recipe["b2"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=recipe["eps"], fused=device.type == "cuda")


def lr_factor(recipe: dict[str, Any]) -> Any:
    """Step -> learning rate / peak, as `train_utils.create_learning_rate_schedule` (warmup, then cosine)."""
    peak, warm, total = recipe["learning_rate"], recipe["warmup_steps"], recipe["total_steps"]
    init, end = recipe["warmup_init_lr"], recipe["min_learning_rate"]

    def factor(step: int) -> float:
        if warm and step < warm:
            return (init + (peak - init) * step / warm) / peak
        span = max(total, warm + 1) - warm
        t = min(max(step - warm, 0), span) / span
        return (end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))) / peak

    return factor


def mix_batch(
    x: torch.Tensor, targets: torch.Tensor, recipe: dict[str, Any], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup/CutMix of a batch with its reverse (timm batch mode, one lambda per batch), as `data.mix_batch`."""
    ma, ca, prob = recipe["mixup_alpha"], recipe["cutmix_alpha"], recipe["mix_prob"]
    if (ma <= 0 and ca <= 0) or prob <= 0 or rng.random() >= prob:
        return x, targets
    use_cutmix = rng.random() < recipe["cutmix_switch_prob"] if ma > 0 and ca > 0 else ca > 0
    flipped = x.flip(0)
    if use_cutmix:
        lam = float(rng.beta(ca, ca))
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
        x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - float((y1 - y0) * (x1 - x0)) / (h * w)
    else:
        lam = float(rng.beta(ma, ma))
        x = x * lam + flipped * (1.0 - lam)
    return x, targets * lam + targets.flip(0) * (1.0 - lam)


def _grad_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _compiled(net: torch.nn.Module, mode: str, compile_mode: str | None) -> torch.nn.Module:
    return torch.compile(net, mode=compile_mode) if mode == "compile" else net


def train_phase(
    w: Workload,
    config: Any,
    backend: TorchBackend,
    mode: str,
    batch: int,
    *,
    channels_last: bool = False,
    compile_mode: str | None = None,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> tuple[harness.Phase, torch.nn.Module]:
    """Builds and times the reference train step at ``batch``; returns the phase (last: loss) and the model."""
    device = backend.device
    recipe = train_recipe(config, w.num_classes)
    torch.manual_seed(w.seed)
    model = build_model(workload_spec(config), w.num_classes, device, channels_last).train()
    net = _compiled(_Logits(model), mode, compile_mode)
    opt = make_optimizer(model, recipe, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(recipe))
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = _inputs(batch, w.image_size, 3, w.num_classes, device, channels_last, images, labels, w.seed)
    smoothing, k = recipe["label_smoothing"], w.num_classes
    rng = np.random.default_rng(w.seed)

    def step() -> dict[str, torch.Tensor]:
        targets = torch.nn.functional.one_hot(y, k).float() * (1.0 - smoothing) + smoothing / k
        inputs, targets = mix_batch(x, targets, recipe, rng)
        with _autocast(device, w.dtype):
            logits = net(inputs)
        loss = torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        loss.backward()
        clip = recipe["grad_clip_norm"]
        grad_norm = _grad_norm(params, clip) if clip > 0 or recipe.get("log_grad_norm", True) else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        accuracy = (logits.argmax(-1) == y).float().mean()
        out = {"loss": loss.detach(), "accuracy": accuracy}
        return out if grad_norm is None else {**out, "grad_norm": grad_norm}

    phase = harness.measure(step, backend, batch=batch, warmup=w.warmup, steps=w.steps)
    return phase, model


def infer_phase(
    w: Workload,
    model: torch.nn.Module,
    backend: TorchBackend,
    mode: str,
    *,
    channels_last: bool = False,
    compile_mode: str | None = None,
    images: np.ndarray | None = None,
) -> harness.Phase:
    """Times the reference eval step: ``eval()`` forward under ``inference_mode`` and the eval metrics."""
    model.eval()
    net = _compiled(_Logits(model), mode, compile_mode)
    labels = None if images is None else np.zeros(len(images), np.int64)
    x, y = _inputs(
        w.infer_batch, w.image_size, 3, w.num_classes, backend.device, channels_last, images, labels, w.seed + 7
    )
    top = min(5, w.num_classes)

    def step() -> dict[str, torch.Tensor]:
        with torch.inference_mode(), _autocast(backend.device, w.dtype):
            logits = net(x).float()
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            top1 = (logits.argmax(-1) == y).float()
            top5 = (logits.topk(top, dim=-1).indices == y[:, None]).any(-1).float()
            return {"loss": loss, "accuracy": top1, "top5_accuracy": top5}

    return harness.measure(step, backend, batch=w.infer_batch, warmup=w.warmup, steps=w.steps)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def benchmark(
    w: Workload,
    *,
    mode: str = "eager",
    channels_last: bool = False,
    compile_mode: str | None = None,
    peak_tflops: float | None = None,
    find_max: bool = False,
    max_batch_limit: int | None = None,
    skip_train: bool = False,
    skip_infer: bool = False,
    inputs: dict[str, Any] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Benchmarks the HuggingFace CvT on a workload in one mode; a record with the keys of throughput.py's.

    Args:
      w: The workload (recipe config, model, size, batches, dtype, steps).
      mode: ``eager`` or ``compile``.
      channels_last: Model and input in ``channels_last`` memory format.
      compile_mode: ``torch.compile`` mode (None: default).
      peak_tflops: Override of the device's peak TFLOP/s for MFU.
      find_max: Also search the largest training batch that fits.
      max_batch_limit: Largest batch the search tries (default 8192 on CUDA, 4x the start on CPU).
      skip_train: Skip training.
      skip_infer: Skip inference.
      inputs: Optional host arrays ``{'train_images', 'train_labels', 'infer_images'}`` (NHWC float32).
      device: Torch device (default: CUDA if available).

    Returns:
      The record (dict).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown torch mode {mode!r}; choose from {MODES}.")
    if w.dtype not in _TORCH_DTYPES:
        raise ValueError(f"Unknown dtype {w.dtype!r}; choose one of {sorted(_TORCH_DTYPES)}.")
    if w.act != "gelu":
        raise ValueError(f"The HuggingFace CvT has exact GELU only; benchmark ours with --act gelu, not {w.act!r}.")
    backend = TorchBackend(device or default_device())
    device = backend.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotuned convolutions (XLA autotunes as well)
        # float32 runs: TF32 matmuls, as XLA's default precision on Ampere and newer (no effect on bf16 autocast).
        torch.set_float32_matmul_precision("high")
    config = w.config()
    spec = workload_spec(config)
    spec.token_grid(w.image_size, w.image_size)
    train_fpi = flops.train_flops_per_image(spec, w.image_size, w.num_classes)
    infer_fpi = flops.inference_flops_per_image(spec, w.image_size, w.num_classes)
    import transformers

    full_mode = mode + (f"/{compile_mode}" if mode == "compile" and compile_mode else "")
    full_mode += "/channels_last" if channels_last else ""
    rec = harness.base_record(
        "torch", full_mode, w, backend, train_flops_per_image=train_fpi, inference_flops_per_image=infer_fpi,
        peak_tflops=peak_tflops,
    )  # fmt: skip
    peak = rec["peak_tflops"]
    recipe = train_recipe(config, w.num_classes)
    rec.update(
        channels_last=channels_last,
        device=str(device),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        optimizer=recipe["optimizer"],
        fused_adamw=recipe["optimizer"] == "adamw" and device.type == "cuda",
    )
    inputs = inputs or {}
    model = None
    if not skip_train:
        phase, model = train_phase(
            w, config, backend, mode, w.train_batch, channels_last=channels_last, compile_mode=compile_mode,
            images=inputs.get("train_images"), labels=inputs.get("train_labels"),
        )  # fmt: skip
        rec.update(harness.phase_fields("train", phase, train_fpi, peak))
        # torch.compile compiles inside the first call: its time (compile + one step) is the compile time.
        rec["train_compile_s"] = phase.first_step_s if mode == "compile" else None
        rec["train_loss"] = float(phase.last["loss"])
        rec["train_grad_norm"] = float(phase.last["grad_norm"]) if "grad_norm" in phase.last else None
    if model is None:
        torch.manual_seed(w.seed)
        model = build_model(spec, w.num_classes, device, channels_last)
    rec["num_params"] = int(sum(p.numel() for p in model.parameters()))
    if not skip_infer:
        free_memory(device)
        phase = infer_phase(
            w, model, backend, mode, channels_last=channels_last, compile_mode=compile_mode,
            images=inputs.get("infer_images"),
        )  # fmt: skip
        rec.update(harness.phase_fields("infer", phase, infer_fpi, peak))
        rec["infer_compile_s"] = phase.first_step_s if mode == "compile" else None
    del model
    free_memory(device)
    harness.finish_record(rec)
    if find_max:
        if max_batch_limit is None:
            max_batch_limit = 4 * w.train_batch if device.type == "cpu" else 8192
        quick = dataclasses.replace(w, warmup=1, steps=2)

        def at(batch: int) -> float | None:
            cfg = w.config(batch)
            return train_phase(quick, cfg, backend, mode, batch, channels_last=channels_last,
                               compile_mode=compile_mode)[0].images_per_s  # fmt: skip

        known = [{"batch": w.train_batch, "fits": True, "images_per_s": rec.get("train_images_per_s")}]
        rec["max_batch_search"] = harness.find_max_batch(
            at, w.train_batch, max_batch_limit, known=known if "train_images_per_s" in rec else [],
            cleanup=backend.free,
        )  # fmt: skip
        rec["max_train_batch"] = rec["max_batch_search"]["max_train_batch"]
    return rec


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cvt_13")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-infer", action="store_true")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_workload_args(p)
    args = p.parse_args(argv)
    w = workload_from_args(args, args.model, args.image_size, args.train_batch, args.infer_batch)
    device = torch.device(args.device) if args.device else default_device()
    recs = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        rec = benchmark(
            w,
            mode=mode,
            channels_last=args.channels_last,
            compile_mode=args.compile_mode,
            peak_tflops=args.peak_tflops,
            find_max=args.find_max_batch,
            max_batch_limit=args.max_batch_limit,
            skip_train=args.skip_train,
            skip_infer=args.skip_infer,
            device=device,
        )
        rec["host"] = harness.host_info()
        rec["argv"] = sys.argv[1:] if argv is None else list(argv)
        print(summary(rec))
        recs.append(rec)
    harness.write_json(args.json, recs)
    return recs


def summary(rec: dict[str, Any]) -> str:
    """A few human-readable lines of a record."""
    fmt, gib, pct = harness.fmt, harness.gib, harness.pct
    lines = [
        f"{rec['model']}@{rec['image_size']} torch/{rec['mode']} {rec['dtype']} on {rec['device_kind']} "
        f"({rec.get('recipe')})"
    ]
    if "train_images_per_s" in rec:
        lines.append(
            f"  train  batch {rec['train_batch']}: {fmt(rec['train_images_per_s'])} img/s, "
            f"MFU {pct(rec.get('mfu_train'))}, first step {fmt(rec['train_first_step_s'], 2)} s, "
            f"peak {gib(rec.get('train_peak_bytes_in_use'))} GiB"
        )
    if "infer_images_per_s" in rec:
        lines.append(
            f"  infer  batch {rec['infer_batch']}: {fmt(rec['infer_images_per_s'])} img/s, "
            f"MFU {pct(rec.get('mfu_infer'))}, first step {fmt(rec['infer_first_step_s'], 2)} s"
        )
    if "max_train_batch" in rec:
        lines.append(f"  largest training batch that fits: {rec['max_train_batch']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
