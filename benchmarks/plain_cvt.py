"""A plain Flax CvT and training step: the baseline that the compile-only report holds ours against.

What a JAX user would write from the paper and the official code without this project: the same modules
(convolutional token embedding, depthwise-conv + BatchNorm projections, pre-norm blocks with stochastic depth,
class token in the last stage) written straightforwardly with `nn.Conv(feature_group_count=C)`, `nn.Dropout` and
`nn.BatchNorm`, every block unrolled; initialised with ``jax.jit(model.init)`` on the mesh; trained by
``optax.adamw`` on a warmup-cosine schedule with integer-label cross-entropy, nothing else (no label smoothing,
mixup, clipping, EMA, weight-decay mask or metrics beyond the loss). It has exactly the parameters of
`cvt_flax.models.CvT` for the same spec (tested), so every figure of ours has a like-for-like ratio.

Only the spec (`cvt_flax.models.get_spec`) is shared with the project; nothing of its model or steps.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cvt_flax.models import CvTSpec


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class Attention(nn.Module):
    dim: int
    heads: int
    stride_kv: int
    with_cls: bool
    dtype: Any

    @nn.compact
    def __call__(self, x, hw, train):
        b, n, c = x.shape
        h, w = hw
        if self.with_cls:
            cls, x = x[:, :1], x[:, 1:]
        x = x.reshape(b, h, w, c)

        def proj(name, stride):
            y = nn.Conv(c, (3, 3), (stride, stride), padding=1, feature_group_count=c, use_bias=False,
                        dtype=self.dtype, name=f"{name}_conv")(x)  # fmt: skip
            y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                             name=f"{name}_bn")(y)  # fmt: skip
            y = y.reshape(b, -1, c)
            return jnp.concatenate([cls.astype(y.dtype), y], 1) if self.with_cls else y

        q, k, v = proj("q", 1), proj("k", self.stride_kv), proj("v", self.stride_kv)
        d = self.dim // self.heads
        q = nn.Dense(self.dim, dtype=self.dtype, name="proj_q")(q).reshape(b, -1, self.heads, d)
        k = nn.Dense(self.dim, dtype=self.dtype, name="proj_k")(k).reshape(b, -1, self.heads, d)
        v = nn.Dense(self.dim, dtype=self.dtype, name="proj_v")(v).reshape(b, -1, self.heads, d)
        attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * self.dim**-0.5, -1)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(v.dtype), v).reshape(b, -1, self.dim)
        return nn.Dense(self.dim, dtype=self.dtype, name="proj")(out)


class Block(nn.Module):
    dim: int
    heads: int
    mlp_ratio: float
    drop_path: float
    stride_kv: int
    with_cls: bool
    dtype: Any

    @nn.compact
    def __call__(self, x, hw, train):
        drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
        y = Attention(self.dim, self.heads, self.stride_kv, self.with_cls, self.dtype, name="attn")(
            nn.LayerNorm(dtype=self.dtype, name="norm1")(x), hw, train
        )
        x = x + drop(y)
        y = nn.LayerNorm(dtype=self.dtype, name="norm2")(x)
        y = nn.Dense(int(self.dim * self.mlp_ratio), dtype=self.dtype, name="fc1")(y)
        y = nn.Dense(self.dim, dtype=self.dtype, name="fc2")(quick_gelu(y))
        return x + drop(y)


class PlainCvT(nn.Module):
    """CvT with the ``dw_bn`` projection of every official variant, every block unrolled."""

    spec: CvTSpec
    num_classes: int
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.spec
        x = x.astype(self.dtype)
        cls = None
        for i in range(s.num_stages):
            p = s.patch_padding[i]
            x = nn.Conv(s.dim_embed[i], (s.patch_size[i],) * 2, (s.patch_stride[i],) * 2, padding=((p, p), (p, p)),
                        dtype=self.dtype, name=f"embed{i}")(x)  # fmt: skip
            x = nn.LayerNorm(dtype=self.dtype, name=f"embed_norm{i}")(x)
            b, h, w, c = x.shape
            x = x.reshape(b, h * w, c)
            if s.cls_token[i]:
                token = self.param(f"cls_token{i}", nn.initializers.normal(0.02), (1, 1, c))
                x = jnp.concatenate([jnp.broadcast_to(token.astype(x.dtype), (b, 1, c)), x], 1)
            rates = np.linspace(0.0, self.drop_path_rate if i == s.num_stages - 1 else 0.0, s.depth[i])
            for j in range(s.depth[i]):
                x = Block(c, s.num_heads[i], s.mlp_ratio[i], float(rates[j]), s.stride_kv[i], s.cls_token[i],
                          self.dtype, name=f"stage{i}_block{j}")(x, (h, w), train)  # fmt: skip
            if s.cls_token[i]:
                cls, x = x[:, :1], x[:, 1:]
            x = x.reshape(b, h, w, c)
        pooled = nn.LayerNorm(dtype=self.dtype, name="norm")(cls[:, 0] if cls is not None else x.mean((1, 2)))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(pooled)


class TrainState(train_state.TrainState):
    batch_stats: Any = None


def make_programs(
    spec: CvTSpec,
    num_classes: int,
    mesh: Mesh,
    *,
    image_size: int,
    dtype: Any = jnp.bfloat16,
    learning_rate: float = 1e-3,
    total_steps: int = 10_000,
    drop_path_rate: float = 0.0,
) -> dict[str, Any]:
    """The plain program: ``init`` (``rng -> state``, on the mesh), ``train`` and ``eval`` steps, all jitted.

    Returns:
      ``{'model', 'init', 'train', 'eval', 'abstract_state'}``.
    """
    model = PlainCvT(spec, num_classes, drop_path_rate, dtype)
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(1000, total_steps // 10), total_steps)
    tx = optax.adamw(schedule, weight_decay=0.05)

    def init(rng):
        variables = model.init(rng, jnp.zeros((1, image_size, image_size, spec.in_chans)))
        return TrainState.create(
            apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
        )

    def train(state, batch):
        rng = jax.random.fold_in(jax.random.PRNGKey(0), state.step)

        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
                rngs={"dropout": rng}, mutable=["batch_stats"],
            )  # fmt: skip
            loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"])
            return loss.mean(), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, batch_stats=stats), loss

    def evaluate(variables, batch):
        logits = model.apply(variables, batch["image"])
        return jnp.mean(jnp.argmax(logits, -1) == batch["label"])

    rep, dat = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    return {
        "model": model,
        "init": jax.jit(init, out_shardings=rep),
        "train": jax.jit(train, in_shardings=(rep, dat), out_shardings=(rep, rep), donate_argnums=0),
        "eval": jax.jit(evaluate, in_shardings=(rep, dat), out_shardings=rep),
        "abstract_state": jax.eval_shape(init, jax.random.PRNGKey(0)),
    }
