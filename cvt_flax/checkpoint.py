"""Model-only checkpoints: the variables of a CvT plus a description of the model.

A model checkpoint is a directory::

    DIR/model.json    # format, variant, full CvTSpec, num_classes, act, source, ...
    DIR/variables/    # Orbax checkpoint of {'params', 'batch_stats'}

It is what ``python -m cvt_flax.convert`` writes and what fine-tuning can start
from. Restoring needs no model (the variables come back as a raw numpy
pytree); `model_from_info` then builds the matching module::

    variables, info = load_model("/tmp/cvt13")
    model = model_from_info(info)
    logits = model.apply(variables, images)
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "cvt-flax-model"
FORMAT_VERSION = 1
INFO_FILE = "model.json"
VARIABLES_DIR = "variables"
COLLECTIONS = ("params", "batch_stats")
_HOW_TO_MAKE = (
    "Make one with `python -m cvt_flax.convert --input CHECKPOINT.pth --output DIR` (official microsoft/CvT or "
    "HuggingFace weights) or `cvt_flax.checkpoint.save_model(DIR, variables, info)`."
)


def _to_numpy_tree(tree: Any) -> Any:
    """Nested mappings (dict/FrozenDict) of arrays -> plain dicts of numpy arrays."""
    if isinstance(tree, Mapping):
        return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


def _json_ready(info: Mapping[str, Any]) -> dict[str, Any]:
    from cvt_flax.models.spec import CvTSpec

    out = dict(info)
    if isinstance(out.get("spec"), CvTSpec):
        out["spec"] = out["spec"].to_dict()
    return out


def save_model(
    directory: str | os.PathLike,
    variables: Mapping[str, Any],
    model_info: Mapping[str, Any],
    *,
    overwrite: bool = True,
) -> pathlib.Path:
    """Writes a model checkpoint (Orbax variables + ``model.json``).

    Args:
      directory: Output directory (created; parents too).
      variables: ``{'params': ..., 'batch_stats': ...}`` (jax or numpy arrays;
        other collections are ignored; ``batch_stats`` may be absent).
      model_info: Description of the model; must hold ``spec`` (a `CvTSpec` or
        its ``to_dict()``) and ``num_classes``; usually also ``variant``, ``act``
        and ``source_file``. ``format``/``format_version`` are added.
      overwrite: Replace an existing checkpoint in ``directory``; if False, an
        existing one raises.

    Returns:
      The checkpoint directory.

    Raises:
      ValueError: when ``params`` or the spec/num_classes are missing.
      FileExistsError: when a checkpoint exists and ``overwrite`` is False.
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    if "params" not in variables:
        raise ValueError(f"save_model needs variables with a 'params' collection; got {sorted(variables)}.")
    info = _json_ready(model_info)
    missing = [k for k in ("spec", "num_classes") if k not in info]
    if missing:
        raise ValueError(
            f"model_info lacks {missing}; give at least the CvTSpec ('spec', spec.to_dict()) and 'num_classes' "
            "so that the model can be rebuilt."
        )
    info.setdefault("act", "quick_gelu")
    info.update(format=FORMAT, format_version=FORMAT_VERSION)
    target = directory / VARIABLES_DIR
    if target.exists() and not overwrite:
        raise FileExistsError(f"{directory} already holds a model checkpoint; pass overwrite=True to replace it.")
    directory.mkdir(parents=True, exist_ok=True)
    tree = {c: _to_numpy_tree(variables.get(c, {})) for c in COLLECTIONS}
    # Orbax writes into a temporary directory and renames it when complete.
    ocp.PyTreeCheckpointer().save(target, tree, force=True)
    # model.json is written last (atomically), so its presence marks a complete checkpoint.
    fd, tmp = tempfile.mkstemp(prefix=".model.json.", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, directory / INFO_FILE)
    return directory


def read_model_info(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads ``model.json`` of a model checkpoint.

    Raises:
      FileNotFoundError: when ``directory`` is missing or is not a cvt-flax model
        checkpoint (says what was expected and how to make one).
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"No cvt-flax model checkpoint at {directory}: the directory does not exist. {_HOW_TO_MAKE}"
        )
    info_file = directory / INFO_FILE
    if not info_file.is_file():
        hint = ""
        if any(p.suffix in (".pth", ".bin", ".safetensors", ".pt") for p in directory.iterdir()):
            hint = " It holds PyTorch weights: convert them first."
        elif any(p.name.isdigit() or p.name.startswith("checkpoint") for p in directory.iterdir()):
            hint = " It looks like a training checkpoint directory, which the training code restores itself."
        raise FileNotFoundError(
            f"{directory} is not a cvt-flax model checkpoint: expected {INFO_FILE} and {VARIABLES_DIR}/ "
            f"(an Orbax checkpoint of params and batch_stats).{hint} {_HOW_TO_MAKE}"
        )
    info = json.loads(info_file.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(
            f"{info_file} is not a cvt-flax model description (format {info.get('format')!r}). {_HOW_TO_MAKE}"
        )
    if info.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(
            f"{info_file} has format_version {info['format_version']}, newer than this cvt-flax understands "
            f"({FORMAT_VERSION}); update cvt-flax."
        )
    return info


def load_model(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores a model checkpoint written by `save_model` (no model needed).

    Args:
      directory: The checkpoint directory.

    Returns:
      ``(variables, info)``: ``{'params', 'batch_stats'}`` as nested dicts of
      numpy arrays, and the ``model.json`` dict.

    Raises:
      FileNotFoundError: for a missing directory or one that is not a cvt-flax
        model checkpoint, naming what was expected and how to make one.
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    info = read_model_info(directory)
    target = directory / VARIABLES_DIR
    if not target.is_dir():
        raise FileNotFoundError(
            f"{directory} has {INFO_FILE} but no {VARIABLES_DIR}/ (an incomplete or damaged checkpoint). {_HOW_TO_MAKE}"
        )
    restored = ocp.PyTreeCheckpointer().restore(target)
    variables = {c: _to_numpy_tree(restored.get(c, {}) or {}) for c in COLLECTIONS}
    return variables, info


def model_from_info(info: Mapping[str, Any], **kwargs: Any) -> Any:
    """Builds the `cvt_flax.models.CvT` described by a ``model.json`` dict.

    Args:
      info: The dict from `load_model` / `read_model_info` (``spec``,
        ``num_classes``, ``act``).
      **kwargs: Passed to `cvt_flax.models.create_model`, overriding the stored
        values (e.g. ``dtype='bfloat16'``, ``attention_impl='xla'``,
        ``drop_path_rate=(0, 0, 0.2)``; ``num_classes``/``act`` too).

    Returns:
      The (uninitialised) Flax module.
    """
    from cvt_flax.models import CvTSpec, create_model

    spec = info["spec"]
    spec = spec if isinstance(spec, CvTSpec) else CvTSpec.from_dict(spec)
    kwargs.setdefault("num_classes", int(info["num_classes"]))
    kwargs.setdefault("act", info.get("act", "quick_gelu"))
    return create_model(spec, **kwargs)


def load_pretrained(directory: str | os.PathLike, **kwargs: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """`load_model` plus `model_from_info`: returns ``(model, variables, info)``."""
    variables, info = load_model(directory)
    return model_from_info(info, **kwargs), variables, info
