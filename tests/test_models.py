"""Model tests: pinned parameter counts, shapes, errors, numerics of the building blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_flax import flops, models
from cvt_flax.models.spec import CvTSpec

# Parameters at 1000 classes. The official ones equal the reference PyTorch
# implementations (microsoft/CvT, HuggingFace) exactly; the paper rounds them to
# 19.98M, 31.54M and 276.7M.
PINNED_PARAMS = {
    "cvt_13": 19_997_480,
    "cvt_21": 31_622_696,
    "cvt_w24": 277_196_392,
    "cvt_13_32": 19_989_800,
    "cvt_21_32": 31_615_016,
    "cvt_6_32": 4_076_904,
    "cvt_mini": 693_928,
    "cvt_tiny": 121_736,
}

# Multiply-adds per image in the paper's convention (Table 2 of the paper).
PAPER_GMACS = {("cvt_13", 224): 4.53, ("cvt_21", 224): 7.13, ("cvt_13", 384): 16.3, ("cvt_21", 384): 24.9}


def count_params(name: str, num_classes: int = 1000) -> int:
    model = models.create_model(name, num_classes)
    size = models.get_variant(name).image_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def test_every_variant_has_a_pinned_count():
    missing = set(models.list_models()) - set(PINNED_PARAMS)
    assert not missing, f"pin the parameter count of new variant(s) {sorted(missing)} in PINNED_PARAMS"
    stale = set(PINNED_PARAMS) - set(models.list_models())
    assert not stale, f"PINNED_PARAMS names unregistered variant(s) {sorted(stale)}"


@pytest.mark.parametrize("name", sorted(PINNED_PARAMS))
def test_param_count(name):
    assert count_params(name) == PINNED_PARAMS[name]


def test_features_only_drops_head():
    spec = models.get_spec("cvt_13")
    head = spec.dim_embed[-1] * 1000 + 1000
    assert count_params("cvt_13", num_classes=0) == PINNED_PARAMS["cvt_13"] - head


@pytest.mark.parametrize(("name", "size"), sorted(PAPER_GMACS))
def test_flops_match_paper(name, size):
    gmacs = flops.count_macs(name, size) / 1e9
    assert abs(gmacs / PAPER_GMACS[(name, size)] - 1) < 0.02, gmacs


def test_flops_w24():
    # Paper: 193.2G at 384.
    assert abs(flops.count_macs("cvt_w24", 384) / 1e9 / 193.2 - 1) < 0.02


def _tiny(**kw):
    return models.create_model("cvt_tiny", 10, **kw)


def init(model, x, seed=0):
    """Jitted init (eager op-by-op dispatch is slow on CPU)."""
    return jax.jit(model.init)(jax.random.key(seed), x)


def apply(model, variables, x, **kw):
    """Jitted eval-mode apply."""
    return jax.jit(lambda v, x: model.apply(v, x, **kw))(variables, x)


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 24, 40, 3), (1, 8, 8, 3)])
def test_forward_shapes_any_size(shape):
    model = _tiny()
    variables = init(model, jnp.zeros(shape))
    logits, feats = apply(model, variables, jnp.ones(shape), return_features=True)
    assert logits.shape == (shape[0], 10)
    grids = model.spec.token_grid(shape[1], shape[2])
    for i, (h, w) in enumerate(grids):
        assert feats[f"stage{i}"].shape == (shape[0], h, w, model.spec.dim_embed[i])
    assert feats["cls_token"].shape == (shape[0], 1, model.spec.dim_embed[-1])
    assert feats["pre_logits"].shape == (shape[0], model.spec.dim_embed[-1])
    assert np.all(np.isfinite(logits))


def test_num_classes_zero_gives_features():
    model = models.create_model("cvt_tiny", 0)
    variables = init(model, jnp.zeros((1, 16, 16, 3)))
    out = apply(model, variables, jnp.ones((2, 16, 16, 3)))
    assert out.shape == (2, 48)
    assert "head" not in variables["params"]


def test_too_small_input_error():
    model = models.create_model("cvt_13", 10)
    with pytest.raises(ValueError, match=r"too small.*at least"):
        model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))


def test_wrong_channels_error():
    model = _tiny()
    with pytest.raises(ValueError, match="in_chans"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))


def test_grayscale_model():
    model = _tiny(in_chans=1)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
    assert variables["params"]["stage0"]["patch_embed"]["proj"]["kernel"].shape == (3, 3, 1, 16)


def test_unknown_variant_error():
    with pytest.raises(ValueError, match=r"Unknown CvT variant 'cvt_31'.*Registered variants"):
        models.create_model("cvt_31")
    with pytest.raises(ValueError, match="Did you mean 'cvt_13'"):
        models.get_spec("cvt-13x")


def test_spec_validation():
    with pytest.raises(ValueError, match="one entry per stage"):
        CvTSpec(depth=(1, 2))
    with pytest.raises(ValueError, match="not divisible"):
        CvTSpec(num_heads=(1, 5, 6))
    with pytest.raises(ValueError, match="qkv_proj_method"):
        CvTSpec(qkv_proj_method=("dw_bn", "conv", "dw_bn"))
    with pytest.raises(ValueError, match="Unknown CvTSpec field"):
        models.get_spec("cvt_13", dim=3)


def test_spec_roundtrip_and_yaml():
    spec = models.get_spec("cvt_w24")
    assert CvTSpec.from_dict(spec.to_dict()) == spec
    yaml_spec = {
        "PATCH_SIZE": [7, 3, 3],
        "PATCH_STRIDE": [4, 2, 2],
        "PATCH_PADDING": [2, 1, 1],
        "DIM_EMBED": [64, 192, 384],
        "NUM_HEADS": [1, 3, 6],
        "DEPTH": [1, 4, 16],
        "MLP_RATIO": [4.0, 4.0, 4.0],
        "ATTN_DROP_RATE": [0.0, 0.0, 0.0],
        "DROP_RATE": [0.0, 0.0, 0.0],
        "DROP_PATH_RATE": [0.0, 0.0, 0.1],
        "QKV_BIAS": [True, True, True],
        "CLS_TOKEN": [False, False, True],
        "POS_EMBED": [False, False, False],
        "QKV_PROJ_METHOD": ["dw_bn", "dw_bn", "dw_bn"],
        "KERNEL_QKV": [3, 3, 3],
        "PADDING_KV": [1, 1, 1],
        "STRIDE_KV": [2, 2, 2],
        "PADDING_Q": [1, 1, 1],
        "STRIDE_Q": [1, 1, 1],
    }
    assert CvTSpec.from_official_yaml(yaml_spec) == models.get_spec("cvt_21")


def test_initialisation_follows_official():
    model = models.create_model("cvt_tiny", 1000)
    params = init(model, jnp.zeros((1, 16, 16, 3)))["params"]
    head = np.asarray(params["head"]["kernel"])
    assert abs(head.std() - 0.02) < 0.003 and np.abs(head).max() <= 0.04 + 1e-6
    assert np.all(np.asarray(params["head"]["bias"]) == 0)
    blk = params["stage2"]["blocks_0"]
    assert np.all(np.asarray(blk["attn"]["proj_q"]["bias"]) == 0)
    assert np.all(np.asarray(blk["norm1"]["scale"]) == 1) and np.all(np.asarray(blk["norm1"]["bias"]) == 0)
    assert np.all(np.asarray(blk["attn"]["conv_proj_k"]["bn"]["scale"]) == 1)
    cls = np.asarray(params["stage2"]["cls_token"])
    assert cls.shape == (1, 1, 48) and 0 < cls.std() < 0.03


def test_xavier_initialisation_option():
    """The official code's other INIT: xavier-uniform block Linears; the head and class token stay 0.02."""
    model = models.create_model("cvt_tiny", 1000, init_method="xavier")
    params = init(model, jnp.zeros((1, 16, 16, 3)))["params"]
    blk = params["stage2"]["blocks_0"]
    for path, (fan_in, fan_out) in {("attn", "proj_q"): (48, 48), ("mlp", "fc1"): (48, 96)}.items():
        kernel = np.asarray(blk[path[0]][path[1]]["kernel"])
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        assert kernel.shape == (fan_in, fan_out) and np.abs(kernel).max() <= bound
        assert abs(kernel.std() - bound / np.sqrt(3.0)) < 0.1 * bound  # uniform(-b, b): std b/sqrt(3)
        assert np.all(np.asarray(blk[path[0]][path[1]]["bias"]) == 0)
    head = np.asarray(params["head"]["kernel"])
    assert abs(head.std() - 0.02) < 0.003
    with pytest.raises(ValueError, match="xavier"):
        init(models.create_model("cvt_tiny", 10, init_method="kaiming"), jnp.zeros((1, 16, 16, 3)))


def test_no_cls_token_uses_mean_of_normed_tokens():
    model = _tiny(cls_token=(False, False, False))
    variables = init(model, jnp.zeros((1, 16, 16, 3)))
    assert "cls_token" not in variables["params"]["stage2"]
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    logits, feats = apply(model, variables, x, return_features=True)
    b, h, w, c = feats["stage2"].shape
    p = variables["params"]["norm"]
    t = feats["stage2"].reshape(b, h * w, c)
    mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
    normed = (t - mu) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]
    np.testing.assert_allclose(feats["pre_logits"], normed.mean(1), atol=1e-5)


@pytest.mark.parametrize("method", ["avg", "linear"])
def test_other_projection_methods(method):
    model = _tiny(qkv_proj_method=(method,) * 3)
    variables = init(model, jnp.zeros((1, 20, 20, 3)))
    assert "batch_stats" not in variables
    out = apply(model, variables, jnp.ones((2, 20, 20, 3)))
    assert out.shape == (2, 10)


def test_avg_pool_ceil_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for h, w, k, s, p in [(7, 7, 3, 2, 1), (8, 6, 3, 2, 1), (5, 9, 3, 2, 0), (14, 14, 3, 1, 1), (9, 9, 2, 2, 1)]:
        x = rng.normal(size=(2, h, w, 4)).astype(np.float32)
        ours = models.avg_pool_ceil(jnp.asarray(x), k, s, p)
        pool = torch.nn.AvgPool2d(k, s, p, ceil_mode=True)
        ref = pool(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        assert ours.shape == ref.shape, (h, w, k, s, p)
        np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_attention_implementations_agree():
    x = jax.random.normal(jax.random.key(1), (2, 24, 24, 3))
    ref = _tiny()
    variables = init(ref, x)
    out_ref = apply(ref, variables, x)
    out_xla = apply(_tiny(attention_impl="xla"), variables, x)
    np.testing.assert_allclose(out_xla, out_ref, atol=1e-5)


def test_bfloat16_close_to_float32():
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    f32 = _tiny()
    variables = init(f32, x)
    out32 = apply(f32, variables, x)
    out16 = apply(_tiny(dtype="bfloat16"), variables, x)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.1, rtol=0.1)
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32


def test_remat_is_numerically_identical():
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    plain = _tiny()
    variables = init(plain, x)

    def loss(params, model):
        out, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            rngs={"dropout": jax.random.key(2)},
            mutable=["batch_stats"],
        )
        return jnp.sum(out**2)

    g1 = jax.jit(jax.grad(loss), static_argnums=1)(variables["params"], plain)
    g2 = jax.jit(jax.grad(loss), static_argnums=1)(variables["params"], _tiny(remat=True))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_train_mode_updates_batch_stats_and_stochastic_depth():
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    model = _tiny(drop_path_rate=(0.0, 0.0, 0.9))
    variables = init(model, x)
    train = jax.jit(lambda v, r: model.apply(v, x, train=True, rngs={"dropout": r}, mutable=["batch_stats"]))
    out1, new = train(variables, jax.random.key(1))
    out2, _ = train(variables, jax.random.key(2))
    assert not np.allclose(out1, out2)  # stochastic depth draws differ by rng
    before = variables["batch_stats"]["stage0"]["blocks_0"]["attn"]["conv_proj_q"]["bn"]["mean"]
    after = new["batch_stats"]["stage0"]["blocks_0"]["attn"]["conv_proj_q"]["bn"]["mean"]
    assert not np.allclose(before, after)
    # Eval mode is deterministic and does not touch batch statistics.
    np.testing.assert_array_equal(apply(model, variables, x), apply(model, variables, x))


def test_stochastic_depth_follows_official_linear_rule():
    model = _tiny(depth=(1, 1, 3), drop_path_rate=(0.0, 0.0, 0.3))
    x = jnp.zeros((1, 16, 16, 3))
    variables = init(model, x)
    rates = {}

    def record(next_fun, args, kwargs, context):
        if type(context.module).__name__ == "Block" and context.method_name == "__call__":
            rates[context.module.name] = (context.module.scope.path[0], context.module.drop_path)
        return next_fun(*args, **kwargs)

    import flax.linen as nn

    with nn.intercept_methods(record):
        model.apply(variables, x)
    stage2 = sorted(v[1] for v in rates.values() if v[0] == "stage2")
    np.testing.assert_allclose(stage2, [0.0, 0.15, 0.3])
    assert all(v[1] == 0.0 for v in rates.values() if v[0] != "stage2")


def test_quick_gelu():
    x = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(models.quick_gelu(x), x / (1 + np.exp(-1.702 * np.asarray(x))), rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown activation"):
        models.get_activation("relu6")


@pytest.mark.parametrize(
    ("stride", "padding", "size"), [(1, 1, (7, 9)), (2, 1, (8, 8)), (2, 1, (7, 5)), (2, 0, (9, 6))]
)
def test_depthwise_shift_equals_conv(stride, padding, size):
    x = jax.random.normal(jax.random.key(0), (2, *size, 5))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 5))
    ref = jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((padding, padding),) * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=5,
    )
    ours = models.depthwise_conv_shift(x, kernel, stride, padding)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize(
    ("stride", "padding", "size"), [(1, 1, (7, 9)), (2, 1, (8, 8)), (2, 1, (7, 5)), (2, 0, (9, 6)), (3, 1, (8, 7))]
)
def test_depthwise_shift_gradient_equals_conv(stride, padding, size):
    """The written-out backward pass of the shift path (custom_vjp) against autodiff of the grouped conv."""
    x = jax.random.normal(jax.random.key(0), (2, *size, 5))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 5))

    def conv(x, kernel):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), ((padding, padding),) * 2, dimension_numbers=dims, feature_group_count=5
        )

    cotangent = jax.random.normal(jax.random.key(2), conv(x, kernel).shape)
    grads = [
        jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * cotangent), argnums=(0, 1))(x, kernel)
        for f in (lambda x, k: models.depthwise_conv_shift(x, k, stride, padding), conv)
    ]
    np.testing.assert_allclose(grads[0][0], grads[1][0], atol=1e-5)
    np.testing.assert_allclose(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-4)


def test_gelu_is_exact_gelu():
    x = jnp.linspace(-8.0, 8.0, 1001)
    np.testing.assert_allclose(models.get_activation("gelu")(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
    g = jax.grad(lambda x: jnp.sum(models.get_activation("gelu")(x)))(x)
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=False)))(x), atol=2e-6)


def test_depthwise_impls_give_same_model():
    x = jax.random.normal(jax.random.key(1), (2, 20, 20, 3))
    ref = _tiny()
    variables = init(ref, x)
    np.testing.assert_allclose(apply(_tiny(depthwise_impl="shift"), variables, x), apply(ref, variables, x), atol=1e-5)


def test_scanned_blocks_equal_the_unrolled_loop():
    """scan_blocks: the same variables (official names), outputs, gradients and BatchNorm updates."""
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    kw = {"depth": (1, 2, 3), "drop_path_rate": (0.0, 0.0, 0.0)}
    unrolled, scanned = _tiny(**kw), _tiny(scan_blocks=True, **kw)
    variables = init(unrolled, x)
    again = init(scanned, x)  # initialisation runs the unrolled loop either way
    assert jax.tree.structure(variables) == jax.tree.structure(again)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "blocks_2" in variables["params"]["stage2"]
    np.testing.assert_allclose(apply(unrolled, variables, x), apply(scanned, variables, x), atol=1e-5)

    def loss(params, model):
        out, new = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(out**2), new

    results = [jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(variables["params"], m) for m in
               (unrolled, scanned, _tiny(scan_blocks=True, remat=True, **kw))]  # fmt: skip
    (g1, s1), *others = results
    for g2, s2 in others:
        assert jax.tree.structure(s1) == jax.tree.structure(s2)
        for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g2, s2)), strict=True):
            np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_scanned_blocks_stochastic_depth_draws_per_block():
    x = jax.random.normal(jax.random.key(1), (16, 16, 16, 3))
    model = _tiny(depth=(1, 1, 4), drop_path_rate=(0.0, 0.0, 0.9), scan_blocks=True)
    variables = init(model, x)
    train = jax.jit(lambda v, r: model.apply(v, x, train=True, rngs={"dropout": r}, mutable=["batch_stats"])[0])
    out1, out2 = train(variables, jax.random.key(1)), train(variables, jax.random.key(2))
    assert not np.allclose(out1, out2)  # masks follow the key
    np.testing.assert_array_equal(out1, train(variables, jax.random.key(1)))
    # Rate 0 everywhere: training needs no key and equals the unrolled loop's.
    kw = {"depth": (1, 1, 4), "drop_path_rate": (0.0, 0.0, 0.0)}
    y = _tiny(scan_blocks=True, **kw).apply(variables, x, train=True, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(y, _tiny(**kw).apply(variables, x, train=True, mutable=["batch_stats"])[0], atol=1e-5)
