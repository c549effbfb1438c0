"""CvT models: the Flax modules, their spec and the registry of named variants."""

from cvt_flax.models.cvt import (
    ConvAttention,
    ConvEmbed,
    ConvProjection,
    CvT,
    avg_pool_ceil,
    depthwise_conv_shift,
    get_activation,
    quick_gelu,
)
from cvt_flax.models.registry import (
    Variant,
    as_dtype,
    create_model,
    get_spec,
    get_variant,
    list_models,
)
from cvt_flax.models.spec import CvTSpec

__all__ = [
    "ConvAttention",
    "ConvEmbed",
    "ConvProjection",
    "CvT",
    "CvTSpec",
    "Variant",
    "as_dtype",
    "avg_pool_ceil",
    "depthwise_conv_shift",
    "create_model",
    "get_activation",
    "get_spec",
    "get_variant",
    "list_models",
    "quick_gelu",
]
