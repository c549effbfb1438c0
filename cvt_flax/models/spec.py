"""Architecture specification of a CvT model.

`CvTSpec` holds every field of the official microsoft/CvT ``MODEL.SPEC`` (the
``experiments/imagenet/cvt/*.yaml`` files), one value per stage. It is a frozen
dataclass so that it can be a field of a Flax module and a key of a cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

PROJECTION_METHODS = ("dw_bn", "avg", "linear")
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")

# Official yaml key -> CvTSpec field.
YAML_KEYS = {
    "PATCH_SIZE": "patch_size",
    "PATCH_STRIDE": "patch_stride",
    "PATCH_PADDING": "patch_padding",
    "DIM_EMBED": "dim_embed",
    "NUM_HEADS": "num_heads",
    "DEPTH": "depth",
    "MLP_RATIO": "mlp_ratio",
    "DROP_RATE": "drop_rate",
    "ATTN_DROP_RATE": "attn_drop_rate",
    "DROP_PATH_RATE": "drop_path_rate",
    "QKV_BIAS": "qkv_bias",
    "CLS_TOKEN": "cls_token",
    "QKV_PROJ_METHOD": "qkv_proj_method",
    "KERNEL_QKV": "kernel_qkv",
    "PADDING_Q": "padding_q",
    "PADDING_KV": "padding_kv",
    "STRIDE_Q": "stride_q",
    "STRIDE_KV": "stride_kv",
}


def conv_out_size(n: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution (floor mode, symmetric zero padding) over an input of length ``n``."""
    return (n + 2 * padding - kernel) // stride + 1


@dataclasses.dataclass(frozen=True)
class CvTSpec:
    """Per-stage architecture of a CvT (all tuples have one entry per stage).

    Attributes:
      patch_size: Kernel size of each stage's convolutional token embedding.
      patch_stride: Stride of each stage's token embedding.
      patch_padding: Zero padding of each stage's token embedding.
      dim_embed: Embedding (channel) width of each stage.
      num_heads: Attention heads of each stage.
      depth: Transformer blocks of each stage.
      mlp_ratio: MLP hidden width as a multiple of ``dim_embed``.
      drop_rate: Dropout after the embedding, in the MLP and after the attention
        output projection.
      attn_drop_rate: Dropout on the attention probabilities.
      drop_path_rate: Largest stochastic-depth rate of each stage; the blocks of a
        stage get rates ``linspace(0, drop_path_rate, depth)`` (the official rule).
      qkv_bias: Whether the query/key/value linear projections have a bias.
      cls_token: Whether the stage prepends a class token (last stage only in the
        paper).
      qkv_proj_method: ``dw_bn`` (depthwise conv + BatchNorm), ``avg`` (average
        pooling, ceil mode; the query then uses ``linear``) or ``linear``.
      kernel_qkv: Kernel size of the convolutional projection.
      padding_q: Padding of the query projection.
      padding_kv: Padding of the key/value projections.
      stride_q: Stride of the query projection.
      stride_kv: Stride of the key/value projections (the paper's squeezed
        key/value).
      in_chans: Channels of the input image.
    """

    patch_size: tuple[int, ...] = (7, 3, 3)
    patch_stride: tuple[int, ...] = (4, 2, 2)
    patch_padding: tuple[int, ...] = (2, 1, 1)
    dim_embed: tuple[int, ...] = (64, 192, 384)
    num_heads: tuple[int, ...] = (1, 3, 6)
    depth: tuple[int, ...] = (1, 2, 10)
    mlp_ratio: tuple[float, ...] = (4.0, 4.0, 4.0)
    drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)
    attn_drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)
    drop_path_rate: tuple[float, ...] = (0.0, 0.0, 0.1)
    qkv_bias: tuple[bool, ...] = (True, True, True)
    cls_token: tuple[bool, ...] = (False, False, True)
    qkv_proj_method: tuple[str, ...] = ("dw_bn", "dw_bn", "dw_bn")
    kernel_qkv: tuple[int, ...] = (3, 3, 3)
    padding_q: tuple[int, ...] = (1, 1, 1)
    padding_kv: tuple[int, ...] = (1, 1, 1)
    stride_q: tuple[int, ...] = (1, 1, 1)
    stride_kv: tuple[int, ...] = (2, 2, 2)
    in_chans: int = 3

    def __post_init__(self):
        n = len(self.depth)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "in_chans":
                continue
            if isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, field.name, value)
            if not isinstance(value, tuple) or len(value) != n:
                raise ValueError(
                    f"CvTSpec.{field.name} must be a tuple with one entry per stage "
                    f"({n} stages, from `depth`), got {value!r}."
                )
        for i, (dim, heads) in enumerate(zip(self.dim_embed, self.num_heads, strict=True)):
            if dim % heads:
                raise ValueError(f"Stage {i}: dim_embed={dim} is not divisible by num_heads={heads}.")
        for i, method in enumerate(self.qkv_proj_method):
            if method not in PROJECTION_METHODS:
                raise ValueError(f"Stage {i}: unknown qkv_proj_method {method!r}; choose one of {PROJECTION_METHODS}.")

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.depth)

    @property
    def num_features(self) -> int:
        """Width of the pooled features fed to the classifier head."""
        return self.dim_embed[-1]

    def replace(self, **changes: Any) -> CvTSpec:
        """Returns a copy with some fields replaced (lists become tuples)."""
        changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(
                f"Unknown CvTSpec field(s) {sorted(unknown)}; valid fields: "
                f"{[f.name for f in dataclasses.fields(self)]}."
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict (JSON serialisable)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CvTSpec:
        """Inverse of `to_dict`."""
        return cls(**{k: tuple(v) if isinstance(v, list | tuple) else v for k, v in d.items()})

    @classmethod
    def from_official_yaml(cls, spec: dict[str, Any], in_chans: int = 3) -> CvTSpec:
        """Builds a spec from the ``MODEL.SPEC`` mapping of an official yaml file.

        Args:
          spec: The ``MODEL.SPEC`` mapping (keys such as ``DIM_EMBED``).
          in_chans: Channels of the input image.

        Returns:
          The equivalent `CvTSpec`.
        """
        kwargs = {field: tuple(spec[key]) for key, field in YAML_KEYS.items() if key in spec}
        return cls(in_chans=in_chans, **kwargs)

    def min_input_size(self) -> int:
        """Smallest input side length that leaves at least one token in every stage."""
        size = 1
        for k, s, p in reversed(list(zip(self.patch_size, self.patch_stride, self.patch_padding, strict=True))):
            # out = floor((in + 2p - k) / s) + 1 >= size  <=>  in >= (size - 1) * s + k - 2p
            size = max(1, (size - 1) * s + k - 2 * p)
        return size

    def token_grid(self, height: int, width: int) -> list[tuple[int, int]]:
        """Token grid (h, w) of each stage for an input of ``height x width``.

        Raises:
          ValueError: if the input is too small for the strides of the model.
        """
        grids = []
        h, w = height, width
        for i, (k, s, p) in enumerate(zip(self.patch_size, self.patch_stride, self.patch_padding, strict=True)):
            h_out, w_out = conv_out_size(h, k, s, p), conv_out_size(w, k, s, p)
            if h_out < 1 or w_out < 1:
                raise ValueError(
                    f"Input of {height}x{width} is too small for this CvT: stage {i}'s token "
                    f"embedding (kernel {k}, stride {s}, padding {p}) gets a {h}x{w} map and "
                    f"would produce {h_out}x{w_out} tokens. Use inputs of at least "
                    f"{self.min_input_size()}x{self.min_input_size()} pixels, or a "
                    f"low-resolution variant (e.g. 'cvt_13_32')."
                )
            grids.append((h_out, w_out))
            h, w = h_out, w_out
        return grids
