"""CvT (Convolutional vision Transformer) in Flax linen.

A faithful re-implementation of ``lib/models/cls_cvt.py`` of microsoft/CvT
(Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021),
in channels-last layout. Parameter names follow the official module tree
(``stage0/patch_embed/proj``, ``stage2/blocks_0/attn/conv_proj_q/bn``, ``norm``,
``head``), which keeps weight conversion a rename plus a transpose.

Inputs are ``[batch, height, width, channels]`` images (any size that the strides
allow; there is no position embedding). Tokens are flattened row-major, as the
official ``b c h w -> b (h w) c``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cvt_flax.models.spec import ACTIVATIONS, CvTSpec, conv_out_size

Array = jax.Array
Dtype = Any

# Official initialisation: truncated normal (std 0.02) for Linear weights, zero
# biases. torch's trunc_normal_ truncates at +-2 (absolute), i.e. at +-100 std for
# std=0.02, which is practically an untruncated normal; flax's truncated_normal
# truncates at +-2 std. Both are "trunc_normal(0.02)"; we follow the paper's intent.
dense_init = nn.initializers.truncated_normal(stddev=0.02)
zeros_init = nn.initializers.zeros
# torch's default Conv2d init (kaiming_uniform with a=sqrt(5)) == U(-1/sqrt(fan_in), +).
conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Initialisations of the blocks' Linear layers (the official spec's INIT): ``trunc_norm`` (the default of
# every official yaml) or ``xavier`` (uniform, the official code's other choice). The class token and the
# head stay trunc_normal(0.02) either way, as in the official code.
LINEAR_INITS = ("trunc_norm", "xavier")


def linear_init(name: str) -> Callable[..., Array]:
    """Kernel initialiser of a block's Linear layer for ``name`` (one of `LINEAR_INITS`)."""
    if name == "trunc_norm":
        return dense_init
    if name == "xavier":
        return nn.initializers.xavier_uniform()
    raise ValueError(f"Unknown init {name!r}; choose one of {LINEAR_INITS}.")


LN_EPS = 1e-5
# The residuals a scanned stage keeps for the backward pass (see `Stage._scan_blocks`).
SCAN_POLICY = jax.checkpoint_policies.dots_saveable
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # torch momentum 0.1


def quick_gelu(x: Array) -> Array:
    """The official CvT activation: ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


# XLA's float32 erf (the decomposition of ``chlo.erf`` that jax lowers `jax.lax.erf` to): x * P(x^2) / Q(x^2) on
# [-4, 4], clamped to [-1, 1].
_ERF_P = (-2.72614237e-10, 2.77068146e-8, -2.10102394e-6, -5.69250624e-5, -7.34990637e-4, -2.954600e-3, -0.0160960332)
_ERF_Q = (-1.45660715e-5, -2.13374049e-4, -0.00168282702, -0.00737332925, -0.0142647391)


@jax.custom_jvp
def erf(x: Array) -> Array:
    """``erf`` in plain arithmetic: the same numbers as `jax.lax.erf` (float32), portable to every consumer.

    `jax.lax.erf` is serialized as a ``stablehlo.composite "chlo.erf"`` (``vhlo.composite_v2`` in a portable
    artefact), which TensorFlow 2.21 cannot deserialize: a SavedModel of an erf-GELU CvT would not load. Written
    out, the program holds only multiply, add, divide and clamp. Computed in float32 (bfloat16 inputs are upcast
    and the result cast back); the derivative is the analytic one, as `jax.lax.erf`'s.
    """
    xf = jnp.clip(x.astype(jnp.float32), -4.0, 4.0)
    x2 = xf * xf
    p = jnp.full_like(x2, _ERF_P[0])
    for c in _ERF_P[1:]:
        p = p * x2 + c
    q = jnp.full_like(x2, _ERF_Q[0])
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    return jnp.clip(xf * p / q, -1.0, 1.0).astype(x.dtype)


@erf.defjvp
def _erf_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    return erf(x), (2.0 / np.sqrt(np.pi)) * jnp.exp(-x * x).astype(x.dtype) * t


def gelu_erf(x: Array) -> Array:
    """Exact GELU as torch computes it, ``x/2 * (1 + erf(x/sqrt(2)))``.

    The same function as ``jax.nn.gelu(x, approximate=False)`` (within 2e-6 in float32, tested), which uses
    ``erfc``, whose derivative XLA's CPU backend compiles into more and slower kernels: the backward pass of
    cvt_mini's stage-0 MLP alone took 6.8 ms instead of 19.4 ms on the 2-core CPU (in the whole training step
    XLA fuses differently and the difference was within the machine's noise).
    """
    return 0.5 * x * (1.0 + erf(x * np.asarray(1.0 / np.sqrt(2.0), x.dtype)))


def get_activation(name: str) -> Callable[[Array], Array]:
    """Returns the activation function named ``name``.

    Args:
      name: ``quick_gelu`` (official microsoft/CvT), ``gelu`` (exact erf GELU, as
        the HuggingFace port) or ``gelu_tanh`` (tanh approximation).

    Raises:
      ValueError: for an unknown name.
    """
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return gelu_erf
    if name == "gelu_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    raise ValueError(f"Unknown activation {name!r}; choose one of {ACTIVATIONS}.")


def avg_pool_ceil(x: Array, kernel: int, stride: int, padding: int) -> Array:
    """``torch.nn.AvgPool2d(kernel, stride, padding, ceil_mode=True)`` in NHWC.

    Matches torch exactly, including ``count_include_pad=True`` and the divisor of
    windows that ceil mode lets run past the padded input.
    """

    def out_size(n: int) -> int:
        out = -(-(n + 2 * padding - kernel) // stride) + 1
        if (out - 1) * stride >= n + padding:
            out -= 1
        return out

    def divisors(n: int, out: int) -> np.ndarray:
        starts = np.arange(out) * stride - padding
        ends = np.minimum(starts + kernel, n + padding)
        return (ends - starts).astype(np.float32)

    _, h, w, _ = x.shape
    oh, ow = out_size(h), out_size(w)
    pad_h = (padding, max(0, (oh - 1) * stride + kernel - h - padding))
    pad_w = (padding, max(0, (ow - 1) * stride + kernel - w - padding))
    summed = jax.lax.reduce_window(
        x,
        jnp.array(0, x.dtype),
        jax.lax.add,
        (1, kernel, kernel, 1),
        (1, stride, stride, 1),
        ((0, 0), pad_h, pad_w, (0, 0)),
    )
    div = np.outer(divisors(h, oh), divisors(w, ow))[None, :, :, None]
    return summed / jnp.asarray(div, x.dtype)


class ConvEmbed(nn.Module):
    """Convolutional token embedding: an overlapping strided conv, then LayerNorm.

    Attributes:
      embed_dim: Output channels.
      patch_size: Conv kernel size.
      stride: Conv stride.
      padding: Zero padding on every side.
    """

    embed_dim: int
    patch_size: int
    stride: int
    padding: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Conv(
            self.embed_dim,
            (self.patch_size, self.patch_size),
            strides=(self.stride, self.stride),
            padding=((self.padding, self.padding), (self.padding, self.padding)),
            kernel_init=conv_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="proj",
        )(x)
        return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)


def _tap(xp: Array, i: int, j: int, stride: int, out_hw: tuple[int, int]) -> Array:
    """The ``(i, j)`` tap of a padded input: ``xp[:, i + s*y, j + s*x, :]`` for the ``out_hw`` output grid."""
    b, _, _, c = xp.shape
    oh, ow = out_hw
    return jax.lax.slice(
        xp, (0, i, j, 0), (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c), (1, stride, stride, 1)
    )


def _shifted_sum(xp: Array, kernel: Array, stride: int, out_hw: tuple[int, int]) -> Array:
    """``sum_ij tap_ij(xp) * kernel[i, j, 0]``: a depthwise correlation of a padded input."""
    k = kernel.shape[0]
    out = None
    for i in range(k):
        for j in range(k):
            term = _tap(xp, i, j, stride, out_hw) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def _pad_hw(x: Array, padding: int) -> Array:
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _depthwise_shift(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    _, h, w, _ = x.shape
    k = kernel.shape[0]
    out_hw = (conv_out_size(h, k, stride, padding), conv_out_size(w, k, stride, padding))
    return _shifted_sum(_pad_hw(x, padding), kernel, stride, out_hw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv_shift(x: Array, kernel: Array, stride: int, padding: int) -> Array:
    """Depthwise conv as a sum of ``k*k`` strided, shifted slices times per-channel weights.

    Numerically the same as ``lax.conv_general_dilated(..., feature_group_count=C)``
    (up to summation order); fuses into a few elementwise kernels, which XLA's CPU
    backend runs much faster than its grouped convolution. Its gradient is written out
    (`jax.custom_vjp`) in the same form: the input gradient is the same shifted sum over the
    (dilated, padded) output gradient with the flipped kernel, the kernel gradient one
    reduction per tap, so that no shifted copy of the input is kept for the backward pass.
    (A `jax.custom_vjp` function supports reverse-mode differentiation only, not ``jax.jvp``.)

    Args:
      x: ``[B, H, W, C]``.
      kernel: ``[k, k, 1, C]`` (flax depthwise layout).
      stride: Stride.
      padding: Zero padding on every side.
    """
    return _depthwise_shift(x, kernel, stride, padding)


def _dw_fwd(x: Array, kernel: Array, stride: int, padding: int) -> tuple[Array, tuple[Array, Array]]:
    return _depthwise_shift(x, kernel, stride, padding), (x, kernel)


def _dw_bwd(stride: int, padding: int, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = res
    _, h, w, c = x.shape
    k = kernel.shape[0]
    out_hw = g.shape[1:3]
    # Input gradient: dilate the output gradient by the stride, pad it so that every input pixel sees the
    # k x k window of outputs it fed, and correlate with the flipped kernel.
    lo = k - 1 - padding
    dims = [(lo, n - ((o - 1) * stride + 1) + padding, stride - 1) for n, o in zip((h, w), out_hw, strict=True)]
    gp = jax.lax.pad(g, jnp.array(0, g.dtype), [(0, 0, 0), *dims, (0, 0, 0)])
    dx = _shifted_sum(gp, kernel[::-1, ::-1], 1, (h, w))
    # Kernel gradient: for each tap, the sum over batch and positions of input tap times output gradient.
    xp = _pad_hw(x, padding)
    taps = [jnp.sum(_tap(xp, i, j, stride, out_hw) * g, axis=(0, 1, 2)) for i in range(k) for j in range(k)]
    dk = jnp.stack(taps).reshape(k, k, 1, c).astype(kernel.dtype)
    return dx.astype(x.dtype), dk


depthwise_conv_shift.defvjp(_dw_fwd, _dw_bwd)


class DepthwiseConv(nn.Module):
    """Depthwise conv without bias; parameter ``kernel`` ``[k, k, 1, C]`` as `nn.Conv`.

    Attributes:
      kernel_size: Kernel side.
      stride: Stride.
      padding: Zero padding.
      impl: ``conv`` (XLA grouped convolution; cuDNN on GPU) or ``shift`` (sum of
        shifted slices; faster on CPU).
    """

    kernel_size: int
    stride: int
    padding: int
    impl: str = "conv"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, s, p, c = self.kernel_size, self.stride, self.padding, x.shape[-1]
        kernel = self.param("kernel", conv_init, (k, k, 1, c), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if self.impl == "shift":
            return depthwise_conv_shift(x, kernel, s, p)
        if self.impl != "conv":
            raise ValueError(f"Unknown depthwise_impl {self.impl!r}; choose 'conv' or 'shift'.")
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(s, s),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=c,
        )


class ConvProjection(nn.Module):
    """Convolutional projection of a token map (before the linear q/k/v projection).

    Attributes:
      method: ``dw_bn`` (depthwise conv without bias, then BatchNorm), ``avg``
        (average pool, ceil mode) or ``linear`` (identity).
      kernel_size: Kernel of the conv / pool.
      stride: Stride (1 for queries, 2 for the paper's squeezed keys/values).
      padding: Padding.
      depthwise_impl: ``conv`` or ``shift`` (see `DepthwiseConv`).
    """

    method: str
    kernel_size: int
    stride: int
    padding: int
    depthwise_impl: str = "conv"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if self.method == "linear":
            return x
        if self.method == "avg":
            return avg_pool_ceil(x, self.kernel_size, self.stride, self.padding)
        if self.method != "dw_bn":
            raise ValueError(f"Unknown projection method {self.method!r}.")
        k, s, p = self.kernel_size, self.stride, self.padding
        x = DepthwiseConv(
            k, s, p, impl=self.depthwise_impl, dtype=self.dtype, param_dtype=self.param_dtype, name="conv"
        )(x)
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPS,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="bn",
        )(x)


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    scale: float,
    *,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    dropout_rng: Array | None = None,
    implementation: str = "explicit",
) -> Array:
    """Multi-head attention on ``[batch, tokens, heads, head_dim]`` inputs.

    Args:
      q: Queries ``[B, T, H, D]``.
      k: Keys ``[B, S, H, D]``.
      v: Values ``[B, S, H, D]``.
      scale: Logit scale (CvT uses ``dim_out ** -0.5``, the full width).
      dropout_rate: Attention-probability dropout.
      deterministic: Disables dropout.
      dropout_rng: Rng for dropout.
      implementation: ``explicit`` (einsum, float32 softmax; supports dropout),
        ``xla`` or ``cudnn`` (``jax.nn.dot_product_attention``; no dropout).

    Returns:
      ``[B, T, H, D]`` attention output.
    """
    use_dropout = dropout_rate > 0.0 and not deterministic
    if implementation in ("xla", "cudnn") and not use_dropout:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1)
    if use_dropout:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)


class ConvAttention(nn.Module):
    """Convolutional-projection multi-head attention.

    The token map is projected by `ConvProjection` (queries with ``stride_q``,
    keys/values with ``stride_kv``), the class token bypasses the convolution
    and is concatenated back in front, then linear q/k/v projections, scaled
    dot-product attention with the official scale ``dim ** -0.5``, and an output
    projection with dropout.
    """

    dim: int
    num_heads: int
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    method: str = "dw_bn"
    kernel_size: int = 3
    stride_q: int = 1
    stride_kv: int = 2
    padding_q: int = 1
    padding_kv: int = 1
    with_cls_token: bool = False
    attention_impl: str = "explicit"
    depthwise_impl: str = "conv"
    init_method: str = "trunc_norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int], train: bool) -> Array:
        b, n, c = x.shape
        h, w = hw
        if self.with_cls_token:
            cls_tok, x = x[:, :1], x[:, 1:]
        x = x.reshape(b, h, w, c)
        proj = functools.partial(
            ConvProjection,
            kernel_size=self.kernel_size,
            depthwise_impl=self.depthwise_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        q_method = "linear" if self.method == "avg" else self.method
        q = proj(q_method, stride=self.stride_q, padding=self.padding_q, name="conv_proj_q")(x, train)
        k = proj(self.method, stride=self.stride_kv, padding=self.padding_kv, name="conv_proj_k")(x, train)
        v = proj(self.method, stride=self.stride_kv, padding=self.padding_kv, name="conv_proj_v")(x, train)
        q, k, v = (t.reshape(b, -1, c) for t in (q, k, v))
        if self.with_cls_token:
            cls_tok = cls_tok.astype(q.dtype)
            q, k, v = (jnp.concatenate([cls_tok, t], axis=1) for t in (q, k, v))

        dense = functools.partial(
            nn.Dense,
            self.dim,
            kernel_init=linear_init(self.init_method),
            bias_init=zeros_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        head_dim = self.dim // self.num_heads
        q = dense(use_bias=self.qkv_bias, name="proj_q")(q).reshape(b, -1, self.num_heads, head_dim)
        k = dense(use_bias=self.qkv_bias, name="proj_k")(k).reshape(b, -1, self.num_heads, head_dim)
        v = dense(use_bias=self.qkv_bias, name="proj_v")(v).reshape(b, -1, self.num_heads, head_dim)

        deterministic = not train
        rng = self.make_rng("dropout") if (self.attn_drop > 0.0 and not deterministic) else None
        out = dot_product_attention(
            q,
            k,
            v,
            self.dim**-0.5,
            dropout_rate=self.attn_drop,
            deterministic=deterministic,
            dropout_rng=rng,
            implementation=self.attention_impl,
        )
        out = out.reshape(b, -1, self.dim)
        out = dense(name="proj")(out)
        return nn.Dropout(self.proj_drop)(out, deterministic=deterministic)


class Mlp(nn.Module):
    """Transformer MLP: Dense, activation, dropout, Dense, dropout."""

    hidden_dim: int
    out_dim: int
    drop: float = 0.0
    act: str = "quick_gelu"
    init_method: str = "trunc_norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        dense = functools.partial(
            nn.Dense,
            kernel_init=linear_init(self.init_method),
            bias_init=zeros_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = dense(self.hidden_dim, name="fc1")(x)
        x = get_activation(self.act)(x)
        x = nn.Dropout(self.drop)(x, deterministic=not train)
        x = dense(self.out_dim, name="fc2")(x)
        return nn.Dropout(self.drop)(x, deterministic=not train)


class Block(nn.Module):
    """Pre-norm transformer block with convolutional attention and stochastic depth."""

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    drop: float = 0.0
    drop_path: float = 0.0
    act: str = "quick_gelu"
    init_method: str = "trunc_norm"
    attn_kwargs: tuple[tuple[str, Any], ...] = ()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, hw: tuple[int, int], train: bool, drop_path: Array | None = None) -> Array:
        """Runs the block; ``drop_path`` (a traced rate, from `Stage`'s scan) replaces the static ``self.drop_path``."""
        norm = functools.partial(nn.LayerNorm, epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype)
        if drop_path is None:
            # Stochastic depth: drop the whole residual branch per example.
            dropout = nn.Dropout(self.drop_path, broadcast_dims=tuple(range(1, x.ndim)))

            def drop(y: Array) -> Array:
                return dropout(y, deterministic=not train)

        else:

            def drop(y: Array) -> Array:
                if not train:
                    return y
                keep = 1.0 - drop_path
                mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
                return jnp.where(mask, y / keep.astype(y.dtype), jnp.zeros_like(y))

        y = ConvAttention(
            self.dim,
            self.num_heads,
            proj_drop=self.drop,
            init_method=self.init_method,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attn",
            **dict(self.attn_kwargs),
        )(norm(name="norm1")(x), hw, train)
        x = x + drop(y)
        y = Mlp(
            int(self.dim * self.mlp_ratio),
            self.dim,
            drop=self.drop,
            act=self.act,
            init_method=self.init_method,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="mlp",
        )(norm(name="norm2")(x), train)
        return x + drop(y)


class Stage(nn.Module):
    """One CvT stage: token embedding, optional class token, transformer blocks.

    Returns the ``[B, h, w, C]`` token map and the class token (``[B, 1, C]`` or
    None).
    """

    spec: CvTSpec
    index: int
    act: str = "quick_gelu"
    init_method: str = "trunc_norm"
    attention_impl: str = "explicit"
    depthwise_impl: str = "conv"
    remat: bool = False
    scan_blocks: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, Array | None]:
        s, i = self.spec, self.index
        x = ConvEmbed(
            s.dim_embed[i],
            s.patch_size[i],
            s.patch_stride[i],
            s.patch_padding[i],
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="patch_embed",
        )(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        with_cls = s.cls_token[i]
        if with_cls:
            cls_tok = self.param("cls_token", dense_init, (1, 1, c), self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls_tok.astype(x.dtype), (b, 1, c)), x], axis=1)
        x = nn.Dropout(s.drop_rate[i])(x, deterministic=not train)

        attn_kwargs = (
            ("qkv_bias", s.qkv_bias[i]),
            ("attn_drop", s.attn_drop_rate[i]),
            ("method", s.qkv_proj_method[i]),
            ("kernel_size", s.kernel_qkv[i]),
            ("stride_q", s.stride_q[i]),
            ("stride_kv", s.stride_kv[i]),
            ("padding_q", s.padding_q[i]),
            ("padding_kv", s.padding_kv[i]),
            ("with_cls_token", with_cls),
            ("attention_impl", self.attention_impl),
            ("depthwise_impl", self.depthwise_impl),
        )
        dpr = np.linspace(0.0, s.drop_path_rate[i], s.depth[i]) if s.depth[i] > 0 else []
        block_kwargs = dict(
            dim=c,
            num_heads=s.num_heads[i],
            mlp_ratio=s.mlp_ratio[i],
            drop=s.drop_rate[i],
            act=self.act,
            init_method=self.init_method,
            attn_kwargs=attn_kwargs,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.scan_blocks and s.depth[i] > 1 and not self.is_initializing():
            x = self._scan_blocks(x, (h, w), train, dpr, block_kwargs)
        else:
            block_cls = nn.remat(Block, static_argnums=(2, 3)) if self.remat else Block
            for j in range(s.depth[i]):
                x = block_cls(drop_path=float(dpr[j]), name=f"blocks_{j}", **block_kwargs)(x, (h, w), train)

        cls_out = None
        if with_cls:
            cls_out, x = x[:, :1], x[:, 1:]
        return x.reshape(b, h, w, c), cls_out

    def _scan_blocks(
        self, x: Array, hw: tuple[int, int], train: bool, rates: np.ndarray, block_kwargs: dict[str, Any]
    ) -> Array:
        """The stage's blocks as one `jax.lax.scan` over their stacked variables (compiled once, not per block).

        The variables stay where the unrolled loop puts them (``blocks_0``, ``blocks_1``, ...: the official
        names, in checkpoints and in memory); they are stacked here for the scan, and the updated BatchNorm
        statistics are written back per block. Initialisation always runs the unrolled loop, so parameters are the
        same either way; the outputs agree to float rounding. Stochastic depth and dropout draw one key per block
        from the stage's ``dropout`` stream, so in training the random masks differ from the unrolled loop's.
        """
        names = [f"blocks_{j}" for j in range(len(rates))]
        block = Block(drop_path=0.0, parent=None, **block_kwargs)

        def stacked(col: str) -> Any:
            trees = [self.get_variable(col, n) for n in names]
            return None if any(t is None for t in trees) else jax.tree.map(lambda *a: jnp.stack(a), *trees)

        params, stats = stacked("params"), stacked("batch_stats")
        attn_drop = dict(block_kwargs["attn_kwargs"])["attn_drop"]
        random = train and (float(np.max(rates)) > 0 or block_kwargs["drop"] > 0 or attn_drop > 0)
        keys = jax.random.split(self.make_rng("dropout"), len(names)) if random else None

        def body(carry: Array, xs: Any) -> tuple[Array, Any]:
            p, st, rate, key = xs
            variables = {"params": p} if st is None else {"params": p, "batch_stats": st}
            rngs = {} if key is None else {"dropout": key}
            rate = rate if random else None
            if train:
                out, updates = block.apply(variables, carry, hw, True, rate, rngs=rngs, mutable=["batch_stats"])
                return out, updates.get("batch_stats")
            return block.apply(variables, carry, hw, False, rate, rngs=rngs), None

        # What the backward pass keeps of each block: with ``remat`` nothing (all recomputed), else the matmul
        # and convolution outputs only (`SCAN_POLICY`). A scan cannot fuse or rematerialise across its body, so
        # keeping everything holds ~1.6-2x the unrolled loop's temporaries (compile-only: CvT-13@224 on H100 at
        # batch 128 15.0 GiB against 9.2 GiB; v5e 8.5 against 3.9); with the policy 7.0 and 4.0 GiB, for ~7% of
        # compile time (docs/compile_only.md).
        policy = None if self.remat else SCAN_POLICY
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
        x, new_stats = jax.lax.scan(body, x, (params, stats, jnp.asarray(rates, jnp.float32), keys))
        if new_stats is not None and self.is_mutable_collection("batch_stats"):
            for j, n in enumerate(names):
                self.put_variable("batch_stats", n, jax.tree.map(lambda a, j=j: a[j], new_stats))
        return x


class CvT(nn.Module):
    """Convolutional vision Transformer (image classifier or backbone).

    Attributes:
      spec: Architecture (see `CvTSpec` and `cvt_flax.models.registry`).
      num_classes: Classifier outputs; 0 returns the pooled features instead.
      act: MLP activation: ``quick_gelu`` (official), ``gelu`` (HuggingFace port).
      init_method: Initialisation of the blocks' Linear layers: ``trunc_norm`` (official
        default, std 0.02) or ``xavier`` (uniform; the official code's other option).
      attention_impl: ``explicit``, ``xla`` or ``cudnn`` (see
        `dot_product_attention`).
      depthwise_impl: ``conv`` (grouped convolution) or ``shift`` (shifted
        slices; faster on CPU). Same parameters and results.
      remat: Rematerialise each block in the backward pass (saves memory).
      scan_blocks: Run each stage's blocks as one ``lax.scan`` (`Stage._scan_blocks`): the same parameters and
        names, a program compiled once per stage instead of once per block (GPU/TPU compile time).
      head_init_std: Std of the truncated-normal head init (official 0.02); 0
        gives a zero head, common for fine-tuning.
      dtype: Compute dtype (e.g. ``jnp.bfloat16``); LayerNorm/BatchNorm
        statistics and the attention softmax stay in float32.
      param_dtype: Parameter dtype.
    """

    spec: CvTSpec = CvTSpec()
    num_classes: int = 1000
    act: str = "quick_gelu"
    init_method: str = "trunc_norm"
    attention_impl: str = "explicit"
    depthwise_impl: str = "conv"
    remat: bool = False
    scan_blocks: bool = False
    head_init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False, return_features: bool = False):
        """Runs the model.

        Args:
          x: Images ``[B, H, W, in_chans]``.
          train: Training mode (dropout, stochastic depth, BatchNorm batch
            statistics; needs a ``dropout`` rng when any rate is non-zero and
            ``mutable=['batch_stats']``).
          return_features: Also return a dict of features: ``stage{i}`` token maps
            ``[B, h_i, w_i, C_i]``, ``cls_token`` (or None) and ``pre_logits``.

        Returns:
          Logits ``[B, num_classes]`` (pooled features ``[B, C]`` when
          ``num_classes == 0``), and the feature dict if ``return_features``.
        """
        if x.ndim != 4:
            raise ValueError(f"CvT expects images [batch, height, width, channels], got shape {x.shape}.")
        if x.shape[-1] != self.spec.in_chans:
            raise ValueError(
                f"CvT was built for {self.spec.in_chans}-channel images but got {x.shape[-1]} channels "
                f"(input shape {x.shape}). Set the spec's in_chans (model override `in_chans`) or "
                f"convert the images (e.g. grayscale to RGB)."
            )
        self.spec.token_grid(x.shape[1], x.shape[2])  # Raises a clear error when too small.
        x = x.astype(self.dtype)
        features: dict[str, Any] = {}
        cls_tok = None
        for i in range(self.spec.num_stages):
            x, cls_tok = Stage(
                self.spec,
                i,
                act=self.act,
                init_method=self.init_method,
                attention_impl=self.attention_impl,
                depthwise_impl=self.depthwise_impl,
                remat=self.remat,
                scan_blocks=self.scan_blocks,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"stage{i}",
            )(x, train)
            features[f"stage{i}"] = x
        norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")
        if self.spec.cls_token[-1]:
            pooled = norm(cls_tok)[:, 0]
        else:
            b, h, w, c = x.shape
            pooled = jnp.mean(norm(x.reshape(b, h * w, c)), axis=1)
        features["cls_token"] = cls_tok
        features["pre_logits"] = pooled
        if self.num_classes > 0:
            init = (
                dense_init
                if self.head_init_std == 0.02
                else (nn.initializers.truncated_normal(self.head_init_std) if self.head_init_std > 0 else zeros_init)
            )
            out = nn.Dense(
                self.num_classes,
                kernel_init=init,
                bias_init=zeros_init,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="head",
            )(pooled)
        else:
            out = pooled
        return (out, features) if return_features else out
