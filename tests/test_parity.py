"""Numerical parity of converted weights with the PyTorch reference (HuggingFace CvT).

The HuggingFace port is the PyTorch reference that can be built without a
download. Its weights are randomised (including BatchNorm running statistics
and LayerNorm/BatchNorm affine parameters, so that no conversion step can hide
behind an identity) and converted with `convert_state_dict`; logits and every
stage's token map must agree within 1e-4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cvt_flax.checkpoint import model_from_info  # noqa: E402
from cvt_flax.convert import convert_state_dict  # noqa: E402
from cvt_flax.models.weights import hf_to_official_keys, official_to_hf_keys  # noqa: E402

ATOL = 1e-4


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Gives every parameter and BatchNorm statistic a non-trivial random value, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2, generator=g)
                m.bias.normal_(0.0, 0.2, generator=g)
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
                m.weight.normal_(0.0, m.weight[0].numel() ** -0.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.1, generator=g)
        for name, p in model.named_parameters():
            if name.endswith("cls_token"):
                p.normal_(0.0, 1.0, generator=g)
    return model.eval()


def hf_model(seed: int = 0, **config) -> torch.nn.Module:
    """A randomised HuggingFace CvtForImageClassification (no download)."""
    torch.manual_seed(seed)
    try:  # transformers >= 5: skip the default init, randomize_ overwrites every weight.
        from transformers.initialization import no_init_weights
    except ImportError:
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = transformers.CvtForImageClassification(transformers.CvtConfig(**config))
    model = randomize_(model, seed + 1)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    return model


def numpy_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def images(seed: int, batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def compare(hf, apply, variables, x: torch.Tensor) -> tuple[dict[str, float], np.ndarray]:
    """Max |difference| of logits, stage maps and class token between HF and Flax; and the HF logits."""
    captured = {}
    hook = hf.cvt.register_forward_hook(lambda module, args, out: captured.update(out=out))
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
    hook.remove()
    logits, feats = apply(variables, nhwc(x))
    ref_logits = ref.logits.numpy()
    diffs = {"logits": max_diff(logits, ref_logits)}
    assert len(ref.hidden_states) == len([k for k in feats if k.startswith("stage")])
    for i, h in enumerate(ref.hidden_states):
        h = h.numpy().transpose(0, 2, 3, 1)
        assert feats[f"stage{i}"].shape == h.shape
        diffs[f"stage{i}"] = max_diff(feats[f"stage{i}"], h)
    diffs["cls_token"] = max_diff(feats["cls_token"], captured["out"].cls_token_value.numpy())
    # The comparison is meaningful only if the outputs are not tiny.
    assert np.abs(ref_logits).max() > 0.5
    return diffs, ref_logits


@pytest.mark.slow
def test_cvt13_parity():
    """CvT-13 (HF format, then official format) at 224x224 and at a non-square 112x160 input.

    One test, so that the model is built and compiled once even under pytest-xdist.
    """
    torch.set_num_threads(2)
    hf = hf_model(0, num_labels=1000)  # CvT-13 (the CvtConfig defaults), ImageNet head.
    state = numpy_state(hf)
    variables, info = convert_state_dict(state)
    assert info["variant"] == "cvt_13" and info["architecture_from"] == "matching shapes"
    assert info["act"] == "gelu" and info["source_format"] == "hf" and info["num_classes"] == 1000
    apply = jax.jit(functools.partial(model_from_info(info).apply, return_features=True))

    x = images(1, 2, 224, 224)
    diffs, ref = compare(hf, apply, variables, x)
    print("CvT-13 224x224 max |diff|:", diffs)
    assert max(diffs.values()) < ATOL, diffs

    diffs, _ = compare(hf, apply, variables, images(2, 2, 112, 160))  # 28x40, 14x20, 7x10 token grids
    print("CvT-13 112x160 max |diff|:", diffs)
    assert max(diffs.values()) < ATOL, diffs

    # Official microsoft/CvT key names (renamed from HF) convert to the same variables.
    official = hf_to_official_keys(state)
    assert "stage2.blocks.0.attn.conv_proj_q.bn.running_var" in official
    assert "stage0.patch_embed.proj.weight" in official and "head.weight" in official
    assert official_to_hf_keys(official).keys() == state.keys()
    converted, info = convert_state_dict(official, source="official", act="gelu")
    assert info["variant"] == "cvt_13" and info["source_format"] == "official" and info["act"] == "gelu"
    jax.tree.map(np.testing.assert_array_equal, converted, variables)
    assert max_diff(apply(converted, nhwc(x))[0], ref) < ATOL
    # Official checkpoints default to the official QuickGELU.
    assert convert_state_dict(official)[1]["act"] == "quick_gelu"


class QuickGELU(torch.nn.Module):
    """The official CvT activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def test_quick_gelu():
    """act='quick_gelu' equals a reference whose MLP activation is the official QuickGELU."""
    # HF needs depth[i] > i (its drop-path rates are indexed by the stage number).
    config = dict(embed_dim=[24, 48, 64], num_heads=[1, 2, 4], depth=[1, 2, 3], num_labels=5)
    hf = hf_model(5, **config)
    x = images(4, 2, 64, 80)
    with torch.no_grad():
        ref_gelu = hf(x).logits.numpy()
    for m in hf.modules():
        if isinstance(m, transformers.models.cvt.modeling_cvt.CvtIntermediate):
            m.activation = QuickGELU()
    with torch.no_grad():
        ref = hf(x).logits.numpy()
    assert max_diff(ref_gelu, ref) > 10 * ATOL  # The two activations are distinguishable here.
    variables, info = convert_state_dict(numpy_state(hf), hf_config=hf.config.to_dict(), act="quick_gelu")
    assert info["act"] == "quick_gelu" and info["variant"] is None
    logits = jax.jit(model_from_info(info).apply)(variables, nhwc(x))
    assert max_diff(logits, ref) < ATOL
