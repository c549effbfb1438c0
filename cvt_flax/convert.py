"""Convert PyTorch CvT checkpoints to cvt-flax variables.

Two source formats are understood:

* ``official``: microsoft/CvT ``.pth`` files (keys such as
  ``stage2.blocks.0.attn.conv_proj_q.bn.running_mean``), possibly wrapped in
  ``{'state_dict': ...}`` / ``{'model': ...}`` and prefixed with ``module.``.
* ``hf``: HuggingFace ``CvtForImageClassification`` checkpoints
  (``model.safetensors`` / ``pytorch_model.bin``, or a directory holding them and
  ``config.json``).

The converter renames HuggingFace keys to the official names, infers the
architecture (a registered variant whose shapes all match, the HuggingFace
``config.json``, or ``--model``/``--num-heads``), checks every key and shape
against the Flax model, transposes the weights and writes a model checkpoint
(see `cvt_flax.checkpoint`)::

    python -m cvt_flax.convert --input CvT-13-224x224-IN-1k.pth --output /tmp/cvt13
    python -m cvt_flax.convert --input ./cvt-13 --output /tmp/cvt13_hf   # HF directory
    python -m cvt_flax.convert --input microsoft/cvt-13 --output /tmp/cvt13_hub   # HF hub id (cvt_flax.pretrained)
    python -m cvt_flax.convert --input gs://bucket/CvT-13-224x224-IN-1k.pth --output gs://bucket/models/cvt13

Inputs and outputs may be local or on Cloud Storage (``gs://``, see `cvt_flax.paths`).

The model directory also records the class names and the preprocessing the checkpoint expects
(`cvt_flax.metadata`).

The default activation follows the source: ``quick_gelu`` for official
checkpoints (the official model's MLP activation) and ``gelu`` for HuggingFace
ones (the HF port computes exact GELU); ``--act`` overrides it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from cvt_flax import errors, metadata, paths
from cvt_flax.models.spec import ACTIVATIONS, CvTSpec
from cvt_flax.models.weights import (
    detect_source,
    expected_shapes,
    hf_key_to_official,
    model_layout,
    official_key_to_hf,
    spec_from_hf_config,
    to_flax,
)

SOURCES = ("official", "hf")
DEFAULT_ACT = {"official": "quick_gelu", "hf": "gelu"}
TORCH_HINT = (
    "Reading .pth/.bin checkpoints needs PyTorch: `pip install torch` (the CPU wheel is enough and much smaller: "
    "`pip install torch --index-url https://download.pytorch.org/whl/cpu`). `.safetensors` files need only the "
    "`safetensors` package."
)
_MAX_LISTED = 25

# ---------------------------------------------------------------------------
# Architecture inference.
# ---------------------------------------------------------------------------

# Fields that only change dropout, not the function computed in eval mode.
_TRAINING_FIELDS = ("drop_rate", "attn_drop_rate", "drop_path_rate")


def _architecture(spec: CvTSpec) -> dict[str, Any]:
    d = spec.to_dict()
    for f in _TRAINING_FIELDS:
        d.pop(f)
    return d


def _registered_name(spec: CvTSpec) -> str | None:
    """The registered variant with the same architecture as ``spec`` (ignoring dropout rates and in_chans)."""
    from cvt_flax.models import get_variant, list_models

    target = _architecture(spec.replace(in_chans=3))
    for name in list_models():
        if _architecture(get_variant(name).spec) == target:
            return name
    return None


def infer_structure(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Reads what the weights reveal about the architecture (official key names).

    Returns:
      A dict with ``dim_embed``, ``depth``, ``patch_size``, ``in_chans``,
      ``cls_token``, ``qkv_bias``, ``qkv_proj_method`` (None where the weights
      cannot tell ``avg`` from ``linear``), ``kernel_qkv``, ``mlp_ratio`` and
      ``num_classes``.

    Raises:
      ValueError: when a stage lacks its token-embedding weight.
    """
    stages = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"^stage(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise ValueError(
            f"Expected stages stage0..stageN in the checkpoint, found stages {stages}. Is this a CvT checkpoint?"
        )
    s: dict[str, list] = {k: [] for k in ("dim_embed", "depth", "patch_size", "cls_token", "qkv_bias")}
    s.update(qkv_proj_method=[], kernel_qkv=[], mlp_ratio=[])
    in_chans = None
    for i in stages:
        key = f"stage{i}.patch_embed.proj.weight"
        if key not in shapes or len(shapes[key]) != 4:
            raise ValueError(f"Missing or malformed `{key}` (the stage's token-embedding conv); cannot read stage {i}.")
        dim, cin, kh, _ = shapes[key]
        in_chans = cin if i == 0 else in_chans
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(rf"^stage{i}\.blocks\.(\d+)\.", k))}
        depth = max(blocks) + 1 if blocks else 0
        s["dim_embed"].append(dim)
        s["patch_size"].append(kh)
        s["depth"].append(depth)
        s["cls_token"].append(f"stage{i}.cls_token" in shapes)
        b = f"stage{i}.blocks.0."
        s["qkv_bias"].append(f"{b}attn.proj_q.bias" in shapes if depth else True)
        if f"{b}attn.conv_proj_q.conv.weight" in shapes:
            s["qkv_proj_method"].append("dw_bn")
            s["kernel_qkv"].append(shapes[f"{b}attn.conv_proj_q.conv.weight"][-1])
        else:
            s["qkv_proj_method"].append(None if depth else "dw_bn")
            s["kernel_qkv"].append(3)
        fc1 = shapes.get(f"{b}mlp.fc1.weight")
        ratio = fc1[0] / dim if fc1 else 4.0
        if fc1 and int(dim * ratio) != fc1[0]:  # The model uses int(dim * mlp_ratio): guard against rounding.
            ratio = (fc1[0] + 0.5) / dim
        s["mlp_ratio"].append(ratio)
    head = shapes.get("head.weight")
    return {**{k: tuple(v) for k, v in s.items()}, "in_chans": in_chans, "num_classes": head[0] if head else 0}


def _spec_from_structure(struct: Mapping[str, Any], num_heads: Sequence[int]) -> tuple[CvTSpec, list[str]]:
    """A spec from inferred shapes; fields the weights do not show take the official CvT defaults."""
    n = len(struct["depth"])
    if len(num_heads) != n:
        raise ValueError(f"--num-heads needs {n} values (one per stage), got {list(num_heads)}.")
    if None in struct["qkv_proj_method"]:
        raise ValueError(
            "The checkpoint has no convolutional q/k/v projection weights in some stage, so the projection "
            "method ('avg' or 'linear') cannot be inferred. Pass --model NAME or a spec JSON file (--model spec.json)."
        )
    default = CvTSpec()
    official = {7: (4, 2), 3: (2, 1)}  # patch size -> (stride, padding) in the official yaml files
    stride = tuple(official.get(p, (max(1, p // 2), p // 2))[0] for p in struct["patch_size"])
    padding = tuple(official.get(p, (max(1, p // 2), p // 2))[1] for p in struct["patch_size"])

    def per_stage(field: str) -> tuple:
        values = getattr(default, field)
        return tuple(values[min(i, len(values) - 1)] for i in range(n))

    spec = CvTSpec(
        patch_size=struct["patch_size"],
        patch_stride=stride,
        patch_padding=padding,
        dim_embed=struct["dim_embed"],
        num_heads=tuple(num_heads),
        depth=struct["depth"],
        mlp_ratio=struct["mlp_ratio"],
        drop_rate=(0.0,) * n,
        attn_drop_rate=(0.0,) * n,
        drop_path_rate=per_stage("drop_path_rate"),
        qkv_bias=struct["qkv_bias"],
        cls_token=struct["cls_token"],
        qkv_proj_method=struct["qkv_proj_method"],
        kernel_qkv=struct["kernel_qkv"],
        padding_q=tuple(k // 2 for k in struct["kernel_qkv"]),
        padding_kv=tuple(k // 2 for k in struct["kernel_qkv"]),
        stride_q=(1,) * n,
        stride_kv=(2,) * n,
        in_chans=struct["in_chans"],
    )
    assumed = ["patch_stride", "patch_padding", "padding_q", "padding_kv", "stride_q", "stride_kv", "drop_path_rate"]
    return spec, assumed


def _match_registry(shapes: Mapping[str, tuple[int, ...]], struct: Mapping[str, Any]) -> list[str]:
    """Registered variants whose every parameter shape equals the checkpoint's."""
    from cvt_flax.models import get_variant, list_models

    matches = []
    for name in list_models():
        spec = get_variant(name).spec
        if (spec.dim_embed, spec.depth, spec.patch_size) != (
            struct["dim_embed"],
            struct["depth"],
            struct["patch_size"],
        ):
            continue
        spec = spec.replace(in_chans=struct["in_chans"])
        if expected_shapes(spec, struct["num_classes"]) == dict(shapes):
            matches.append(name)
    return matches


def _closest_variant(shapes: Mapping[str, tuple[int, ...]], struct: Mapping[str, Any], display: Any) -> tuple[str, str]:
    """The registered variant most like the checkpoint, and how they differ (named keys for a near miss)."""
    from cvt_flax.models import get_variant, list_models

    fields = ("dim_embed", "depth", "patch_size", "mlp_ratio", "cls_token", "qkv_bias", "kernel_qkv")

    def distance(name: str) -> int:
        spec = get_variant(name).spec
        return sum(a != b for f in fields for a, b in zip(getattr(spec, f), struct[f], strict=False)) + 10 * abs(
            spec.num_stages - len(struct["depth"])
        )

    name = min(list_models(), key=distance)
    spec = get_variant(name).spec.replace(in_chans=struct["in_chans"])
    expected = expected_shapes(spec, struct["num_classes"])
    n_diff = len(set(expected) ^ set(shapes)) + sum(expected[k] != shapes[k] for k in set(expected) & set(shapes))
    if n_diff > 10:  # Not a near miss: the details would be noise.
        return name, f"{n_diff} keys are missing, unexpected or of another shape"
    return name, _difference(expected, shapes, display, limit=5)


# ---------------------------------------------------------------------------
# Validation and conversion.
# ---------------------------------------------------------------------------


def _listing(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(f"`{i}`" for i in items[:limit])
    return shown + (f" … and {len(items) - limit} more" if len(items) > limit else "")


def _difference(
    expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], name: Any, limit: int = _MAX_LISTED
) -> str:
    """Human-readable missing / unexpected / shape-mismatched keys (``name`` maps official -> source names)."""
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected)
    mismatched = sorted(k for k in expected if k in got and tuple(got[k]) != tuple(expected[k]))
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): {_listing([name(k) for k in missing], limit)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {_listing([name(k) for k in unexpected], limit)}")
    if mismatched:
        shown = [f"`{name(k)}`: checkpoint {tuple(got[k])} vs model {tuple(expected[k])}" for k in mismatched[:limit]]
        more = f" … and {len(mismatched) - limit} more" if len(mismatched) > limit else ""
        lines.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(shown) + more)
    return "\n  ".join(lines)


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor
        t = value.detach().cpu()
        if not t.is_floating_point() or t.dtype.itemsize >= 4:
            return t.numpy()
        return t.float().numpy()  # bfloat16 / float16 have no exact numpy twin
    return np.asarray(value)


def _resolve_spec(
    model: str | CvTSpec | None,
    shapes: Mapping[str, tuple[int, ...]],
    struct: Mapping[str, Any],
    hf_config: Mapping[str, Any] | None,
    num_heads: Sequence[int] | None,
    display: Any,
) -> tuple[CvTSpec, str | None, str, list[str]]:
    """Chooses the architecture: (spec, variant name, how it was chosen, assumed fields)."""
    from cvt_flax.models import get_spec, list_models

    if isinstance(model, CvTSpec):
        spec, how = model, "given spec"
    elif model:
        spec, how = get_spec(model).replace(in_chans=struct["in_chans"]), f"--model {model}"
    elif hf_config is not None:
        spec, how = spec_from_hf_config(hf_config), "HuggingFace config.json"
    else:
        matches = _match_registry(shapes, struct)
        if len(matches) > 1:
            raise ValueError(
                f"The checkpoint's shapes match several registered variants ({', '.join(matches)}), which differ "
                "only in strides/paddings that weights do not reveal. Choose one with --model NAME."
            )
        if matches:
            spec, how = get_spec(matches[0]).replace(in_chans=struct["in_chans"]), "matching shapes"
        elif num_heads:
            spec, assumed = _spec_from_structure(struct, num_heads)
            return spec, _registered_name(spec), "shapes and --num-heads", assumed
        else:
            closest, diff = _closest_variant(shapes, struct, display)
            summary = ", ".join(
                f"{k}={list(struct[k])}" for k in ("dim_embed", "depth", "patch_size", "mlp_ratio", "cls_token")
            )
            raise ValueError(
                "The checkpoint's shapes match no registered CvT variant "
                f"({', '.join(list_models())}); inferred from the weights: {summary}. Attention heads cannot be "
                "inferred from weights: pass --model NAME (Python: model=...) for a registered variant, or "
                "--num-heads H0,H1,... (Python: num_heads=...) to build the architecture from the shapes, or convert "
                f"a HuggingFace directory whose config.json has num_heads. Closest variant {closest!r} differs in:\n  "
                + diff
            )
    if num_heads:
        spec = spec.replace(num_heads=tuple(num_heads))
    return spec, _registered_name(spec), how, []


def convert_state_dict(
    state_dict: Mapping[str, Any],
    source: str | None = None,
    model: str | CvTSpec | None = None,
    *,
    num_classes: int | None = None,
    num_heads: Sequence[int] | None = None,
    hf_config: Mapping[str, Any] | None = None,
    act: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts a PyTorch CvT state dict into cvt-flax variables.

    Args:
      state_dict: Parameter name -> array (numpy arrays or torch tensors), in the
        official microsoft/CvT or HuggingFace naming. ``num_batches_tracked``
        entries are dropped.
      source: ``official``, ``hf`` or None (detect from the key names).
      model: A registered variant name or a `CvTSpec` to force; None infers it
        (HuggingFace ``hf_config`` if given, else the registered variant whose
        shapes all match, else the shapes plus ``num_heads``).
      num_classes: Classes of the converted head; None keeps the checkpoint's
        (0 when it has none); 0 drops the head. Other values are refused.
      num_heads: Heads per stage (overrides the inferred/forced spec's).
      hf_config: A HuggingFace ``config.json`` dict (architecture and labels).
      act: MLP activation; None: ``quick_gelu`` for official checkpoints,
        ``gelu`` for HuggingFace ones.

    Returns:
      ``(variables, info)``: ``{'params', 'batch_stats'}`` numpy float32 trees
      for `cvt_flax.models.CvT`, and the model info for
      `cvt_flax.checkpoint.save_model` (``variant``, ``spec``, ``num_classes``,
      ``act``, ``source_format``, ...).

    Raises:
      ValueError: for an unknown format, an architecture that cannot be
        inferred, or keys/shapes that do not match the model (all offending keys
        are named).
    """
    keys = list(state_dict)
    source = source or detect_source(keys)
    if source not in SOURCES:
        raise ValueError(f"Unknown checkpoint source {source!r}; choose one of {SOURCES} (or None to detect).")
    act = act or DEFAULT_ACT[source]
    if act not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {act!r}; choose one of {ACTIVATIONS}.")

    # Official names; `display` maps them back to the checkpoint's own names for messages.
    if source == "hf":
        renamed, display_map = {}, {}
        for k in keys:
            new = hf_key_to_official(k) or k
            renamed[new], display_map[new] = state_dict[k], k
        display = lambda k: display_map.get(k) or official_key_to_hf(k) or k  # noqa: E731
    else:
        renamed = dict(state_dict)
        display = lambda k: k  # noqa: E731
    arrays = {k: _as_numpy(v) for k, v in renamed.items() if not k.endswith("num_batches_tracked")}
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}

    struct = infer_structure(shapes)
    ckpt_classes = struct["num_classes"]
    if num_classes is not None and num_classes != ckpt_classes:
        if num_classes != 0:
            raise ValueError(
                f"The checkpoint's head has {ckpt_classes} classes (`{display('head.weight')}` "
                f"{shapes.get('head.weight')}) but num_classes={num_classes} was requested. Omit --num-classes to keep "
                "the head, or pass --num-classes 0 to drop it (fine-tuning then initialises a new head)."
            )
        for k in ("head.weight", "head.bias"):
            arrays.pop(k, None)
            shapes.pop(k, None)
        struct = {**struct, "num_classes": 0}
    spec, variant, how, assumed = _resolve_spec(model, shapes, struct, hf_config, num_heads, display)
    n_classes = struct["num_classes"]

    layout = model_layout(spec, n_classes)
    expected = {k: shape for k, (_, shape) in layout.items()}
    if expected != shapes:
        label = variant or "the inferred architecture"
        raise ValueError(
            f"The checkpoint does not match {label} (chosen by {how}; {n_classes} classes):\n  "
            + _difference(expected, shapes, display)
            + "\nChoose the right architecture with --model NAME / --num-heads, or check that the file is a "
            "complete CvT classification checkpoint."
        )

    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for key, (path, _) in layout.items():
        node = variables
        for p in path[:-1]:
            node = node.setdefault(p, {})
        value = arrays[key]
        value = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
        node[path[-1]] = to_flax(value, path[-1])

    info: dict[str, Any] = {
        "variant": variant,
        "spec": spec.to_dict(),
        "num_classes": n_classes,
        "act": act,
        "source_format": source,
        "architecture_from": how,
    }
    if assumed:
        info["assumed_fields"] = assumed
    if hf_config and n_classes and "id2label" in hf_config:
        id2label = {int(k): v for k, v in hf_config["id2label"].items()}
        if sorted(id2label) == list(range(n_classes)):
            info["labels"] = [id2label[i] for i in range(n_classes)]
    return variables, info


# ---------------------------------------------------------------------------
# Reading checkpoint files.
# ---------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "model_state", "module", "net")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(TORCH_HINT) from e
    return torch


def _unwrap(obj: Any, path: epath.Path) -> dict[str, Any]:
    """Finds the parameter dict in a loaded checkpoint object and strips ``module.`` prefixes."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got a {type(obj).__name__}).")
    state = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    if not state:
        raise ValueError(
            f"{path} holds no tensors (top-level keys: {_listing(sorted(map(str, obj)), 10)}). Expected a "
            "state dict, or one wrapped as {'state_dict': ...} or {'model': ...}."
        )
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
    from safetensors import numpy as st_numpy

    # safetensors maps local files; a Cloud Storage object is read into memory.
    data = paths.read_bytes(path) if paths.is_remote(path) else None
    try:
        return st_numpy.load(data) if data is not None else st_numpy.load_file(os.fspath(path))
    except (TypeError, ValueError):  # e.g. bfloat16, which numpy lacks
        torch = _import_torch()  # noqa: F841
        from safetensors import torch as st_torch

        tensors = st_torch.load(data) if data is not None else st_torch.load_file(os.fspath(path))
        return {k: _as_numpy(v) for k, v in tensors.items()}


def _weights_file(directory: epath.Path) -> list[epath.Path]:
    """The weight file(s) of a checkpoint directory (HuggingFace names first)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    files = sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if len(files) == 1:
        return files
    raise FileNotFoundError(
        f"{directory} holds {'no' if not files else 'several'} weight files"
        + (f" ({', '.join(p.name for p in files)})" if files else "")
        + ". Expected model.safetensors or pytorch_model.bin (HuggingFace) or a single .pth file; pass the file "
        "itself with --input."
    )


def load_torch_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads a PyTorch CvT checkpoint into ``{name: numpy array}``.

    Args:
      path: A ``.pth``/``.pt``/``.bin`` (torch.save) or ``.safetensors`` file, or a
        directory holding one (HuggingFace ``model.safetensors`` /
        ``pytorch_model.bin``, sharded safetensors, or a single weight file);
        local or ``gs://``.
        Wrappers ``{'state_dict': ...}``/``{'model': ...}`` and ``module.``
        prefixes are removed.
      trust_pickle: Load torch files with ``weights_only=False`` (runs arbitrary
        pickled code: only for files you trust that hold non-tensor objects).

    Returns:
      The state dict with numpy values (bfloat16/float16 become float32).

    Raises:
      FileNotFoundError: for a missing path or a directory without weights.
      ImportError: when a torch file is given and PyTorch is not installed.
    """
    path = paths.as_path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Pass a .pth/.bin/.safetensors file or a HuggingFace directory."
        )
    files = _weights_file(path) if path.is_dir() else [path]
    state: dict[str, np.ndarray] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(_unwrap(_load_safetensors(f), f))
            continue
        torch = _import_torch()
        try:
            source = io.BytesIO(paths.read_bytes(f)) if paths.is_remote(f) else os.fspath(f)
            obj = torch.load(source, map_location="cpu", weights_only=not trust_pickle)
        except Exception as e:  # pickle.UnpicklingError and friends
            if trust_pickle:
                raise
            raise ValueError(
                f"Could not load {f} in torch's safe weights-only mode ({type(e).__name__}: {str(e)[:300]}). If the "
                "file comes from a source you trust and holds extra Python objects, retry with --trust-pickle "
                "(Python: trust_pickle=True)."
            ) from e
        state.update({k: _as_numpy(v) for k, v in _unwrap(obj, f).items()})
    return state


def find_hf_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The HuggingFace ``config.json`` in a checkpoint directory or next to a weight file (None if absent)."""
    path = paths.as_path(path)
    candidate = (path if path.is_dir() else path.parent) / "config.json"
    if not candidate.is_file():
        return None
    config = json.loads(candidate.read_text())
    return config if config.get("model_type", "cvt") == "cvt" else None


def convert_checkpoint(
    path: str | os.PathLike,
    model: str | CvTSpec | None = None,
    *,
    source: str | None = None,
    num_classes: int | None = None,
    num_heads: Sequence[int] | None = None,
    act: str | None = None,
    hf_config: Mapping[str, Any] | str | os.PathLike | None = None,
    trust_pickle: bool = False,
    image_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads and converts a checkpoint file or directory (see `convert_state_dict`).

    ``hf_config`` may be a dict or a path to ``config.json``; by default a
    ``config.json`` beside the weights is used for HuggingFace checkpoints.
    The info also gets ``class_names``, ``image_size`` and ``preprocessing``
    (`cvt_flax.metadata.converted_metadata`; ``image_size`` forces the resolution).
    """
    path = paths.as_path(path)
    state = load_torch_checkpoint(path, trust_pickle=trust_pickle)
    source = source or detect_source(list(state))
    if isinstance(hf_config, str | os.PathLike):
        hf_config = json.loads(paths.as_path(hf_config).read_text())
    elif hf_config is None and source == "hf":
        hf_config = find_hf_config(path)
    variables, info = convert_state_dict(
        state, source, model, num_classes=num_classes, num_heads=num_heads, hf_config=hf_config, act=act
    )
    info["source_file"] = str(path if paths.is_remote(path) else path.resolve())
    info.update(metadata.converted_metadata(info, path, hf_config=hf_config, image_size=image_size))
    return variables, info


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def _parse_heads(text: str) -> tuple[int, ...]:
    try:
        heads = tuple(int(h) for h in text.replace(" ", "").split(",") if h)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"--num-heads takes comma-separated integers such as 1,3,6; got {text!r}."
        ) from e
    if not heads or min(heads) < 1:
        raise argparse.ArgumentTypeError(f"--num-heads takes positive integers such as 1,3,6; got {text!r}.")
    return heads


def _model_arg(text: str) -> str | CvTSpec:
    """A registered name, or a JSON file with a spec (a `CvTSpec.to_dict()` or a cvt-flax model.json)."""
    p = paths.as_path(text)
    if text.endswith(".json") and p.is_file():
        d = json.loads(p.read_text())
        return CvTSpec.from_dict(d.get("spec", d))
    from cvt_flax.models import get_variant

    try:
        get_variant(text)
    except ValueError as e:  # argparse would replace a ValueError's message with a generic one.
        raise argparse.ArgumentTypeError(f"{e} Or pass a spec JSON file (CvTSpec.to_dict() or a model.json).") from e
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m cvt_flax.convert`` argument parser."""
    from cvt_flax.models import list_models

    parser = argparse.ArgumentParser(
        prog="python -m cvt_flax.convert",
        description="Convert a PyTorch CvT checkpoint (official microsoft/CvT .pth or HuggingFace "
        "CvtForImageClassification) into a cvt-flax model checkpoint (Orbax + model.json).",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="A .pth/.bin/.safetensors file or a HuggingFace directory (local or gs://), or a hub id (org/name).",
    )
    parser.add_argument(
        "--output", required=True, help="Directory to write (model.json + variables/), local or gs://bucket/..."
    )
    parser.add_argument(
        "--model",
        type=_model_arg,
        default=None,
        help=f"Force a registered variant ({', '.join(list_models())}) or a spec JSON file; default: infer.",
    )
    parser.add_argument("--act", choices=ACTIVATIONS, default=None, help="MLP activation (default: by source).")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="Keep the head (default) or 0 to drop it (backbone only)."
    )
    parser.add_argument(
        "--num-heads", type=_parse_heads, default=None, help="Heads per stage, e.g. 1,3,6 (when not inferable)."
    )
    parser.add_argument("--source", choices=SOURCES, default=None, help="Checkpoint format (default: detect).")
    parser.add_argument("--hf-config", default=None, help="HuggingFace config.json (default: the one beside --input).")
    parser.add_argument("--trust-pickle", action="store_true", help="Allow torch.load(weights_only=False).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output checkpoint.")
    parser.add_argument(
        "--image-size", type=int, default=None, help="Input resolution (default: from the file name/config, else 224)."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from cvt_flax.checkpoint import save_model

    args = build_parser().parse_args(argv)
    try:
        output = paths.as_path(args.output)
    except errors.UserError as e:
        return errors.report(e)
    if output.exists() and not output.is_dir():
        return errors.report(
            errors.UserError(f"--output {output} is a file; give a directory for the converted model.")
        )
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        return errors.report(
            errors.UserError(f"{output} already exists and is not empty; pass --overwrite to replace it.")
        )
    from cvt_flax import pretrained

    kwargs = dict(
        model=args.model,
        source=args.source,
        num_classes=args.num_classes,
        num_heads=args.num_heads,
        act=args.act,
        hf_config=args.hf_config,
        trust_pickle=args.trust_pickle,
        image_size=args.image_size,
    )
    try:
        if not paths.as_path(args.input).exists() and pretrained.looks_like_hub_id(args.input):
            repo_id, revision = pretrained.split_revision(args.input)
            snapshot, commit = pretrained.hub_snapshot(repo_id, revision)
            variables, info = pretrained.convert_hub_snapshot(snapshot, repo_id, commit, revision, **kwargs)
        else:
            variables, info = convert_checkpoint(args.input, **kwargs)
    except Exception as e:  # noqa: BLE001 - a user error becomes one message; an internal one re-raises
        return errors.report(e)
    save_model(output, variables, info, overwrite=True)
    n_params = sum(int(np.prod(v.shape)) for v in _leaves(variables["params"]))
    spec = info["spec"]
    print(
        f"Converted {info['source_format']} checkpoint {args.input} -> {output}\n"
        f"  variant: {info['variant'] or '(unregistered)'} (architecture from {info['architecture_from']})\n"
        f"  dims {spec['dim_embed']}, depths {spec['depth']}, heads {spec['num_heads']}, "
        f"{info['num_classes']} classes, act {info['act']}, {n_params / 1e6:.2f}M parameters"
    )
    if info.get("assumed_fields"):
        print(
            "  warning: the weights do not show "
            + ", ".join(info["assumed_fields"])
            + "; the official CvT values were assumed (check model.json, or pass --model).",
            file=sys.stderr,
        )
    return 0


def _leaves(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, Mapping):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [tree]


def console_main() -> None:
    """Console entry point (installed as a ``cvt-*`` command): exits with `main`'s status."""
    raise SystemExit(main())


if __name__ == "__main__":
    sys.exit(main())
