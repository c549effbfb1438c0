"""cvt-flax: CvT (Convolutional vision Transformers) in JAX/Flax.

    import cvt_flax
    model, variables, info = cvt_flax.from_pretrained("microsoft/cvt-13")

Importing the package is cheap (no jax, no flax): `from_pretrained` loads its module on first use, so that
`cvt_flax.serving` can run exported models without flax.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["from_pretrained"]


def __getattr__(name: str) -> Any:
    if name == "from_pretrained":
        from cvt_flax.pretrained import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'cvt_flax' has no attribute {name!r}")
