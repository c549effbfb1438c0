"""Smoke tests of the benchmarks (tiny model, 2 steps): they run and write the documented JSON keys.

No timing is asserted; the numbers of a 2-step CPU run mean nothing.
"""

import json
import math

import pytest

from benchmarks import _util

RECORD_KEYS = {
    "framework",
    "mode",
    "model",
    "image_size",
    "dtype",
    "train_batch",
    "infer_batch",
    "device_kind",
    "train_step_s",
    "train_images_per_s",
    "train_compile_s",
    "train_peak_bytes_in_use",
    "infer_step_s",
    "infer_images_per_s",
    "infer_compile_s",
    "peak_bytes_in_use",
    "train_flops_per_image",
    "inference_flops_per_image",
    "peak_tflops",
    "mfu_train",
    "mfu_infer",
    "num_params",
}
# sgd and --fast-compile: XLA:CPU compiles the train step about four times as fast as with AdamW at -O2.
TINY = ["--dtype", "float32", "--steps", "2", "--warmup", "1", "--optimizer", "sgd", "--fast-compile"]


def test_throughput_cli_writes_record(tmp_path):
    from benchmarks import throughput

    out = tmp_path / "jax.json"
    argv = ["--model", "cvt_tiny", "--image-size", "32", "--train-batch", "4", "--infer-batch", "4", *TINY]
    throughput.main([*argv, "--skip-train", "--json", str(out)])
    rec = json.loads(out.read_text())
    assert rec["framework"] == "jax" and rec["model"] == "cvt_tiny" and rec["infer_batch"] == 4
    assert rec["infer_images_per_s"] > 0 and rec["infer_compile_s"] > 0
    assert rec["peak_tflops"] is None and rec["mfu_infer"] is None  # CPU: no peak, no MFU
    assert "train_images_per_s" not in rec


def test_compare_jax_and_torch(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks import compare

    out, md = tmp_path / "cmp.json", tmp_path / "cmp.md"
    argv = ["--variants", "cvt_tiny@32:4/4", "--torch-modes", "eager", "--no-isolate", *TINY]
    result = compare.main([*argv, "--json", str(out), "--markdown", str(md), "--quiet"])
    saved = json.loads(out.read_text())
    assert set(saved) == {"meta", "rows", "ratios", "markdown"}
    assert saved["rows"] == json.loads(json.dumps(result["rows"], default=str))
    by_fw = {r["framework"]: r for r in saved["rows"]}
    assert set(by_fw) == {"jax", "torch"}, [r.get("error") for r in saved["rows"]]
    for rec in by_fw.values():
        missing = RECORD_KEYS - set(rec)
        assert not missing, (rec["framework"], missing, rec.get("error"))
        assert rec["train_images_per_s"] > 0 and rec["infer_images_per_s"] > 0
        assert math.isfinite(rec["train_loss"])
    # Same model, same FLOP count on both sides; the parameter counts agree (torch's BN has no extra params).
    assert by_fw["jax"]["train_flops_per_image"] == by_fw["torch"]["train_flops_per_image"]
    assert by_fw["jax"]["num_params"] == by_fw["torch"]["num_params"]
    (ratio,) = saved["ratios"]
    assert ratio["train_ours_over_torch_eager"] > 0 and ratio["train_ours_over_torch_compile"] is None
    assert "| cvt_tiny | 32 | 4/4 | jax/jit/explicit |" in md.read_text()


def test_variant_parsing_and_peak_table():
    from benchmarks import compare

    v = compare.parse_variants("cvt_13@224:128/256, cvt_13_32")
    assert [(x.name, x.image_size, x.train_batch, x.infer_batch) for x in v] == [
        ("cvt_13", 224, 128, 256),
        ("cvt_13_32", 32, 128, 256),
    ]
    with pytest.raises(ValueError, match="name@resolution"):
        compare.parse_variants("cvt_13@big")
    assert _util.peak_tflops_for("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert _util.peak_tflops_for("NVIDIA H100 PCIe")[0] == 756.0
    assert _util.peak_tflops_for("TPU v5 lite")[0] == 197.0
    assert _util.peak_tflops_for("cpu")[0] is None
    assert _util.peak_tflops_for("cpu", 100.0)[0] == 100.0
    assert _util.mfu(1e9, 1000.0, 989.0) == pytest.approx(1e12 / 989e12)
    assert _util.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"))
    assert not _util.is_oom(ValueError("shape mismatch"))
