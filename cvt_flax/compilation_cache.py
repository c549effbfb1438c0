"""JAX's persistent compilation cache for training runs: a repeated or resumed run does not compile again.

XLA programs compiled by a run (initialisation, train and eval steps) are stored on disk keyed by the program,
the compiler version and its options; a later run of the same config on the same kind of device loads them
instead of compiling (on this project's 2-core CPU a repeated Fashion-MNIST run compiles its train step in 6.3-6.6 s
against 31.1 s and reaches its first step in 53-55% of the first run's time, the rest being set-up and tracing:
docs/compile_only.md, measured with ``bash benchmarks/ttfs.sh``). ``--config.compilation_cache_dir``:

* ``auto`` (default): ``$JAX_COMPILATION_CACHE_DIR`` when set, else ``<cvt-flax cache>/jax`` (``$CVT_FLAX_CACHE``
  or ``~/.cache/cvt_flax``; `cvt_flax.paths.cache_root`);
* a folder or ``gs://`` URL: there (e.g. a bucket shared by the hosts of a pod);
* ``''`` or ``off``: no cache.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from cvt_flax import paths

OFF = ("", "off", "none", "false")
# Cache every program that takes this long to compile (JAX's default, 1 s, leaves out the small ones that add up).
MIN_COMPILE_TIME_S = 0.1


def resolve(value: str) -> str | None:
    """The cache folder for the config value ``value`` (None: off)."""
    text = str(value or "").strip()
    if text.lower() in OFF:
        return None
    if text == "auto":
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.fspath(paths.cache_root() / "jax")
    return os.fspath(paths.as_path(text))


def setup(value: str) -> str | None:
    """Turns the persistent cache on at `resolve`'s folder (or off); returns the folder.

    Call before the run compiles anything: JAX opens its cache once per process, at the first compilation.
    """
    folder = resolve(value)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        logging.info("Persistent compilation cache: off (--config.compilation_cache_dir='').")
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        min(float(jax.config.jax_persistent_cache_min_compile_time_secs), MIN_COMPILE_TIME_S),
    )
    logging.info("Persistent compilation cache: %s (--config.compilation_cache_dir='' turns it off).", folder)
    return folder
