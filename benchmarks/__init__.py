"""Benchmarks of cvt-flax: JAX train/inference throughput, the PyTorch reference, input pipelines.

Run them as modules from the repository root, e.g. ``python -m benchmarks.throughput --help``;
see benchmarks/README.md.
"""
