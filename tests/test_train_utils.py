"""Unit tests of the training building blocks: schedule, optimizer, masks, eval metrics, writers, plots.

Fast: no model is compiled except a tiny fake one for the exact masked-eval check.
"""

import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from cvt_flax import checkpoint as ckpt_lib
from cvt_flax import config_checks, errors, models, plots, sharding, writers
from cvt_flax import train_utils as tu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(**kw) -> ml_collections.ConfigDict:
    c = default.get_config()
    for k, v in kw.items():
        c[k] = v
    return c


# ----------------------------------------------------------------------------- schedule / run length


def test_run_length_follows_batch_size():
    c = cfg(batch_size=512, num_epochs=10.0, warmup_epochs=2.0)
    run = tu.derive_run_length(c, 50_000)
    assert (run.steps_per_epoch, run.total_steps, run.warmup_steps) == (97, 970, 194)
    assert run.eval_every_steps == run.checkpoint_every_steps == 97
    c.batch_size = 256  # eval_batch_size is a reference: it follows.
    assert c.eval_batch_size == 512
    run = tu.derive_run_length(c, 50_000)
    assert (run.steps_per_epoch, run.total_steps, run.warmup_steps) == (195, 1950, 390)
    c.num_train_steps = 7
    c.eval_every_steps = 3
    run = tu.derive_run_length(c, 50_000)
    assert (run.total_steps, run.eval_every_steps, run.warmup_steps) == (7, 3, 7)


def test_run_length_errors():
    with pytest.raises(ValueError, match="fewer than one batch.*--config.batch_size"):
        tu.derive_run_length(cfg(batch_size=512), 100)
    with pytest.raises(ValueError, match="no steps"):
        tu.derive_run_length(cfg(batch_size=8, num_epochs=0.0), 100)


def test_schedule_warmup_then_cosine():
    c = cfg(learning_rate=1e-3, warmup_init_lr=1e-6, min_learning_rate=1e-5, batch_size=8)
    run = tu.RunLength(10, 100, 10, 10, 10, 10)
    s = tu.create_learning_rate_schedule(c, run)
    assert float(s(0)) == pytest.approx(1e-6, rel=1e-4)
    assert float(s(5)) == pytest.approx((1e-6 + 1e-3) / 2, rel=1e-4)
    assert float(s(10)) == pytest.approx(1e-3)
    assert float(s(55)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-3)  # halfway through the cosine
    assert float(s(100)) == pytest.approx(1e-5)
    # No warmup: the run starts at the peak; cosine to the minimum.
    s0 = tu.create_learning_rate_schedule(c, tu.RunLength(10, 100, 0, 10, 10, 10))
    assert float(s0(0)) == pytest.approx(1e-3) and float(s0(100)) == pytest.approx(1e-5)


def test_learning_rate_scaling():
    assert tu.peak_learning_rate(cfg(learning_rate=2.5e-4, lr_base_batch_size=256, batch_size=2048)) == pytest.approx(
        2e-3
    )
    assert tu.peak_learning_rate(cfg(learning_rate=1e-3, lr_base_batch_size=0, batch_size=64)) == 1e-3


# ----------------------------------------------------------------------------- optimizer


def _tiny_params():
    model = models.create_model("cvt_tiny", num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])


def test_weight_decay_mask():
    params = _tiny_params()
    mask = {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(
        tu.weight_decay_mask(params))}  # fmt: skip
    decayed = {k for k, v in mask.items() if v}
    skipped = {k for k, v in mask.items() if not v}
    assert "stage0/patch_embed/proj/kernel" in decayed
    assert "stage2/blocks_0/attn/conv_proj_q/conv/kernel" in decayed  # depthwise conv decays (official)
    assert "stage2/blocks_0/mlp/fc1/kernel" in decayed and "head/kernel" in decayed
    for name in (
        "stage2/cls_token",
        "head/bias",
        "norm/scale",
        "stage0/patch_embed/norm/bias",
        "stage2/blocks_0/attn/conv_proj_k/bn/scale",
        "stage2/blocks_0/attn/proj_q/bias",
    ):
        assert name in skipped, name
    assert all(k.endswith(("bias", "scale", "cls_token")) for k in skipped)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_decays_only_masked(name):
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    c = cfg(optimizer=name, weight_decay=0.5, grad_clip_norm=1.0)
    tx = tu.create_optimizer(c, lambda step: 0.1)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert np.allclose(updates["bias"], 0.0)
    assert np.all(np.asarray(updates["kernel"]) < 0)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match=r"Unknown optimizer 'lamb'.*--config.optimizer.*adamw"):
        tu.create_optimizer(cfg(optimizer="lamb"), lambda s: 0.1)


def test_label_smoothing_targets():
    t = np.asarray(tu.smooth_labels(jnp.array([2]), 4, 0.1))
    assert np.allclose(t, [[0.025, 0.025, 0.925, 0.025]]) and np.isclose(t.sum(), 1.0)


def test_spec_overrides():
    over = tu.spec_overrides(cfg(model="cvt_13", drop_path_rate=0.2, dropout_rate=-1.0), in_chans=1)
    assert over == {"in_chans": 1, "drop_path_rate": (0.0, 0.0, 0.2)}


class _FakeNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x.reshape(x.shape[0], -1))
        x = nn.Dropout(0.5)(x, deterministic=not train)
        return nn.Dense(3)(x)


def test_train_step_updates_batch_stats_ema_and_metrics():
    mesh = sharding.create_mesh()
    model = _FakeNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))
    tx = tu.create_optimizer(cfg(optimizer="adamw", weight_decay=0.0, grad_clip_norm=0.0), lambda s: 0.1)
    state = jax.device_put(
        tu.create_train_state(model, tx, variables, ema_decay=0.5), sharding.replicated_sharding(mesh)
    )
    seen = []

    def mix(rng, images, targets):  # the mixing hook sees the smoothed one-hot targets
        seen.append(targets.shape)
        return images, targets

    step = tu.make_train_step(
        mesh, base_rng=jax.random.PRNGKey(1), num_classes=3, label_smoothing=0.1,
        schedule=lambda s: 0.1 * (s + 1), mix_fn=mix, ema_decay=0.5,
    )  # fmt: skip
    n = 2 * jax.device_count()
    rng = np.random.default_rng(0)
    batch = {
        "image": jax.device_put(rng.normal(size=(n, 2, 2, 1)).astype(np.float32) + 3.0, sharding.data_sharding(mesh)),
        "label": jax.device_put(rng.integers(0, 3, n).astype(np.int32), sharding.data_sharding(mesh)),
    }
    p0 = jax.device_get(state.params)
    new, metrics = step(state, batch)
    assert seen == [(n, 3)] and int(new.step) == 1
    p1 = jax.device_get(new.params)
    ema = jax.device_get(new.ema_params)
    for a, b, e in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), jax.tree.leaves(ema), strict=True):
        assert not np.allclose(a, b)
        np.testing.assert_allclose(e, 0.5 * a + 0.5 * b, rtol=1e-6, atol=1e-7)
    # BatchNorm saw the global batch (mean about 3, momentum 0.5).
    assert np.allclose(jax.device_get(new.batch_stats)["BatchNorm_0"]["mean"], 1.5, atol=0.5)
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert values["learning_rate"] == pytest.approx(0.1) and values["grad_norm"] > 0 and 0 <= values["accuracy"] <= 1
    _, m2 = step(new, batch)
    assert float(m2.compute()["learning_rate"]) == pytest.approx(0.2)  # the lr of the step being taken


# ----------------------------------------------------------------------------- exact masked eval


def test_masked_eval_is_exact():
    """A fake model whose logits are its input: metrics over padded batches equal numpy's over real examples."""
    mesh = sharding.create_mesh()
    n_dev = jax.device_count()
    batch, classes, n_real = 2 * n_dev, 7, 5 * n_dev + 3
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(n_real, classes)).astype(np.float32)
    labels = rng.integers(0, classes, size=n_real).astype(np.int32)
    logits[0] = 0.0
    logits[0, labels[0]] = 5.0  # surely right
    batches = []
    for start in range(0, n_real, batch):
        x, y = logits[start : start + batch], labels[start : start + batch]
        pad = batch - len(x)
        mask = np.r_[np.ones(len(x)), np.zeros(pad)].astype(bool)
        # Padding holds garbage that would change every metric if it were counted.
        x = np.concatenate([x, np.full((pad, classes), 1e4, np.float32)])
        y = np.concatenate([y, np.zeros(pad, np.int32)])
        shard = sharding.data_sharding(mesh)
        batches.append({k: jax.device_put(v, shard) for k, v in {"image": x, "label": y, "mask": mask}.items()})
    assert len(batches) == 3 and not np.asarray(batches[-1]["mask"]).all()

    def fake_apply(variables, x, train):
        return x * variables["scale"]

    eval_fn = tu.make_eval_step(mesh, fake_apply)
    out = tu.evaluate(eval_fn, {"scale": jnp.float32(1.0)}, batches)

    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want_loss = -logp[np.arange(n_real), labels].mean()
    top1 = logits.argmax(-1) == labels
    top5 = (np.argsort(-logits, -1)[:, :5] == labels[:, None]).any(-1)
    assert out["count"] == n_real
    assert out["accuracy"] == pytest.approx(top1.sum() / n_real, abs=1e-7)
    assert out["top5_accuracy"] == pytest.approx(top5.sum() / n_real, abs=1e-7)
    assert out["loss"] == pytest.approx(want_loss, rel=1e-6)


def test_top5_with_fewer_than_five_classes():
    out = tu.classification_metrics(jnp.array([[0.0, 1.0, 2.0]]), jnp.array([0]))
    assert float(out["accuracy"][0]) == 0.0 and float(out["top5_accuracy"][0]) == 1.0


# ----------------------------------------------------------------------------- init_from merging


def _vars(head_classes=10, width=48):
    return {
        "params": {
            "stage0": {"patch_embed": {"proj": {"kernel": np.ones((3, 3, 3, width), np.float32)}}},
            "head": {"kernel": np.zeros((width, head_classes), np.float32), "bias": np.zeros(head_classes, np.float32)},
        },
        "batch_stats": {"stage0": {"bn": {"mean": np.full(width, 2.0, np.float32)}}},
    }


def test_merge_pretrained_replaces_a_different_head():
    target, loaded = _vars(10), _vars(1000)
    loaded["params"]["stage0"]["patch_embed"]["proj"]["kernel"] *= 3
    merged, reinit = ckpt_lib.merge_pretrained(target, loaded)
    assert reinit and merged["params"]["head"]["kernel"].shape == (48, 10)
    assert np.all(merged["params"]["stage0"]["patch_embed"]["proj"]["kernel"] == 3)
    assert np.all(merged["batch_stats"]["stage0"]["bn"]["mean"] == 2)
    same = _vars(10)
    same["params"]["head"]["kernel"] += 1.0
    merged, reinit = ckpt_lib.merge_pretrained(target, same)
    assert not reinit and np.array_equal(merged["params"]["head"]["kernel"], same["params"]["head"]["kernel"])
    merged, reinit = ckpt_lib.merge_pretrained(target, same, new_head=True)  # a new task with as many classes
    assert reinit and np.array_equal(merged["params"]["head"]["kernel"], target["params"]["head"]["kernel"])


def test_merge_pretrained_skips_the_named_variables():
    target, loaded = _vars(10), _vars(10)
    loaded["params"]["stage0"]["patch_embed"]["proj"]["kernel"] *= 3
    loaded["batch_stats"]["stage0"]["bn"]["mean"] += 1
    loaded["params"]["head"]["kernel"] += 1
    merged, reinit = ckpt_lib.merge_pretrained(target, loaded, skip=["params/stage0/.*"])
    assert not reinit and np.all(merged["params"]["head"]["kernel"] == 1)  # loaded
    assert np.all(merged["params"]["stage0"]["patch_embed"]["proj"]["kernel"] == 1)  # fresh (skipped)
    assert np.all(merged["batch_stats"]["stage0"]["bn"]["mean"] == 3)  # loaded: the pattern names params only
    with pytest.raises(ValueError, match="matches no variable"):
        ckpt_lib.merge_pretrained(target, loaded, skip=["stage0/.*"])  # a full match is needed
    with pytest.raises(ValueError, match="not a regular expression"):
        ckpt_lib.merge_pretrained(target, loaded, skip=["params/(stage0"])


def test_check_pretrained_names_mismatches():
    loaded = _vars(10, width=64)
    loaded["params"]["stage0"]["patch_embed"]["proj"]["kernel"] = np.ones((3, 3, 1, 64), np.float32)
    loaded["params"]["extra"] = {"kernel": np.zeros(3)}
    with pytest.raises(ValueError) as e:
        ckpt_lib.check_pretrained(_vars(10), loaded, info={"variant": "cvt_13"}, model_name="cvt_tiny")
    msg = str(e.value)
    assert "params/stage0/patch_embed/proj/kernel: checkpoint (3, 3, 1, 64) vs model (3, 3, 3, 48)" in msg
    assert "batch_stats/stage0/bn/mean" in msg and "params/extra/kernel" in msg
    assert "--config.model" in msg and "'cvt_13'" in msg and "set --config.num_channels=1" in msg
    assert "(2 shape mismatches, 0 missing, 1 unexpected)" in msg


# ----------------------------------------------------------------------------- writers / progress / plots


def _read_events(path):
    from tensorboardX.proto import event_pb2

    raw = path.read_bytes()
    i, events = 0, []
    while i < len(raw):
        (n,) = struct.unpack("<Q", raw[i : i + 8])
        e = event_pb2.Event()
        e.ParseFromString(raw[i + 12 : i + 12 + n])
        events.append(e)
        i += 12 + n + 4
    return events


def test_writer_fallback_without_tensorflow(tmp_path):
    """With TensorFlow unimportable, the writer is tensorboardX (no console echo) and writes readable scalars."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["tensorflow"] = None
        sys.modules["tensorboard"] = None
        import numpy as np
        from absl import logging
        logging.use_absl_handler()
        logging.set_verbosity(logging.INFO)
        from cvt_flax import writers
        assert not writers.clu_writers_available()
        w = writers.create_default_writer({str(tmp_path)!r})
        assert isinstance(w, writers.TensorBoardXWriter), type(w)
        w.write_hparams({{"lr": 0.1, "model": "cvt_tiny"}})
        w.write_scalars(3, {{"train/loss": np.float32(1.5), "eval/accuracy": 0.25}})
        w.write_images(3, {{"img": np.zeros((2, 4, 4, 3), np.uint8)}})
        w.flush(); w.close()
        assert "tensorflow" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("OK")
        """
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
    assert "eval/accuracy" not in proc.stderr  # the training loop prints its own line; no second copy
    files = [f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents")]
    assert len(files) == 1
    scalars = {v.tag: (e.step, v.simple_value) for e in _read_events(tmp_path / files[0]) for v in e.summary.value}
    assert scalars["train/loss"] == (3, 1.5) and scalars["eval/accuracy"] == (3, 0.25)


def test_progress_reporter_excludes_compilation_and_timed_sections(monkeypatch):
    # init, first step done (compilation: 30 s), section start, section end, report, report
    clock = iter([0.0, 30.0, 30.0, 40.0, 50.0, 55.0])
    monkeypatch.setattr(writers.time, "perf_counter", lambda: next(clock))
    p = writers.ProgressReporter(total_steps=101, batch_size=32, start_step=0, bar=False)
    p.first_step_done(1)
    with p.timed("eval"):
        pass
    out = p.report(11)  # 20 s since the first step, 10 s in eval: 10 steps in 10 s.
    assert out["steps_per_sec"] == pytest.approx(1.0)
    assert out["images_per_sec"] == pytest.approx(32.0)
    assert out["eta_seconds"] == pytest.approx(90.0)  # steady state: 90 steps left at 1 step/s
    assert p.report(21)["steps_per_sec"] == pytest.approx(2.0)
    assert p.steady_images_per_sec() == pytest.approx(20 * 32 / 15)  # compilation never counts
    assert p.sections["first_step"] == pytest.approx(30.0)
    assert writers.format_duration(3725) == "1:02:05"


def test_plot_curves(tmp_path):
    hist = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "epoch": s / 10, "split": "train", "loss": 2.0 / s, "accuracy": 0.1 * s} for s in (1, 2, 3)]
    recs.append({"step": 3, "epoch": 0.3, "split": "eval", "loss": 1.0, "accuracy": 0.4, "top5_accuracy": 0.8})
    hist.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = plots.plot_curves(hist, tmp_path / "curves.png", title="t")
    assert pathlib.Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.read_history(hist) == recs


def test_config_changes_by_kind():
    from cvt_flax import checkpoint

    saved = {"model": "cvt_mini", "learning_rate": 2e-3, "log_every_steps": 50, "aug": {"hflip": True}}
    current = {
        "model": "cvt_tiny",
        "learning_rate": 1e-3,
        "log_every_steps": 10,
        "aug": {"hflip": False},
        "init_method": "trunc_norm",  # a field the saved run did not have yet: free, but listed
    }
    changes = checkpoint.config_changes(saved, current)
    assert changes["identity"] == [("model", "cvt_mini", "cvt_tiny")]
    assert changes["recipe"] == [("aug.hflip", True, False), ("learning_rate", 2e-3, 1e-3)]
    assert changes["free"] == [("init_method", None, "trunc_norm"), ("log_every_steps", 50, 10)]


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("learning_rate", float("nan"), r"--config.learning_rate=nan is out of range: .* \(0, inf\)"),
        ("learning_rate", -1e-3, r"learning_rate=-0.001 .* \(0, inf\)"),
        ("min_learning_rate", 1.0, r"min_learning_rate=1.0 is above --config.learning_rate"),
        ("warmup_epochs", float("inf"), r"warmup_epochs=inf .* \[0, inf\)"),
        ("weight_decay", -0.05, r"weight_decay=-0.05 .* \[0, 10\]"),
        ("b1", 1.0, r"b1=1.0 .* \[0, 1\)"),
        ("eps", 0.0, r"eps=0.0 .* \(0, 1\]"),
        ("momentum", 1.5, r"momentum=1.5"),
        ("label_smoothing", 1.0, r"label_smoothing=1.0 .* \[0, 1\)"),
        ("ema_decay", 1.0, r"ema_decay=1.0 .* \[0, 1\) \(0: no EMA\)"),
        ("grad_clip_norm", -1.0, r"grad_clip_norm=-1.0"),
        ("drop_path_rate", 1.0, r"drop_path_rate=1.0 .* \(-inf, 1\) \(negative: the variant's\)"),
        ("aug.mixup_alpha", -0.2, r"aug.mixup_alpha=-0.2"),
        ("aug.mix_prob", 2.0, r"aug.mix_prob=2.0 .* \[0, 1\]"),
        ("aug.random_erasing", float("nan"), r"aug.random_erasing=nan"),
    ],
)
def test_numeric_recipe_fields_are_checked_up_front(field, value, match):
    """Each field outside its range is refused with its name, value and range; every shipped recipe passes."""
    config = default.get_config()
    config_checks.check_numeric_fields(config)
    node = config
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(errors.UserError, match=match):
        config_checks.check_numeric_fields(config)
