"""Compile-only report and program choices: what is built follows the mesh's devices, not the host.

The GPU/TPU targets need the jax CUDA plugin or libtpu (requirements-compile-only.txt); here the report's logic
runs on the CPU backend with a tiny model: choosing targets, counting HLO, the tables, the host-side init, and
the choices made for a mesh whose platform is not the host's.
"""

import importlib.util
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import compile_only, hlo_stats, targets
from benchmarks.recipe import load_config
from cvt_flax import compilation_cache, sharding
from cvt_flax import train_utils as tu

TINY = "configs/cifar100.py:variant=cvt_tiny"


def tiny_config(**fields):
    config = load_config(TINY)
    config.batch_size = 8
    config.num_train_steps = 10
    for k, v in fields.items():
        config[k] = v
    return config


def build(config, mesh=None):
    mesh = mesh or sharding.create_mesh(jax.devices()[:2])
    return tu.build_program(config, mesh, num_classes=100, in_chans=3, num_train_examples=80)


@pytest.fixture
def no_threefry_kernel():
    yield
    jax.config.update("jax_threefry_gpu_kernel_lowering", False)


@pytest.mark.parametrize(
    "platform, depthwise, scan, rng",
    [
        ("cpu", "shift", "false", "threefry"),
        ("gpu", "conv", "true", "threefry_kernel"),
        ("tpu", "conv", "true", "threefry"),
    ],
)  # fmt: skip
def test_choices_follow_the_mesh_not_the_host(monkeypatch, no_threefry_kernel, platform, depthwise, scan, rng):
    assert jax.default_backend() == "cpu"
    monkeypatch.setattr(tu, "mesh_platform", lambda mesh: platform)
    program = build(tiny_config())
    assert program.choices == {
        "platform": platform, "depthwise_impl": depthwise, "attention_impl": "explicit", "rng_impl": rng,
        "scan_blocks": scan, "init": "host cpu",
    }  # fmt: skip
    assert program.model.depthwise_impl == depthwise and program.model.scan_blocks == (scan == "true")
    assert jax.config.jax_threefry_gpu_kernel_lowering == (platform == "gpu")


def test_explicit_choices_and_bad_names(monkeypatch):
    monkeypatch.setattr(tu, "mesh_platform", lambda mesh: "tpu")
    program = build(tiny_config(depthwise_impl="shift", scan_blocks="false", rng_impl="rbg"))
    assert (program.choices["depthwise_impl"], program.choices["scan_blocks"], program.choices["rng_impl"]) == (
        "shift", "false", "rbg",
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs NVIDIA GPU devices, but the mesh's are tpu"):
        build(tiny_config(attention_impl="cudnn"))
    for field, value in (("scan_blocks", "sometimes"), ("rng_impl", "philox"), ("depthwise_impl", "fft")):
        with pytest.raises(ValueError, match=f"--config.{field}"):
            build(tiny_config(**{field: value}))


def test_host_init_equals_the_init_jitted_on_the_mesh():
    """Computed on the host CPU in parallel parts and placed replicated: bit for bit the values of the previous
    initialisation (``jit(model.init)`` on the CPU mesh with `CHEAP_COMPILE`), so CPU runs reproduce."""
    config = tiny_config()
    mesh = sharding.create_mesh(jax.devices()[:2])
    program = build(config, mesh)
    state = program.init_state(program.init_rng)
    assert program.choices["init"] == "host cpu"
    assert state.params["head"]["kernel"].sharding.is_equivalent_to(sharding.replicated_sharding(mesh), 2)
    model = program.model

    def reference(rng):
        variables = model.init({"params": rng, "dropout": rng}, jnp.zeros((1, 32, 32, 3)), train=False)
        return tu.create_train_state(model, program.tx, flax.core.unfreeze(variables), config.ema_decay)

    ref = jax.jit(reference, out_shardings=sharding.replicated_sharding(mesh), compiler_options=tu.CHEAP_COMPILE)(
        program.init_rng
    )
    assert program.host_init.parts == min(8, os.cpu_count())
    assert jax.tree.structure(ref) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kernel_stats_of_a_compiled_program():
    def f(x, w):
        y, _ = jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)
        return jnp.sum(y**2)

    lowered = jax.jit(jax.grad(f, argnums=1)).lower(jnp.ones((4, 8)), jnp.ones((5, 8, 8)))
    stats = hlo_stats.kernel_stats(lowered.compile().as_text())
    assert stats["while_loops"] >= 1 and stats["kernels"] >= 2
    assert stats["dynamic_kernels"] > stats["kernels"]  # loop bodies run 5 times
    assert stats["kernels"] == stats["fusions"] + stats["custom_calls"]
    assert hlo_stats.stablehlo_op_count(lowered.as_text()) > 10
    with pytest.raises(ValueError, match="No ENTRY"):
        hlo_stats.kernel_stats("not hlo")


def test_kernel_stats_parse_custom_calls_and_rng():
    text = """HloModule m
%fused_a (p: u32[4]) -> u32[4] {
  %p = u32[4]{0} parameter(0)
  %s = u32[4]{0} shift-left(%p, %p)
  ROOT %x = u32[4]{0} xor(%s, %p)
}
ENTRY %main (a: u32[4], b: f32[2,2]) -> (u32[4], f32[2,2]) {
  %a = u32[4]{0} parameter(0)
  %b = f32[2,2]{1,0} parameter(1)
  %f = u32[4]{0} fusion(%a), kind=kLoop, calls=%fused_a
  %c = (f32[2,2]{1,0}, s8[16]{0}) custom-call(%b, %b), custom_call_target="__cublas$gemm"
  %g = f32[2,2]{1,0} get-tuple-element(%c), index=0
  %r = f32[2,2]{1,0} all-reduce(%g), to_apply=%fused_a
  ROOT %t = (u32[4]{0}, f32[2,2]{1,0}) tuple(%f, %r)
}
"""
    stats = hlo_stats.kernel_stats(text)
    assert (stats["fusions"], stats["custom_calls"], stats["kernels"]) == (1, 1, 2)
    assert stats["custom_call_targets"] == {"__cublas$gemm": 1} and stats["other_ops"] == {"all-reduce": 1}
    assert stats["rng_arithmetic"] == {"xor": 1, "shift-left": 1, "shift-right-logical": 0}


def test_targets():
    assert set(targets.DEFAULT_TARGETS) <= set(targets.TARGETS)
    pod = targets.get_target("v5e:4x4")
    assert (pod.chips, pod.hosts, pod.hbm_bytes) == (16, 4, 16 * 2**30) and pod.compile_only
    assert "--xla_gpu_enable_triton_gemm=false" in targets.get_target("h100").environment()["XLA_FLAGS"]
    assert targets.get_target("cpu:3").environment()["XLA_FLAGS"].endswith("device_count=3")
    for name in ("h100", "h200"):
        text = (targets.GPU_TARGET_DIR / targets.TARGETS[name].topology).read_text()
        assert "cuda_compute_capability { major: 9 }" in text and "Source" in text
    with pytest.raises(ValueError, match="Unknown target 'v9'; choose from h100"):
        targets.get_target("v9")


def test_report_on_the_cpu_backend():
    """The child of each row (here in-process: cpu:2) and the tables of the parent."""
    spec = {
        "target": "cpu:2", "program": "ours", "model": "cvt_tiny", "image_size": 32, "recipe": TINY, "sets": {},
        "global_batch": 8, "eval_batch": 8, "dtype": "float32", "parts": ["init", "eval"],
    }  # fmt: skip
    ours = compile_only.run_child(spec, cold=False)
    assert ours["chips"] == 2 and ours["platform"] == "cpu" and ours["choices"]["init"] == "host cpu"
    assert ours["init"]["where"] == "host cpu" and ours["init"]["compile_s"] > 0 and ours["init"]["parts"] >= 1
    for key in ("trace_s", "lower_s", "compile_s", "stablehlo_ops", "kernels", "memory", "cost_estimate"):
        assert key in ours["eval"], key
    assert ours["eval"]["memory"]["need"] > 0 and ours["num_params"] > 50_000
    plain = compile_only.run_child({**spec, "program": "plain", "parts": ["eval"]}, cold=False)
    assert plain["num_params"] == ours["num_params"]  # like for like
    text = compile_only.markdown([ours, plain], {"model": "cvt_tiny", "image_size": 32, "dtype": "float32",
                                                 "recipe": TINY, "date": "today"})  # fmt: skip
    assert "compiled and timed" in text and "compile-only" not in text  # cpu:2 is a real device: measured
    assert "| cpu:2 | ours |" in text and "| cpu:2 | plain |" in text
    mixed = compile_only.markdown([ours, {**plain, "target": "h100"}], {"model": "cvt_tiny", "image_size": 32,
                                  "dtype": "float32", "recipe": TINY, "date": "today"})  # fmt: skip
    assert "h100: compile-only" in mixed and "cpu:2: compiled and timed" in mixed
    assert "| cpu:2 | ours / plain |" in text
    json.dumps(ours)  # machine-readable as it is


def test_compilation_cache_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert compilation_cache.resolve("auto") == str(tmp_path / "env")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("CVT_FLAX_CACHE", str(tmp_path / "root"))
    assert compilation_cache.resolve("auto") == str(tmp_path / "root" / "jax")
    assert compilation_cache.resolve("") is None and compilation_cache.resolve("off") is None
    assert compilation_cache.resolve(str(tmp_path / "x")) == str(tmp_path / "x")
    # In a fresh process (JAX opens its cache once per process): programs land in the folder, or nowhere when off.
    code = (
        "import sys, jax, jax.numpy as jnp\n"
        "from cvt_flax import compilation_cache\n"
        "compilation_cache.setup(sys.argv[1])\n"
        "f = lambda x: jnp.sin(x) @ jnp.cos(x).T\n"
        "jax.jit(lambda x: sum(f(x * i) for i in range(60))).lower(jnp.ones((64, 64))).compile()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    for value, root, expect in ((str(tmp_path / "on"), "r1", "on"), ("auto", "r2", "r2/jax"), ("", "r3", None)):
        env["CVT_FLAX_CACHE"] = str(tmp_path / root)
        subprocess.run([sys.executable, "-c", code, value], check=True, env=env, timeout=120)
        if expect:
            assert any((tmp_path / expect).iterdir()), expect
    assert sorted(p.name for p in tmp_path.iterdir()) == ["on", "r2"]  # off: nothing written


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (requirements-compile-only.txt)")
def test_tpu_compile_only_devices():
    rec = compile_only.run_spec(
        {"target": "v5e:2x2", "program": "ours", "model": "cvt_tiny", "image_size": 32, "recipe": TINY, "sets": {},
         "global_batch": 8, "eval_batch": 8, "dtype": "bfloat16", "parts": ["eval"]}, timeout_s=600,
    )  # fmt: skip
    assert rec.get("error") is None, rec.get("error")
    assert rec["platform"] == "tpu" and rec["chips"] == 4 and rec["choices"]["depthwise_impl"] == "conv"
    assert rec["choices"]["scan_blocks"] == "true" and rec["eval"]["memory"]["fits"]


@pytest.mark.parametrize(
    "per_example, fixed, oom_above, most", [(1 << 30, 3 << 30, None, 4), (1 << 28, 1 << 30, 40, 10)]
)
def test_max_batch_search(monkeypatch, per_example, fixed, oom_above, most):
    """Linear extrapolation, then checked at the answer and one chip-multiple above (a fake compile here)."""
    calls = []

    def fake_run_spec(spec, timeout_s, log_path=None):
        batch = spec["global_batch"]
        calls.append(batch)
        if oom_above and batch // 4 > oom_above:
            return {"error": "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm"}
        return {"train": {"memory": {"need": fixed + per_example * (batch // 4)}, "compile_s": 1.0}}

    monkeypatch.setattr(compile_only, "run_spec", fake_run_spec)
    found = compile_only.max_batch_search({"target": "v5e:2x2", "program": "ours"}, timeout_s=1)
    hbm = 16 << 30
    expect = (hbm - fixed) // per_example * 4  # the largest multiple of 4 chips whose need fits
    if oom_above:
        expect = min(expect, oom_above * 4)
    assert found["max_global_batch"] == expect and found["per_chip"] == expect // 4
    assert len(calls) == len(set(calls)) <= most  # linear: 2 points, the answer and one above; no batch twice


def test_max_batch_search_bisects_to_three_percent(monkeypatch):
    """When the extrapolation misses (memory not linear in the batch), bisection stops within ~3% of the answer:
    a verified batch that fits, and the first one known not to."""
    calls = []

    def fake_run_spec(spec, timeout_s, log_path=None):
        batch = spec["global_batch"]
        calls.append(batch)
        if batch // 4 > 1500:
            return {"error": "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm"}
        return {"train": {"memory": {"need": (1 << 30) + (1 << 20) * (batch // 4)}, "compile_s": 1.0}}

    monkeypatch.setattr(compile_only, "run_spec", fake_run_spec)
    found = compile_only.max_batch_search({"target": "v5e:2x2", "program": "ours"}, timeout_s=1)
    assert 0.97 * 6000 <= found["max_global_batch"] <= 6000 < found["first_not_fitting"]
    assert found["first_not_fitting"] - found["max_global_batch"] <= 6000 // 32 + 4
    assert len(calls) <= 12


def test_a_failed_compile_is_reported_by_its_own_line():
    """A child that ran out of HBM reports XLA's line with the bytes it needed, not the traceback above it."""
    from benchmarks.compile_only import child_error

    stderr = (
        'Traceback (most recent call last):\n  File "pxla.py", line 1516, in _cached_compilation\n'
        "    xla_executable = compiler.compile_or_get_cached(\n\n"
        "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
        "HLO temporaries (75.05G) exceeds available HBM (15.75G).\n"
    )
    assert child_error(1, stderr) == (
        "exit 1: jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
        "required for HLO temporaries (75.05G) exceeds available HBM (15.75G)."
    )
    assert child_error(3, "") == "exit 3: no output"
