"""Fine-tuning parameter groups: ``--config.freeze`` and ``--config.layer_decay`` (cvt_flax/param_groups.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default, fashion_mnist
from cvt_flax import checkpoint, models, param_groups, sharding
from cvt_flax import train_utils as tu


def cfg(**kw):
    c = default.get_config()
    for k, v in kw.items():
        c[k] = v
    return c


def named(tree):
    return {param_groups.path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def mini_params():
    model = models.create_model("cvt_mini", num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3))))
    return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes["params"]), model.spec.depth


# ----------------------------------------------------------------------------- layer ids


def test_layer_ids_of_cvt_mini_and_cvt_13():
    depth = models.get_spec("cvt_mini").depth
    assert depth == (1, 1, 2) and param_groups.num_layers(depth) == 7
    ids = {
        "stage0/patch_embed/proj/kernel": 0,
        "stage0/blocks_0/attn/proj_q/kernel": 1,
        "stage1/patch_embed/norm/scale": 2,
        "stage1/blocks_0/mlp/fc2/bias": 3,
        "stage2/patch_embed/proj/kernel": 4,
        "stage2/cls_token": 4,
        "stage2/blocks_0/norm1/scale": 5,
        "stage2/blocks_1/attn/conv_proj_v/conv/kernel": 6,
        "norm/scale": 7,
        "head/kernel": 7,
    }
    assert {n: param_groups.layer_id(n, depth) for n in ids} == ids
    d13 = models.get_spec("cvt_13").depth  # (1, 2, 10): 16 layers
    assert param_groups.num_layers(d13) == 16
    assert param_groups.layer_id("stage2/blocks_9/mlp/fc1/kernel", d13) == 15
    assert param_groups.layer_id("stage2/patch_embed/proj/kernel", d13) == 5


def test_layer_decay_scales_every_update_by_its_layer():
    params, depth = mini_params()
    # SGD without momentum, lr 1, no decay or clipping: the update is -grad * multiplier.
    c = cfg(optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.0, grad_clip_norm=0.0, layer_decay=0.5)
    tx = tu.create_optimizer(c, lambda s: 1.0, depth)
    updates, _ = tx.update(params, tx.init(params), params)
    for name, u in named(updates).items():
        want = -(0.5 ** (7 - param_groups.layer_id(name, depth)))
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=name)
    assert named(updates)["head/kernel"].max() == -1.0
    assert named(updates)["stage0/patch_embed/proj/kernel"].max() == pytest.approx(-(0.5**7))


def test_layer_decay_off_leaves_the_optimizer_as_it_was():
    params, depth = mini_params()
    base = tu.create_optimizer(cfg(), lambda s: 1e-3, depth)
    for off in (0.0, 1.0):
        tx = tu.create_optimizer(cfg(layer_decay=off), lambda s: 1e-3, depth)
        # The same state layout: checkpoints of runs without the option still restore.
        assert jax.tree.structure(tx.init(params)) == jax.tree.structure(base.init(params))
    with pytest.raises(ValueError, match=r"--config.layer_decay=1.5 must be in \[0, 1\]"):
        tu.create_optimizer(cfg(layer_decay=1.5), lambda s: 1e-3, depth)
    with pytest.raises(ValueError, match="needs the model's depth"):
        tu.create_optimizer(cfg(layer_decay=0.75), lambda s: 1e-3)


# ----------------------------------------------------------------------------- freezing


def test_frozen_parameters_get_no_update_decay_or_share_of_the_clipping():
    params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
    grads = {"a": {"kernel": jnp.full((2, 2), 100.0)}, "b": {"kernel": jnp.full((2, 2), 0.1)}}
    c = cfg(optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.5, grad_clip_norm=1.0, freeze="params/a/.*")
    tx = tu.create_optimizer(c, lambda s: 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.asarray(updates["a"]["kernel"]) == 0.0)  # no gradient step and no weight decay
    # b's norm (0.2) is under the clipping threshold: a's huge gradient does not shrink it.
    np.testing.assert_allclose(np.asarray(updates["b"]["kernel"]), -(0.1 + 0.5 * 1.0), rtol=1e-6)


def test_freeze_masks_and_statistics():
    f = param_groups.Freeze("params/stage[01]/.*, batch_stats/stage0/.*")
    assert f and f.matches("params/stage1/blocks_0/mlp/fc1/kernel") and not f.matches("params/stage2/cls_token")
    assert not param_groups.Freeze("") and not param_groups.Freeze(" , ")
    old = {"stage0": {"m": jnp.zeros(2)}, "stage2": {"m": jnp.zeros(2)}}
    new = {"stage0": {"m": jnp.ones(2)}, "stage2": {"m": jnp.ones(2)}}
    kept = f.keep_frozen_stats(old, new)
    assert float(kept["stage0"]["m"].sum()) == 0.0 and float(kept["stage2"]["m"].sum()) == 2.0
    grads = f.zero_frozen({"stage1": {"k": jnp.ones(3)}, "head": {"k": jnp.ones(3)}})
    assert float(grads["stage1"]["k"].sum()) == 0.0 and float(grads["head"]["k"].sum()) == 3.0


def test_pattern_lists_split_only_at_top_level_commas():
    assert param_groups.split_patterns("params/stage2/blocks_[0-9]{1,2}/.*, head/.*") == [
        "params/stage2/blocks_[0-9]{1,2}/.*",
        " head/.*",
    ]
    assert param_groups.split_patterns(r"a\,b,(c,d),[,],e") == [r"a\,b", "(c,d)", "[,]", "e"]
    f = param_groups.Freeze("params/stage2/blocks_[0-9]{1,2}/.*,params/head/.*")
    assert len(f.patterns) == 2 and f.matches("params/stage2/blocks_1/mlp/fc1/kernel")
    assert not f.matches("params/stage2/patch_embed/proj/kernel")


@pytest.mark.parametrize(
    "text, match",
    [
        ("params/stage9/.*", r"--config.freeze: 'params/stage9/.\*' matches no variable of cvt_mini; names look like"),
        ("stage0/.*", r"matches no variable.*a full match, e.g. 'params/stage0/.\*"),
        ("params/.*", r"freezes every parameter of cvt_mini: nothing would train.*'params/\(\?!head/\).\*'"),
        ("params/(stage0", r"--config.freeze: 'params/\(stage0' is not a regular expression"),
    ],
)
def test_bad_freeze_patterns_say_what_to_fix(text, match):
    params, _ = mini_params()
    with pytest.raises(ValueError, match=match):
        param_groups.Freeze(text).check({"params": params, "batch_stats": {}}, "cvt_mini")


@pytest.mark.slow
def test_frozen_stages_stay_fixed_in_the_train_step_and_their_gradients_are_not_computed():
    """The real program: stages 0-1 and their BatchNorm statistics bit-identical after steps, the rest trains."""
    rng = np.random.default_rng(0)
    batch = jax.device_put(
        {
            "image": rng.standard_normal((8, 28, 28, 1), dtype=np.float32),
            "label": rng.integers(0, 10, 8).astype(np.int32),
            "mask": np.ones(8, bool),
        }
    )
    flops = {}
    for freeze in ("", "params/stage[01]/.*,batch_stats/stage[01]/.*"):
        c = fashion_mnist.get_config()
        c.batch_size, c.freeze, c.layer_decay = 8, freeze, 0.75 if freeze else 0.0
        program = tu.build_program(c, sharding.create_mesh(), num_classes=10, in_chans=1, num_train_examples=800)
        state = program.init_state(program.init_rng)
        compiled = program.train_step.lower(state, batch).compile()
        flops[freeze] = compiled.cost_analysis()["flops"]
        before = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        for _ in range(2):
            state, metrics = compiled(state, batch)
        after = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    assert np.isfinite(float(metrics.compute()["loss"]))
    changed = {n: not np.array_equal(before_v, after_v) for (n, before_v), after_v in zip(
        named(before).items(), named(after).values(), strict=True)}  # fmt: skip
    for name, moved in changed.items():
        frozen = name.startswith(("params/stage0", "params/stage1", "batch_stats/stage0", "batch_stats/stage1"))
        if frozen:
            assert not moved, name
    assert changed["params/head/kernel"] and changed["params/stage2/blocks_0/mlp/fc1/kernel"]
    assert changed["batch_stats/stage2/blocks_0/attn/conv_proj_k/bn/mean"]
    # XLA drops the weight and input gradients of the frozen stages: the step does about a third less work.
    assert flops[c.freeze] < 0.8 * flops[""]


def test_changing_freeze_or_toggling_layer_decay_cannot_resume():
    saved = {"freeze": "", "layer_decay": 0.0, "learning_rate": 1e-3}
    ident = checkpoint.config_changes(saved, {**saved, "freeze": "params/stage0/.*"})["identity"]
    assert ident == [("freeze", "", "params/stage0/.*")]
    assert checkpoint.config_changes(saved, {**saved, "layer_decay": 0.75})["identity"] == [("layer_decay", 0.0, 0.75)]
    on = {**saved, "layer_decay": 0.75}
    assert checkpoint.config_changes(on, {**on, "layer_decay": 0.65})["recipe"] == [("layer_decay", 0.75, 0.65)]
    # A saved config from before these options: unchanged defaults are free, a frozen set is not.
    old = {"learning_rate": 1e-3}
    assert checkpoint.config_changes(old, {**old, "freeze": "", "layer_decay": 0.0})["identity"] == []
    assert checkpoint.config_changes(old, {**old, "freeze": "params/stage0/.*"})["identity"] != []
