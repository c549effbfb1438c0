"""Where this project's prepared offline copies of TFDS datasets live.

Beside the repository checkout, in ``../shared/``, the project keeps read-only
copies of TFDS datasets that were prepared in advance, so that runs and tests
work without network access:

* ``../shared/tfds``: TFRecord files, read by the ``tfdata`` input pipeline;
* ``../shared/tfds_array_record``: ArrayRecord files, read by the ``device``
  input pipeline (``tfds.data_source``).

Both are ordinary TFDS data dirs (``<dir>/<dataset>/<config>/<version>/``).
``configs/fashion_mnist.py`` and ``configs/smoke.py`` (``:dataset=fashion_mnist``)
point ``config.data_dir`` there and turn TFDS downloads off when the copy exists;
without it they fall back to TFDS's default data dir, downloading.
"""

from __future__ import annotations

import pathlib

# The folder beside the repository that holds the prepared copies.
SHARED_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
# Sub-folder of SHARED_DIR for each input pipeline (``config.input.pipeline``).
TFDS_DIRS = {"tfdata": "tfds", "device": "tfds_array_record"}


def tfds_data_dir(pipeline: str = "tfdata") -> str | None:
    """The prepared TFDS data dir for an input pipeline, if this checkout has one.

    Args:
      pipeline: ``config.input.pipeline``: ``'tfdata'`` (TFRecord) or ``'device'`` (ArrayRecord).

    Returns:
      The absolute path of ``../shared/tfds`` or ``../shared/tfds_array_record``
      when it exists, else None (TFDS's default data dir).

    Raises:
      ValueError: for an unknown pipeline.
    """
    if pipeline not in TFDS_DIRS:
        raise ValueError(f"Unknown input pipeline {pipeline!r}; one of {list(TFDS_DIRS)}.")
    path = SHARED_DIR / TFDS_DIRS[pipeline]
    return str(path) if path.exists() else None
