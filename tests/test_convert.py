"""Checkpoint conversion (cvt_flax.convert) and model checkpoints (cvt_flax.checkpoint)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_flax import checkpoint
from cvt_flax.convert import convert_state_dict, load_torch_checkpoint, main
from cvt_flax.models import get_spec
from cvt_flax.models.weights import expected_shapes, hf_key_to_official, official_key_to_hf

REPO = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-4


def synthetic_state(name: str, num_classes: int, seed: int = 0, **overrides) -> dict[str, np.ndarray]:
    """An official-format state dict with the shapes of variant ``name`` (random values)."""
    rng = np.random.default_rng(seed)
    spec = get_spec(name, **overrides)
    state = {k: rng.standard_normal(s, dtype=np.float32) for k, s in expected_shapes(spec, num_classes).items()}
    for k in [k for k in state if k.endswith("running_var")]:
        state[k] = np.abs(state[k]) + 0.5
        state[k.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
    return state


# ---------------------------------------------------------------------------
# Key names and architecture inference (numpy only).
# ---------------------------------------------------------------------------


def test_key_names_round_trip():
    for key in expected_shapes(get_spec("cvt_13"), 1000):
        hf = official_key_to_hf(key)
        assert hf is not None and hf_key_to_official(hf) == key, key
    assert (
        official_key_to_hf("stage2.blocks.3.attn.conv_proj_k.bn.running_mean")
        == "cvt.encoder.stages.2.layers.3.attention.attention.convolution_projection_key.convolution_projection."
        "normalization.running_mean"
    )
    assert official_key_to_hf("stage1.blocks.0.mlp.fc2.weight") == "cvt.encoder.stages.1.layers.0.output.dense.weight"
    assert official_key_to_hf("stage1.blocks.0.attn.proj.bias") == (
        "cvt.encoder.stages.1.layers.0.attention.output.dense.bias"
    )
    assert hf_key_to_official("classifier.weight") == "head.weight"
    assert hf_key_to_official("cvt.encoder.stages.0.embedding.dropout.weight") is None


@pytest.mark.parametrize("name", ["cvt_13", "cvt_21", "cvt_13_32", "cvt_tiny"])
def test_infers_registered_variant(name):
    state = synthetic_state(name, 10)
    variables, info = convert_state_dict(state)
    assert info["variant"] == name
    assert info["num_classes"] == 10 and info["act"] == "quick_gelu" and info["source_format"] == "official"
    assert info["spec"] == get_spec(name).to_dict()
    # Layout: Linear [out, in] -> kernel [in, out]; Conv [out, in/g, kh, kw] -> [kh, kw, in/g, out].
    p = variables["params"]
    np.testing.assert_array_equal(p["head"]["kernel"], state["head.weight"].T)
    np.testing.assert_array_equal(
        p["stage0"]["patch_embed"]["proj"]["kernel"], state["stage0.patch_embed.proj.weight"].transpose(2, 3, 1, 0)
    )
    bn = variables["batch_stats"]["stage1"]["blocks_0"]["attn"]["conv_proj_v"]["bn"]
    np.testing.assert_array_equal(bn["var"], state["stage1.blocks.0.attn.conv_proj_v.bn.running_var"])
    ln = p["stage0"]["blocks_0"]["norm2"]
    np.testing.assert_array_equal(ln["scale"], state["stage0.blocks.0.norm2.weight"])


def test_in_chans_and_head_options():
    state = synthetic_state("cvt_tiny", 4, in_chans=1)
    _, info = convert_state_dict(state)
    assert info["variant"] == "cvt_tiny" and info["spec"]["in_chans"] == 1
    variables, info = convert_state_dict(state, num_classes=0)
    assert info["num_classes"] == 0 and "head" not in variables["params"]
    with pytest.raises(ValueError, match=r"head has 4 classes.*--num-classes 0"):
        convert_state_dict(state, num_classes=5)


def test_refuses_mismatch_naming_keys():
    state = synthetic_state("cvt_tiny", 3)
    state["stage1.blocks.0.mlp.fc1.weight"] = np.zeros((65, 32), np.float32)
    del state["stage2.blocks.1.attn.proj_k.bias"]
    state["stage2.blocks.1.attn.extra.weight"] = np.zeros((2,), np.float32)
    with pytest.raises(ValueError) as e:
        convert_state_dict(state, model="cvt_tiny")
    msg = str(e.value)
    assert "`stage1.blocks.0.mlp.fc1.weight`: checkpoint (65, 32) vs model (64, 32)" in msg
    assert "missing keys (1): `stage2.blocks.1.attn.proj_k.bias`" in msg
    assert "unexpected keys (1): `stage2.blocks.1.attn.extra.weight`" in msg
    # Without --model: no registered variant matches, and the closest one's differences are named.
    with pytest.raises(ValueError, match=r"(?s)match no registered.*--num-heads.*stage1.blocks.0.mlp.fc1.weight"):
        convert_state_dict(state)


def test_unregistered_shapes_need_heads():
    state = synthetic_state("cvt_tiny", 3, dim_embed=(24, 48, 72))
    with pytest.raises(ValueError, match=r"--num-heads"):
        convert_state_dict(state)
    variables, info = convert_state_dict(state, num_heads=(1, 2, 3))
    assert info["variant"] is None and info["spec"]["dim_embed"] == [24, 48, 72]
    assert info["spec"]["num_heads"] == [1, 2, 3] and "patch_stride" in info["assumed_fields"]
    # The weights fix everything but strides/paddings; those take the official values.
    assert info["spec"]["mlp_ratio"] == [2.0, 2.0, 2.0] and info["spec"]["patch_stride"] == [2, 2, 2]


def test_detect_source_error():
    with pytest.raises(ValueError, match="Cannot tell the checkpoint format"):
        convert_state_dict({"foo.weight": np.zeros(3)})


# ---------------------------------------------------------------------------
# Model checkpoints.
# ---------------------------------------------------------------------------


def test_save_load_model(tmp_path):
    variables, info = convert_state_dict(synthetic_state("cvt_tiny", 3), act="gelu")
    info = {**info, "spec": get_spec("cvt_tiny"), "source_file": "x.pth"}  # A CvTSpec is accepted too.
    variables = jax.tree.map(jnp.asarray, variables)  # jax arrays are saved as numpy
    checkpoint.save_model(tmp_path / "m", variables, info)
    assert (tmp_path / "m" / "model.json").is_file() and (tmp_path / "m" / "variables").is_dir()
    restored, info2 = checkpoint.load_model(tmp_path / "m")
    assert isinstance(restored["params"]["head"]["kernel"], np.ndarray)
    assert info2["format"] == checkpoint.FORMAT and info2["spec"] == get_spec("cvt_tiny").to_dict()
    assert info2["variant"] == "cvt_tiny" and info2["source_file"] == "x.pth"
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
    model = checkpoint.model_from_info(info2)
    assert model.act == "gelu" and model.num_classes == 3 and model.spec == get_spec("cvt_tiny")
    model = checkpoint.model_from_info(info2, num_classes=0, dtype="bfloat16", drop_path_rate=(0.0, 0.0, 0.2))
    assert model.num_classes == 0 and model.spec.drop_path_rate == (0.0, 0.0, 0.2)
    with pytest.raises(FileExistsError, match="overwrite"):
        checkpoint.save_model(tmp_path / "m", variables, info, overwrite=False)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*python -m cvt_flax.convert"):
        checkpoint.load_model(tmp_path / "nope")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"not a cvt-flax model checkpoint.*model.json.*convert"):
        checkpoint.load_model(tmp_path)


# ---------------------------------------------------------------------------
# PyTorch files and the command line (need torch and transformers).
# ---------------------------------------------------------------------------

# Not a registered variant: the architecture must come from config.json (or --num-heads).
# (HuggingFace indexes drop-path rates by stage number, so it needs depth[i] > i.)
TINY_HF = dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=7)


@pytest.fixture(scope="module")
def tiny_hf():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_parity import hf_model, images

    model = hf_model(11, **TINY_HF)
    x = images(12, 2, 64, 80)
    import torch

    with torch.no_grad():
        logits = model(x).logits.numpy()
    return model, x.numpy().transpose(0, 2, 3, 1), logits


_APPLY_CACHE: dict[str, object] = {}


def _logits(out_dir: pathlib.Path, x: np.ndarray) -> tuple[np.ndarray, dict]:
    """Loads a converted model and runs it (one jit compile per architecture)."""
    variables, info = checkpoint.load_model(out_dir)
    key = json.dumps([info["spec"], info["num_classes"], info["act"]], sort_keys=True)
    if key not in _APPLY_CACHE:
        _APPLY_CACHE[key] = jax.jit(checkpoint.model_from_info(info).apply)
    return np.asarray(_APPLY_CACHE[key](variables, x)), info


def test_cli_hf_directory(tiny_hf, tmp_path):
    """save_pretrained (safetensors + config.json) -> CLI in a subprocess -> load_model: same logits."""
    model, x, ref = tiny_hf
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cvt_flax.convert", "--input", str(tmp_path / "hf"), "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    logits, info = _logits(out, x)
    assert np.abs(logits - ref).max() < ATOL
    assert info["act"] == "gelu" and info["source_format"] == "hf" and info["variant"] is None
    assert info["num_classes"] == 7 and info["spec"]["num_heads"] == [1, 2, 3]
    assert info["architecture_from"] == "HuggingFace config.json" and len(info["labels"]) == 7
    assert json.loads((out / "model.json").read_text())["source_file"].endswith("hf")
    # An existing output is refused without --overwrite.
    assert main(["--input", str(tmp_path / "hf"), "--output", str(out)]) == 2


def test_cli_bin_and_official_pth(tiny_hf, tmp_path, capsys):
    """torch.save files: a HF .bin and an official-format .pth ({'state_dict'}, `module.` prefix)."""
    import torch

    from cvt_flax.models.weights import hf_to_official_keys

    model, x, ref = tiny_hf
    state = model.state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    # No config.json: heads are not inferable for an unregistered shape.
    assert main(["--input", str(tmp_path / "pytorch_model.bin"), "--output", str(tmp_path / "a")]) == 2
    assert "--num-heads" in capsys.readouterr().err
    args = ["--input", str(tmp_path / "pytorch_model.bin"), "--output", str(tmp_path / "a"), "--num-heads", "1,2,3"]
    assert main(args) == 0
    assert "patch_stride" in capsys.readouterr().err  # Warns about the assumed strides.
    logits, info = _logits(tmp_path / "a", x)
    assert np.abs(logits - ref).max() < ATOL and info["act"] == "gelu"

    official = {"module." + k: v for k, v in hf_to_official_keys(state).items()}
    torch.save({"state_dict": official, "epoch": 3}, tmp_path / "model_best.pth")
    loaded = load_torch_checkpoint(tmp_path / "model_best.pth")
    assert "stage0.patch_embed.proj.weight" in loaded and isinstance(loaded["head.bias"], np.ndarray)
    args = ["--input", str(tmp_path / "model_best.pth"), "--output", str(tmp_path / "b"), "--num-heads", "1,2,3"]
    assert main([*args, "--act", "gelu"]) == 0
    logits, info = _logits(tmp_path / "b", x)
    assert np.abs(logits - ref).max() < ATOL and info["source_format"] == "official"
    # Official checkpoints default to QuickGELU (the official activation).
    assert main([*args[:3], str(tmp_path / "c"), *args[4:]]) == 0
    assert checkpoint.read_model_info(tmp_path / "c")["act"] == "quick_gelu"


def test_torch_missing_message(tmp_path, monkeypatch):
    (tmp_path / "w.pth").write_bytes(b"not really")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        load_torch_checkpoint(tmp_path / "w.pth")
