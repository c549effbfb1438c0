"""The benchmarks time the training loop's own step, the torch reference does the same work, and the two GPU
scripts run end to end (CPU dry runs with tiny settings, so that a GPU window is never lost to a typo).

No timing is asserted; the numbers of a 2-step CPU run mean nothing.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import harness
from benchmarks.recipe import Workload, auto_recipe

REPO = pathlib.Path(__file__).resolve().parents[1]
RECORD_KEYS = {
    "framework", "mode", "model", "image_size", "dtype", "recipe", "train_batch", "infer_batch", "device_kind",
    "train_step_s", "train_images_per_s", "train_compile_s", "train_peak_bytes_in_use", "infer_step_s",
    "infer_images_per_s", "infer_compile_s", "peak_bytes_in_use", "train_flops_per_image",
    "inference_flops_per_image", "peak_tflops", "mfu_train", "mfu_infer", "num_params", "train_loss",
    "train_minor_faults_per_step",
}  # fmt: skip
# SGD and --fast-compile: XLA:CPU compiles the train step several times faster than AdamW at -O2.
TINY = ["--dtype", "float32", "--steps", "2", "--warmup", "1", "--set", "optimizer=sgd", "--fast-compile"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device in the children, as a benchmark has
    env["PYTHONPATH"] = str(REPO)
    return env


# ----------------------------------------------------------------------------- one train step


def _fashion_workload(**sets) -> Workload:
    base = {
        "num_train_steps": 1, "warmup_epochs": 0.0, "label_smoothing": 0.1, "grad_clip_norm": 1.0,
        "aug.mixup_alpha": 0.8, "aug.cutmix_alpha": 1.0, "train_split": "train[:64]", "eval_split": "test[:16]",
        "log_every_steps": 1, "input.pipeline": "device",
    }  # fmt: skip
    base.update(sets)
    return Workload(
        model="cvt_tiny", image_size=28, train_batch=8, infer_batch=16, dtype="float32", act="gelu",
        recipe="configs/smoke.py:dataset=fashion_mnist", sets=tuple(base.items()), num_classes=10,
    )  # fmt: skip


def _benchmark_step(w: Workload, batch: dict) -> tuple[dict, float]:
    """One step of the benchmark's program from its initial state: (params, loss)."""
    import jax

    from benchmarks import throughput

    program = throughput.build_program(w.config(), w.num_classes)
    state = program.init_state(program.init_rng)
    state, metrics = program.train_step(state, batch)
    return jax.device_get(state.params), float(metrics.compute()["loss"])


def test_benchmarked_step_is_the_training_step(shared_dir, tmp_path):
    """main.py's first step on real Fashion-MNIST equals the benchmark's step on the same batch; a benchmark
    with another recipe (label smoothing 0 instead of 0.1) does not, so the comparison can fail."""
    import jax

    from cvt_flax import checkpoint, data, sharding, train

    w = _fashion_workload()
    config = w.config()
    config.data_dir = str(shared_dir / "tfds_array_record")
    config.download = False
    workdir = tmp_path / "run"
    train.train_and_evaluate(config, str(workdir))
    trained, _ = checkpoint.load_init_from(str(workdir / "checkpoints"))
    logged = [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]

    # The batch main.py trained on (batch k is a pure function of config, seed and k), on one device.
    mesh = sharding.create_mesh(jax.devices())
    first = jax.device_get(next(data.create_train_iterator(config, mesh, seed=config.seed, start_step=0)))
    params, loss = _benchmark_step(w, jax.device_put(first, jax.devices()[0]))
    assert loss == pytest.approx(logged[0]["loss"], rel=1e-5)
    flat_b = jax.tree_util.tree_leaves_with_path(params)
    flat_t = dict(jax.tree_util.tree_leaves_with_path(trained["params"]))
    assert len(flat_b) == len(flat_t)
    # Equal up to the summation order of the 8-device batch (BatchNorm and gradient all-reduces): AdamW's first
    # update is g / (|g| + eps) * lr per element, so a reordering moves an element whose gradient is near eps by a
    # few % of lr (1e-3; seen: 2.2e-5 in 1 of 4,608 elements); every other element agrees to float rounding (mean).
    for path, x in flat_b:
        np.testing.assert_allclose(x, flat_t[path], rtol=0, atol=5e-5, err_msg=jax.tree_util.keystr(path))
    assert np.mean([np.mean(np.abs(x - flat_t[p])) for p, x in flat_b]) < 1e-7

    other, other_loss = _benchmark_step(_fashion_workload(label_smoothing=0.0), jax.device_put(first))
    assert other_loss != pytest.approx(loss, rel=1e-3)
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(params), strict=True)]
    assert max(diffs) > 1e-4


def test_input_pipeline_host_throughput(shared_dir):
    """benchmarks/input_pipeline.py times the real tf.data train pipeline (replaces tfdata.images_per_second)."""
    pytest.importorskip("tensorflow")
    from benchmarks import input_pipeline

    config = input_pipeline.base_config(str(shared_dir / "tfds"))
    config.train_split = "train[:64]"
    config.aug.randaugment_layers = 0
    r = input_pipeline.bench_cifar_fmnist(config, batch=16, batches=3, warmup=1, threads=1)
    assert r["images_per_s"] > 0 and r["timed_s"] > 0


def test_torch_reference_does_the_recipe_work():
    """Same schedule values as optax, the same decay groups, and mixup that keeps targets distributions."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks import torch_reference as tr
    from benchmarks.recipe import train_recipe
    from cvt_flax import train_utils as tu

    w = Workload(model="cvt_tiny", image_size=32, train_batch=4, infer_batch=4, sets=(("warmup_epochs", 2.0),))
    config = w.config()
    recipe = train_recipe(config, w.num_classes)
    run = tu.derive_run_length(config, config.batch_size * 10)
    schedule = tu.create_learning_rate_schedule(config, run)
    factor = tr.lr_factor(recipe)
    for step in (0, 1, 10, 19, 20, 21, 500, 9_999):
        assert factor(step) * recipe["learning_rate"] == pytest.approx(float(schedule(step)), rel=1e-5, abs=1e-12)

    model = tr.build_model(tr.workload_spec(config), w.num_classes, torch.device("cpu"))
    decay, no_decay = tr.decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("cls_token" in names[id(p)] or p.ndim <= 1 for p in no_decay["params"])
    assert any("cls_token" in names[id(p)] for p in no_decay["params"])
    assert all(p.ndim > 1 and "cls_token" not in names[id(p)] for p in decay["params"])

    x, t = torch.randn(6, 3, 8, 8), torch.eye(6)[:, : w.num_classes] * 0.9 + 0.01
    for seed in range(6):
        mx, mt = tr.mix_batch(x, t, recipe, np.random.default_rng(seed))
        assert mx.shape == x.shape and torch.allclose(mt.sum(-1), t.sum(-1))


# ----------------------------------------------------------------------------- the CLIs


def test_throughput_cli_writes_record(tmp_path):
    from benchmarks import throughput

    out = tmp_path / "jax.json"
    argv = ["--model", "cvt_tiny", "--image-size", "32", "--train-batch", "4", "--infer-batch", "4", *TINY]
    throughput.main([*argv, "--skip-train", "--json", str(out)])
    rec = json.loads(out.read_text())
    assert rec["framework"] == "jax" and rec["model"] == "cvt_tiny" and rec["infer_batch"] == 4
    assert rec["recipe"] == auto_recipe("cvt_tiny") and rec["step_source"] == "cvt_flax.train_utils.build_program"
    assert rec["infer_images_per_s"] > 0 and rec["infer_compile_s"] > 0
    assert rec["peak_tflops"] is None and rec["mfu_infer"] is None  # CPU: no peak, no MFU
    assert "train_images_per_s" not in rec


def test_compare_jax_and_torch_in_one_process(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks import compare

    out, md = tmp_path / "cmp.json", tmp_path / "cmp.md"
    argv = ["--variants", "cvt_tiny@32:4/4", "--torch-modes", "eager", "--no-isolate", *TINY]
    result = compare.main([*argv, "--json", str(out), "--markdown", str(md), "--quiet"])
    saved = json.loads(out.read_text())
    assert set(saved) == {"meta", "rows", "ratios", "markdown"}
    assert saved["rows"] == json.loads(json.dumps(result["rows"], default=str))
    assert [r["framework"] for r in saved["rows"]] == ["jax", "torch"], [r.get("error") for r in saved["rows"]]
    by_fw = {r["framework"]: r for r in saved["rows"]}
    for rec in by_fw.values():
        missing = RECORD_KEYS - set(rec)
        assert not missing, (rec["framework"], missing, rec.get("error"))
        assert rec["train_images_per_s"] > 0 and rec["infer_images_per_s"] > 0
        assert rec["train_minor_faults_per_step"] >= 0
        assert math.isfinite(rec["train_loss"]) and rec["recipe"] == "configs/cifar100.py:variant=cvt_tiny"
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
    assert auto_recipe("cvt_13") == "configs/imagenet.py:variant=13"
    assert auto_recipe("cvt_w24") == "configs/imagenet.py:variant=w24"
    assert Workload(model="cvt_13", image_size=224).num_classes == 1000
    assert Workload(model="cvt_13_32", image_size=32).num_classes == 100
    with pytest.raises(ValueError, match="no field"):
        Workload(model="cvt_tiny", image_size=32, sets=(("learning_rat", 1.0),)).config()
    assert harness.peak_tflops_for("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert harness.peak_tflops_for("NVIDIA H100 PCIe")[0] == 756.0
    assert harness.peak_tflops_for("TPU v5 lite")[0] == 197.0
    assert harness.peak_tflops_for("cpu")[0] is None
    assert harness.peak_tflops_for("cpu", 100.0)[0] == 100.0
    assert harness.mfu(1e9, 1000.0, 989.0) == pytest.approx(1e12 / 989e12)
    assert harness.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"))
    assert not harness.is_oom(ValueError("shape mismatch"))


def test_find_max_batch_doubles_until_out_of_memory():
    calls = []

    def at(batch):
        calls.append(batch)
        if batch > 64:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory")
        return float(batch)

    found = harness.find_max_batch(at, 16, 1024, known=[{"batch": 16, "fits": True, "images_per_s": 1.0}])
    assert found["max_train_batch"] == 64 and calls == [32, 64, 128]
    with pytest.raises(ValueError):
        harness.find_max_batch(lambda b: (_ for _ in ()).throw(ValueError("bug")), 8, 64)


# ----------------------------------------------------------------------------- the GPU scripts, dry


def test_gpu_speed_script_dry_run(tmp_path):
    """benchmarks/run_gpu.sh end to end on the CPU with a tiny variant: every output file, the tables, a profile."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    env = _env() | {
        "V1": "cvt_tiny@32:4/4", "V2": "", "V3": "cvt_tiny@32:4/4", "TORCH_MODES": "eager", "DTYPE": "float32",
        "EXPECT": "", "EXTRA_ATTENTION": "", "FED": "0", "STEPS": "2", "WARMUP": "1", "TOTAL_S": "400",
        "EXTRA_ARGS": "--fast-compile --set optimizer=sgd", "PYTHON": sys.executable,
        "CR_MODEL": "cvt_tiny", "CR_SIZE": "32", "CR_BATCH": "4", "CR_RECIPE": "configs/cifar100.py:variant=cvt_tiny",
        "CR_PROGRAMS": "ours", "CR_PARTS": "train", "CR_S": "150",
    }  # fmt: skip
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "benchmarks/run_gpu.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=500
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["compare.json", "compile.json", "env.txt", "profile.txt", "results.tgz", "summary.md"]
    assert len(files) <= 8  # what the device tool brings back
    summary = (out / "summary.md").read_text()
    assert "| cvt_tiny | 32 | 4/4 | jax/jit/explicit |" in summary and "torch/eager" in summary
    assert "train / eager" in summary and "profile cvt_tiny@32" in summary
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert {r["framework"] for r in rows} == {"jax", "torch"} and not any("error" in r for r in rows), rows
    assert "ms/step" in (out / "profile.txt").read_text()
    # Part C, the compile report on the device (here the CPU): compiled, then timed on it.
    assert "### Compile report on this device" in summary and "| attached | ours |" in summary
    record = json.loads((out / "compile.json").read_text())["records"][0]
    assert record["train"]["measured"]["images_per_s"] > 0 and record["train"]["compile_s"] > 0


def test_gpu_accuracy_script_dry_run(shared_dir, tmp_path):
    """benchmarks/run_gpu_accuracy.sh with a tiny model and a few steps on the real Fashion-MNIST (device pipeline)."""
    env = _env() | {
        "CONFIG": "configs/fashion_mnist.py:variant=cvt_tiny,pipeline=device,batch=32",
        "DATA_DIR": str(shared_dir / "tfds_array_record"),
        "EXTRA_ARGS": "--config.num_train_steps=6 --config.eval_split=test[:64] --config.log_every_steps=2 "
        "--config.dtype=float32",
        "PYTHON": sys.executable,
    }
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "benchmarks/run_gpu_accuracy.sh", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {"summary.json", "curves.png", "metrics.jsonl", "train.log", "result.md"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 6 and summary["final_eval"]["count"] == 64
    assert "test top-1" in (out / "result.md").read_text()
