"""cvt-flax: CvT (Convolutional vision Transformers) in JAX/Flax."""

__version__ = "0.1.0"
