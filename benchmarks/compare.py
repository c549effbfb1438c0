"""Ours (JAX/Flax) against the PyTorch reference (HuggingFace CvT): same device, same recipe, same inputs.

    python -m benchmarks.compare [--variants cvt_13@224:128/256,cvt_13_32@32:256/512] [--dtype bfloat16]
        [--recipe configs/imagenet.py:variant=13] [--set KEY=VALUE ...] [--torch-modes eager,compile]
        [--jax-attention explicit,cudnn] [--steps 10] [--warmup 2] [--json OUT.json] [--markdown OUT.md]

A variant is ``name@resolution[:train_batch[/infer_batch]]``; its training recipe is ``--recipe`` or, by
default, `benchmarks.recipe.auto_recipe` (the ImageNet config for official variants, CIFAR-100's otherwise).
Our step is the training loop's own (`benchmarks.throughput`); the torch reference does the same work
(`benchmarks.torch_reference`). JAX runs first, then torch, each fed the same host arrays (NHWC for JAX, NCHW
for torch). By default each (variant, framework) pair runs in its own child process with its own time limit
(``--jax-timeout-s``, ``--torch-timeout-s``), so that a slow torch.compile cannot starve our rows, device-memory
peaks (XLA's ``peak_bytes_in_use`` only grows) do not leak between rows, and an out-of-memory or crash costs one
row; ``--no-isolate`` runs everything in this one process.

Ours is built with ``act='gelu'`` by default, the activation of the HuggingFace port (``--act quick_gelu`` for
the official one; then torch rows are skipped). Prints a markdown table and the ratios ours / torch.compile
and ours / eager (train and inference images/s); ``--json`` writes every record.
"""

from __future__ import annotations

import os

# Before JAX starts its backend: allocate on demand instead of grabbing 75% of the GPU, so that torch and JAX
# share the device and JAX's peak is what it really uses.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.recipe import DTYPES, Workload, workload_from_args  # noqa: E402

DEFAULT_VARIANTS = "cvt_13@224:128/256,cvt_21@224:128/256,cvt_w24@224:32/64,cvt_13_32@32:256/512"


@dataclasses.dataclass(frozen=True)
class VariantRun:
    """One variant to benchmark: ``name@resolution:train_batch/infer_batch``."""

    name: str
    image_size: int
    train_batch: int
    infer_batch: int

    @property
    def label(self) -> str:
        return f"{self.name}@{self.image_size}"

    def to_arg(self) -> str:
        return f"{self.name}@{self.image_size}:{self.train_batch}/{self.infer_batch}"


def parse_variants(text: str, default_train: int = 128, default_infer: int | None = None) -> list[VariantRun]:
    """Parses ``name@res[:train[/infer]],...`` (resolution defaults to the variant's own).

    Raises:
      ValueError: naming the malformed item and the expected form.
    """
    from cvt_flax.models import get_variant

    out = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        try:
            head, _, batches = item.partition(":")
            name, _, res = head.partition("@")
            image_size = int(res) if res else get_variant(name).image_size
            tb, _, ib = batches.partition("/")
            train_batch = int(tb) if tb else default_train
            infer_batch = int(ib) if ib else (default_infer or 2 * train_batch)
        except ValueError as err:
            raise ValueError(
                f"Bad variant {item!r} ({err}); write name@resolution[:train_batch[/infer_batch]], "
                "e.g. cvt_13@224:128/256."
            ) from None
        out.append(VariantRun(get_variant(name).name, image_size, train_batch, infer_batch))
    if not out:
        raise ValueError("No variants given; e.g. --variants cvt_13@224:128/256.")
    return out


def _error_row(framework: str, mode: str, v: VariantRun, err: BaseException | str) -> dict[str, Any]:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    return {
        "framework": framework,
        "mode": mode,
        "model": v.name,
        "image_size": v.image_size,
        "train_batch": v.train_batch,
        "infer_batch": v.infer_batch,
        "error": text[:2000],
        "oom": (not isinstance(err, str)) and harness.is_oom(err),
    }


def workload(v: VariantRun, args: argparse.Namespace) -> Workload:
    """The `Workload` of a variant under the command's recipe, dtype, activation and steps."""
    return workload_from_args(args, v.name, v.image_size, v.train_batch, v.infer_batch)


def shared_inputs(w: Workload) -> dict[str, np.ndarray]:
    """The host arrays both frameworks are fed (the same in every process for the same seed)."""
    rng = np.random.default_rng(w.seed)
    s = w.image_size
    return {
        "train_images": rng.standard_normal((w.train_batch, s, s, 3), dtype=np.float32),
        "train_labels": rng.integers(0, w.num_classes, (w.train_batch,), dtype=np.int32),
        "infer_images": rng.standard_normal((w.infer_batch, s, s, 3), dtype=np.float32),
    }


def run_variant(
    v: VariantRun, args: argparse.Namespace, on_row: Any = None, frameworks: tuple[str, ...] = ("jax", "torch")
) -> list[dict[str, Any]]:
    """Benchmarks one variant in this process: the JAX attention implementations first, then the torch modes.

    ``on_row(rows_so_far)`` is called after each row (compare.py saves its JSON there, so that a child killed by
    its timeout still leaves the rows it finished).
    """
    w = workload(v, args)
    inputs = shared_inputs(w)
    common = dict(
        peak_tflops=args.peak_tflops, find_max=args.find_max_batch, max_batch_limit=args.max_batch_limit, inputs=inputs
    )
    rows: list[dict[str, Any]] = []

    def add(rec: dict[str, Any], t0: float) -> None:
        rec["wall_s"] = time.perf_counter() - t0
        print(_row_line(rec), flush=True)
        rows.append(rec)
        if on_row:
            on_row(rows)

    if "jax" in frameworks:
        from benchmarks import throughput

        profile_dir = os.path.join(args.profile_dir, v.label) if args.profile_dir else None

        for attention in [a.strip() for a in args.jax_attention.split(",") if a.strip()]:
            t0 = time.perf_counter()
            try:
                rec = throughput.benchmark(
                    w, attention=attention, remat=args.remat, fast_compile=args.fast_compile,
                    profile_dir=profile_dir if attention == args.jax_attention.split(",")[0].strip() else None,
                    **common,
                )  # fmt: skip
                if args.expect_platform and rec["platform"] != args.expect_platform:
                    raise RuntimeError(
                        f"JAX runs on {rec['platform']!r}, not {args.expect_platform!r} (--expect-platform): "
                        "is the accelerator plugin installed and visible?"
                    )
            except Exception as err:  # noqa: BLE001 - recorded, the other rows still run
                traceback.print_exc()
                rec = _error_row("jax", f"jit/{attention}", v, err)
            add(rec, t0)
    torch_modes = [m.strip() for m in (args.torch_modes or "").split(",") if m.strip()]
    if "torch" in frameworks and torch_modes:
        if args.act != "gelu":
            print(f"[compare] --act {args.act}: the HuggingFace reference has exact GELU only; no torch rows.")
            return rows
        try:
            from benchmarks import torch_reference
        except ImportError as err:
            print(f"[compare] torch/transformers not importable ({err}); skipping the PyTorch reference.")
            return rows
        for mode in torch_modes:
            t0 = time.perf_counter()
            try:
                rec = torch_reference.benchmark(
                    w, mode=mode, channels_last=args.channels_last, compile_mode=args.compile_mode, **common
                )
            except Exception as err:  # noqa: BLE001
                traceback.print_exc()
                rec = _error_row("torch", mode, v, err)
            add(rec, t0)
            torch_reference.free_memory()
    return rows


def _row_line(rec: dict[str, Any]) -> str:
    head = f"[compare] {rec['model']}@{rec['image_size']} {rec['framework']}/{rec['mode']}"
    if "error" in rec:
        return f"{head}: ERROR {rec['error'].splitlines()[0][:200]}"
    return (
        f"{head}: train {harness.fmt(rec.get('train_images_per_s'))} img/s, "
        f"infer {harness.fmt(rec.get('infer_images_per_s'))} img/s ({harness.fmt(rec.get('wall_s'), 1)} s)"
    )


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours / torch.compile and ours / eager, train and inference images/s, per variant and JAX row."""
    out = []
    keyed: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if "error" in r:
            continue
        key = (r["model"], r["image_size"])
        keyed.setdefault(key, {})[f"{r['framework']}:{r['mode']}"] = r
    for (model, size), group in keyed.items():
        torch_rows = {k.split(":", 1)[1].split("/")[0]: r for k, r in group.items() if k.startswith("torch:")}
        for k, ours in group.items():
            if not k.startswith("jax:"):
                continue
            entry: dict[str, Any] = {"model": model, "image_size": size, "ours": ours["mode"]}
            for ref_mode, ref_name in (("compile", "torch_compile"), ("eager", "torch_eager")):
                ref = torch_rows.get(ref_mode)
                for phase in ("train", "infer"):
                    a = ours.get(f"{phase}_images_per_s")
                    b = ref.get(f"{phase}_images_per_s") if ref else None
                    entry[f"{phase}_ours_over_{ref_name}"] = a / b if a and b else None
            out.append(entry)
    return out


def markdown(rows: list[dict[str, Any]], rats: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table and the ratio table, in markdown."""
    lines = [
        f"Device: {meta.get('device_kind', '?')} | dtype {meta.get('dtype')} | steps {meta.get('steps')} "
        f"(median) | warmup {meta.get('warmup')} | {meta.get('time', '')}",
        "",
        "| variant | res | batch (train/infer) | framework/mode | train img/s | infer img/s | MFU train | MFU infer "
        "| peak mem GiB | XLA est. GiB | compile s (train/infer) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fw = f"{r['framework']}/{r['mode']}"
        batch = f"{r['train_batch']}/{r['infer_batch']}"
        if "error" in r:
            err = r["error"].splitlines()[0][:80].replace("|", "/")
            kind = "OOM" if r.get("oom") else ("skipped" if err.startswith("skipped") else "error")
            lines.append(f"| {r['model']} | {r['image_size']} | {batch} | {fw} | {kind}: {err} | | | | | | |")
            continue
        peak = r.get("train_peak_bytes_in_use") or r.get("peak_bytes_in_use")
        est = r.get("train_memory_estimate_bytes")
        comp = f"{harness.fmt(r.get('train_compile_s'))}/{harness.fmt(r.get('infer_compile_s'))}"
        lines.append(
            f"| {r['model']} | {r['image_size']} | {batch} | {fw} | {harness.fmt(r.get('train_images_per_s'))} "
            f"| {harness.fmt(r.get('infer_images_per_s'))} | {harness.pct(r.get('mfu_train'))} "
            f"| {harness.pct(r.get('mfu_infer'))} | {harness.gib(peak)} | {harness.gib(est)} "
            f"| {comp} |"
        )
        if r.get("max_train_batch") is not None or "max_batch_search" in r:
            lines[-1] = lines[-1][:-1] + f" max train batch {r.get('max_train_batch')} |"
    recipes = {f"{r['model']}@{r['image_size']}": r["recipe"] for r in rows if r.get("recipe")}
    if recipes:
        lines += ["", "Recipes (the training config whose step is timed): "
                  + "; ".join(f"{k}: `{v}`" for k, v in recipes.items())]  # fmt: skip
    if rats:
        lines += [
            "",
            "| variant | ours | train / torch.compile | train / eager | infer / torch.compile | infer / eager |",
            "|---|---|---|---|---|---|",
        ]

        def x(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}x"

        for e in rats:
            lines.append(
                f"| {e['model']}@{e['image_size']} | jax/{e['ours']} | {x(e['train_ours_over_torch_compile'])} "
                f"| {x(e['train_ours_over_torch_eager'])} | {x(e['infer_ours_over_torch_compile'])} "
                f"| {x(e['infer_ours_over_torch_eager'])} |"
            )
    return "\n".join(lines) + "\n"


def _meta(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "act_ours": args.act,
        "recipe": args.recipe or "auto (benchmarks.recipe.auto_recipe)",
        "sets": list(args.set),
        "torch_modes": args.torch_modes,
        "jax_attention": args.jax_attention,
        **harness.host_info(),
    }
    for r in rows:
        for k in ("device_kind", "jax_version", "flax_version", "torch_version", "transformers_version"):
            if k in r and k not in meta and (k != "device_kind" or r["framework"] == "jax"):
                meta[k] = r[k]
    if "device_kind" not in meta:
        meta["device_kind"] = next((r["device_kind"] for r in rows if "device_kind" in r), None)
    return meta


def _child_argv(v: VariantRun, args: argparse.Namespace, framework: str, json_path: str) -> list[str]:
    argv = [
        sys.executable, "-m", "benchmarks.compare", "--no-isolate", "--only", framework, "--variants", v.to_arg(),
        "--json", json_path, "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--num-classes", str(args.num_classes), "--torch-modes", args.torch_modes or "",
        "--jax-attention", args.jax_attention, "--act", args.act, "--seed", str(args.seed), "--quiet",
    ]  # fmt: skip
    if args.recipe:
        argv += ["--recipe", args.recipe]
    for item in args.set:
        argv += ["--set", item]
    for flag, value in (("--peak-tflops", args.peak_tflops), ("--max-batch-limit", args.max_batch_limit),
                        ("--compile-mode", args.compile_mode), ("--profile-dir", args.profile_dir),
                        ("--expect-platform", args.expect_platform)):  # fmt: skip
        if value:
            argv += [flag, str(value)]
    for flag, on in (("--find-max-batch", args.find_max_batch), ("--channels-last", args.channels_last),
                     ("--remat", args.remat), ("--fast-compile", args.fast_compile)):  # fmt: skip
        if on:
            argv.append(flag)
    return argv


def _run_child(argv: list[str], timeout: float | None) -> int | str:
    """Runs a child in its own process group, so that a timeout also stops its helpers (inductor's compile
    workers); returns its exit code or 'timeout'."""
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "timeout"
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def _run_isolated(variants: list[VariantRun], args: argparse.Namespace, save: Any) -> list[dict[str, Any]]:
    """Each (variant, framework) in a child process: JAX first, then torch, each with its own time limit."""
    rows: list[dict[str, Any]] = []
    start = time.monotonic()
    groups = [("jax", args.jax_timeout_s)]
    if args.torch_modes and args.act == "gelu":
        groups.append(("torch", args.torch_timeout_s))
    for v in variants:
        for framework, limit in groups:
            elapsed = time.monotonic() - start
            if args.budget_s and elapsed > args.budget_s:
                print(f"[compare] budget of {args.budget_s:.0f} s spent ({elapsed:.0f} s); skipping {v.label} "
                      f"{framework}.")  # fmt: skip
                rows.append(_error_row(framework, "-", v, f"skipped: --budget-s {args.budget_s:.0f} s spent"))
                save(rows)
                continue
            timeout = limit or None
            if args.budget_s:
                # The rest of the budget plus a minute of grace (never less than 90 s), capped by the limit.
                rest = max(90.0, args.budget_s - elapsed + 60.0)
                timeout = rest if timeout is None else min(timeout, rest)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "rows.json")
                print(f"[compare] === {v.to_arg()} {framework} (child process, limit {timeout or '-'} s) ===",
                      flush=True)  # fmt: skip
                code = _run_child(_child_argv(v, args, framework, path), timeout)
                if os.path.exists(path):
                    with open(path) as f:
                        rows.extend(json.load(f)["rows"])
                if code != 0:
                    what = f"child process ended with {code} after {time.monotonic() - start - elapsed:.0f} s"
                    rows.append(_error_row(framework, "-", v, f"{what} (rows above, if any, finished)"))
            save(rows)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="name@res[:train[/infer]],... (comma-separated)")
    p.add_argument("--recipe", default="", help="training config of every variant (default: by variant)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps, the first (compiling) one included")
    p.add_argument("--num-classes", type=int, default=0, help="classifier outputs (0: the recipe dataset's)")
    p.add_argument("--torch-modes", default="eager,compile", help="comma-separated eager,compile ('' skips torch)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor's default)")
    p.add_argument("--channels-last", action="store_true", help="torch: channels_last memory format")
    p.add_argument("--jax-attention", default="explicit", help="comma-separated explicit,xla,cudnn")
    p.add_argument("--act", default="gelu", help="our activation: gelu (as the HF port) or quick_gelu (official)")
    p.add_argument("--remat", action="store_true", help="ours: rematerialise blocks")
    p.add_argument("--fast-compile", action="store_true", help="ours: unoptimised XLA codegen (smoke tests only)")
    p.add_argument("--profile-dir", default=None, help="ours: trace 5 train steps (first attention) into this dir")
    p.add_argument("--expect-platform", default=None, help="fail JAX rows not on this platform (e.g. gpu)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak TFLOP/s for MFU")
    p.add_argument("--find-max-batch", action="store_true", help="also double the train batch until OOM")
    p.add_argument("--max-batch-limit", type=int, default=None)
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help="run everything in this process")
    p.add_argument("--only", choices=("jax", "torch"), default=None, help="run one framework's rows only")
    p.add_argument("--budget-s", type=float, default=0.0, help="skip rows once this many seconds have passed")
    p.add_argument("--jax-timeout-s", type=float, default=0.0, help="limit of a variant's JAX child")
    p.add_argument("--torch-timeout-s", type=float, default=0.0, help="limit of a variant's torch child")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write {meta, rows, ratios, markdown} here")
    p.add_argument("--markdown", default=None, help="write the tables here")
    p.add_argument("--quiet", action="store_true", help="do not print the final tables")
    p.add_argument("--merge", nargs="+", default=None, help="only combine these compare JSON files into one")
    return p


def merge(paths: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of several compare.py JSON files (missing files are skipped) and the first file's meta."""
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for path in paths:
        if not os.path.exists(path):
            print(f"[compare] --merge: {path} does not exist; skipped.")
            continue
        with open(path) as f:
            data = json.load(f)
        rows.extend(data.get("rows", []))
        meta = meta or data.get("meta", {})
    return rows, meta


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.merge:
        rows, meta = merge(args.merge)
        rats = ratios(rows)
        out = {"meta": meta, "rows": rows, "ratios": rats, "markdown": markdown(rows, rats, meta)}
        harness.write_json(args.json, out)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(out["markdown"])
        if not args.quiet:
            print(out["markdown"])
        return out
    variants = parse_variants(args.variants)

    def payload(rows: list[dict[str, Any]]) -> dict[str, Any]:
        meta = _meta(args, rows)
        rats = ratios(rows)
        return {"meta": meta, "rows": rows, "ratios": rats, "markdown": markdown(rows, rats, meta)}

    def save(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out = payload(rows)
        harness.write_json(args.json, out)
        if args.markdown:
            os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
            with open(args.markdown, "w") as f:
                f.write(out["markdown"])
        return out

    if args.isolate:
        rows = _run_isolated(variants, args, save)
    else:
        frameworks = (args.only,) if args.only else ("jax", "torch")
        rows = []
        for v in variants:
            done = list(rows)
            rows = done + run_variant(v, args, on_row=lambda r, done=done: save(done + r), frameworks=frameworks)
            save(rows)
    out = save(rows)
    if not args.quiet:
        print()
        print(out["markdown"])
    return out


if __name__ == "__main__":
    from cvt_flax import hostmem

    hostmem.reexec_with_huge_pages()  # Both frameworks get the same allocator settings (see cvt_flax.hostmem).
    main()
