"""Pretrained CvT in three lines: `from_pretrained` for model directories, checkpoints and HuggingFace hub ids.

    import cvt_flax
    model, variables, info = cvt_flax.from_pretrained("microsoft/cvt-13")
    logits = model.apply(variables, images)        # images: preprocessed [B, 224, 224, 3]

``name_or_path`` may be

* a cvt-flax model directory (``model.json`` + ``variables/``: from ``python -m cvt_flax.convert`` or a training
  run's ``<workdir>/model``), or a training workdir (its ``model/``, else its latest checkpoint); local or on
  Cloud Storage (``gs://bucket/...``, as every path below);
* a HuggingFace hub id (`HUB_MODELS` lists Microsoft's seven CvT checkpoints; any CvT repository works, and
  ``ID@REVISION`` picks a branch, tag or commit): downloaded with ``huggingface_hub`` into its cache, converted once
  and kept in the cvt-flax cache (``$CVT_FLAX_CACHE``, default ``~/.cache/cvt_flax``) as
  ``<org>/<name>@<commit>``. Offline (``HF_HUB_OFFLINE=1`` or no network) the cached copy is used;
* a local HuggingFace directory (``config.json`` + ``model.safetensors``/``pytorch_model.bin``) or an official
  microsoft/CvT ``.pth`` file (converted in memory; ``python -m cvt_flax.convert`` writes a directory once).

The same names work for ``python -m cvt_flax.convert --input``, ``python -m cvt_flax.predict --model``,
``python -m cvt_flax.export --model`` and fine-tuning's ``--config.init_from``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any, NamedTuple

from etils import epath

from cvt_flax import metadata, paths

logger = logging.getLogger(__name__)

CACHE_ENV = paths.CACHE_ENV
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_FILES = ("config.json", "preprocessor_config.json")
CONVERT_HINT = (
    "To use a checkpoint file you have, convert it once: `python -m cvt_flax.convert --input FILE_OR_DIR --output DIR` "
    "(an official microsoft/CvT .pth, or a HuggingFace folder with config.json and model.safetensors / "
    "pytorch_model.bin, e.g. fetched elsewhere with `hf download ID --local-dir FOLDER`), then pass DIR."
)


@dataclasses.dataclass(frozen=True)
class HubModel:
    """A published CvT checkpoint on the HuggingFace Hub.

    Attributes:
      variant: The cvt-flax architecture.
      resolution: Input side length it was fine-tuned and evaluated at.
      pretrained_on: Pre-training data (all are fine-tuned on / classify ImageNet-1k's 1,000 classes).
      top1: Published ImageNet-1k validation top-1 accuracy (%).
    """

    variant: str
    resolution: int
    pretrained_on: str
    top1: float


# The seven Microsoft CvT checkpoints on the HuggingFace Hub. Ids: transformers' CVT_PRETRAINED_MODEL_ARCHIVE_LIST
# (src/transformers/models/cvt/modeling_cvt.py, the first six) and https://huggingface.co/microsoft/cvt-w24-384-22k
# (its model card: "CvT-w24 model pre-trained on ImageNet-22k and fine-tuned on ImageNet-1k at resolution 384x384").
# Resolutions, pre-training data and top-1: the "Main results" tables of github.com/microsoft/CvT README.md
# (the README's abstract rounds CvT-W24 to 87.7; its table says 87.6).
HUB_MODELS: dict[str, HubModel] = {
    "microsoft/cvt-13": HubModel("cvt_13", 224, "ImageNet-1k", 81.6),
    "microsoft/cvt-13-384": HubModel("cvt_13", 384, "ImageNet-1k", 83.0),
    "microsoft/cvt-13-384-22k": HubModel("cvt_13", 384, "ImageNet-22k", 83.3),
    "microsoft/cvt-21": HubModel("cvt_21", 224, "ImageNet-1k", 82.5),
    "microsoft/cvt-21-384": HubModel("cvt_21", 384, "ImageNet-1k", 83.3),
    "microsoft/cvt-21-384-22k": HubModel("cvt_21", 384, "ImageNet-22k", 84.9),
    "microsoft/cvt-w24-384-22k": HubModel("cvt_w24", 384, "ImageNet-22k", 87.6),
}


class PretrainedError(ValueError):
    """A model name or path that cannot be resolved (unknown, offline without a cached copy); says the fix."""


class Pretrained(NamedTuple):
    """What `from_pretrained` returns: the Flax module, its variables and its ``model.json`` metadata."""

    model: Any
    variables: dict[str, Any]
    info: dict[str, Any]


# ----------------------------------------------------------------------------- names


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?:@[\w./-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def looks_like_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` has the shape of a hub id (``org/name`` or ``org/name@revision``), not of a local path."""
    text = os.fspath(name)
    return (
        bool(_HUB_ID.match(text))
        and not text.startswith((".", "~"))
        and not text.endswith((".pth", ".pt", ".bin", ".safetensors", ".json"))
    )


def split_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """``'org/name@rev'`` -> ``('org/name', 'rev')``; an explicit ``revision`` wins."""
    repo_id, _, rev = name.partition("@")
    return repo_id, revision or rev or None


def cache_dir() -> pathlib.Path:
    """Where converted hub checkpoints live: ``$CVT_FLAX_CACHE``, else ``$XDG_CACHE_HOME/cvt_flax`` (``~/.cache``)."""
    return paths.cache_root()


def converted_dir(repo_id: str, commit: str) -> pathlib.Path:
    """The cvt-flax cache directory of ``repo_id`` at ``commit``: ``<cache>/<org>/<name>@<commit>``."""
    return cache_dir().joinpath(*repo_id.split("/")[:-1], f"{repo_id.split('/')[-1]}@{commit}")


def _complete(directory: pathlib.Path) -> bool:
    return (directory / "model.json").is_file() and (directory / "variables").is_dir()


# ----------------------------------------------------------------------------- the Hub


def _offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now as well as when huggingface_hub was imported."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _hf_cache() -> str:
    """huggingface_hub's cache (``HF_HUB_CACHE``/``HF_HOME``, read now as well as at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def _hub_revision(repo_id: str, revision: str | None) -> tuple[str, list[str]]:
    """Asks the Hub for the commit of ``revision`` and the repository's file names (network)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision)
    return str(info.sha), [s.rfilename for s in (info.siblings or [])]


def _hub_download(repo_id: str, commit: str, files: list[str]) -> pathlib.Path:
    """Downloads ``files`` of ``repo_id`` at ``commit`` into the HuggingFace cache; returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    return pathlib.Path(snapshot_download(repo_id, revision=commit, allow_patterns=files, cache_dir=_hf_cache()))


def _hub_cached(repo_id: str, revision: str | None) -> tuple[pathlib.Path, str] | None:
    """The HuggingFace cache's snapshot of ``repo_id`` at ``revision`` (no network), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=["config.json"], local_files_only=True, cache_dir=_hf_cache()
        )
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    folder = pathlib.Path(folder)
    if not (folder / "config.json").is_file() or not any((folder / w).is_file() for w in WEIGHT_FILES):
        return None
    return folder, folder.name


def _converted_copies(repo_id: str, revision: str | None) -> list[pathlib.Path]:
    """Converted copies of ``repo_id`` in the cvt-flax cache (newest first) that match ``revision``."""
    parent = converted_dir(repo_id, "x").parent
    name = repo_id.split("/")[-1]
    found = []
    for d in parent.glob(f"{name}@*") if parent.is_dir() else []:
        if not _complete(d):
            continue
        info = json.loads((d / "model.json").read_text())
        wanted = revision or "main"
        if wanted in (info.get("hub_revision") or "main", info.get("hub_commit")):
            found.append(d)
    return sorted(found, key=lambda d: (d / "model.json").stat().st_mtime, reverse=True)


def _unknown_repo(repo_id: str, error: Exception) -> PretrainedError:
    known = ", ".join(HUB_MODELS)
    return PretrainedError(
        f"{repo_id!r} is neither a local file or directory nor a model on the HuggingFace Hub "
        f"({type(error).__name__}). Published CvT checkpoints: {known}. For a private or gated repository log in "
        "first (`hf auth login` or HF_TOKEN)."
    )


def _pick_weights(repo_id: str, files: list[str]) -> str:
    for name in WEIGHT_FILES:
        if name in files:
            return name
    raise PretrainedError(
        f"The hub repository {repo_id!r} has no {' or '.join(WEIGHT_FILES)} (files: {', '.join(sorted(files)[:20])}); "
        "it is not a HuggingFace CvtForImageClassification checkpoint. " + CONVERT_HINT
    )


def _offline_error(repo_id: str, reason: str) -> PretrainedError:
    return PretrainedError(
        f"Cannot get {repo_id!r} from the HuggingFace Hub: {reason}. There is no converted copy in the cvt-flax cache "
        f"({cache_dir()}) and no download in the HuggingFace cache ({_hf_cache()}). Run once with network access "
        f"(the checkpoint is downloaded, converted and cached), or set {CACHE_ENV} to a cache that has it. "
        + CONVERT_HINT
    )


def _ask_hub(repo_id: str, revision: str | None) -> tuple[tuple[str, list[str]] | None, str]:
    """Asks the Hub for ``repo_id`` at ``revision``: ``((commit, files), '')``, or ``(None, why it cannot be reached)``.

    Raises:
      PretrainedError: when the Hub answers that the repository or revision does not exist (or is gated).
    """
    if _offline():
        return None, "offline mode is on (HF_HUB_OFFLINE=1), so there is no network access"
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return _hub_revision(repo_id, revision), ""
    except RevisionNotFoundError as e:
        raise PretrainedError(
            f"The hub repository {repo_id!r} has no revision {revision!r}; use a branch, tag or commit it has "
            "(or none, for main)."
        ) from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise _unknown_repo(repo_id, e) from e
    except Exception as e:  # noqa: BLE001 - connection errors come in many types (httpx, OSError, 5xx)
        return None, f"there is no network access to the Hub ({type(e).__name__}: {str(e)[:200]})"


def _download(repo_id: str, commit: str, files: list[str]) -> pathlib.Path:
    """Downloads the config, preprocessor config and weights (safetensors if there, else the .bin)."""
    return _hub_download(repo_id, commit, [f for f in HUB_FILES if f in files] + [_pick_weights(repo_id, files)])


def hub_snapshot(repo_id: str, revision: str | None = None) -> tuple[pathlib.Path, str]:
    """Downloads (or finds offline) the HuggingFace files of ``repo_id``: ``(snapshot folder, commit)``.

    Raises:
      PretrainedError: for an unknown repository or revision, or offline without a cached snapshot.
    """
    repo_id, revision = split_revision(repo_id, revision)
    answer, reason = _ask_hub(repo_id, revision)
    if answer is not None:
        commit, files = answer
        return _download(repo_id, commit, files), commit
    cached = _hub_cached(repo_id, revision)
    if cached is None:
        raise _offline_error(repo_id, reason)
    return cached


def convert_hub_snapshot(
    snapshot: str | os.PathLike, repo_id: str, commit: str, revision: str | None = None, **convert_kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Converts a downloaded HuggingFace snapshot; the info records the hub id, revision, commit and published facts.

    Args:
      snapshot: The snapshot folder (``config.json`` + weights).
      repo_id: The hub id.
      commit: The snapshot's commit.
      revision: The revision asked for (None: main).
      **convert_kwargs: For `cvt_flax.convert.convert_checkpoint` (``act``, ``num_classes``, ...).

    Returns:
      ``(variables, info)`` as `cvt_flax.convert.convert_checkpoint`.
    """
    from cvt_flax import convert

    published = HUB_MODELS.get(repo_id)
    if convert_kwargs.get("image_size") is None and not (pathlib.Path(snapshot) / "preprocessor_config.json").is_file():
        # Without a preprocessor config the resolution comes from the table or the id (cvt-13-384 -> 384).
        convert_kwargs["image_size"] = published.resolution if published else metadata.image_size_from_name(repo_id)
    variables, info = convert.convert_checkpoint(snapshot, **convert_kwargs)
    info.update(hub_id=repo_id, hub_revision=revision or "main", hub_commit=commit)
    if published:
        info.update(pretrained_on=published.pretrained_on, published_top1=published.top1)
    return variables, info


def resolve_hub(repo_id: str, revision: str | None = None) -> pathlib.Path:
    """The cvt-flax model directory of a hub checkpoint, downloading and converting it the first time.

    Args:
      repo_id: ``org/name`` (or ``org/name@revision``).
      revision: Branch, tag or commit (default: main).

    Returns:
      ``<cache>/<org>/<name>@<commit>`` (complete: ``model.json`` + ``variables/``).

    Raises:
      PretrainedError: unknown repository/revision; offline (or no network) without a cached copy.
    """
    from cvt_flax import checkpoint

    repo_id, revision = split_revision(repo_id, revision)
    answer, reason = _ask_hub(repo_id, revision)
    if answer is not None:
        commit, files = answer
        target = converted_dir(repo_id, commit)
        if _complete(target):
            return target
        snapshot = _download(repo_id, commit, files)
    else:
        if revision and _COMMIT.match(revision) and _complete(converted_dir(repo_id, revision)):
            return converted_dir(repo_id, revision)
        cached = _hub_cached(repo_id, revision)
        if cached is not None and _complete(converted_dir(repo_id, cached[1])):
            return converted_dir(repo_id, cached[1])
        if cached is None:
            copies = _converted_copies(repo_id, revision)
            if not copies:
                raise _offline_error(repo_id, reason)
            logger.warning("%s: %s; using the converted copy %s.", repo_id, reason, copies[0])
            return copies[0]
        snapshot, commit = cached
        target = converted_dir(repo_id, commit)
    logger.info("Converting %s (commit %s) into %s.", repo_id, commit, target)
    variables, info = convert_hub_snapshot(snapshot, repo_id, commit, revision)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        checkpoint.save_model(tmp, variables, info)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it meanwhile
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- from_pretrained


EXPECTED_INPUTS = (
    "expected a .pth/.bin/.safetensors file, an HF directory with config.json, a model directory with model.json, "
    "or a hub id"
)
# How weight files begin: a zip archive (torch.save since 1.6), a pickle (protocol 2-5: older torch.save), or
# safetensors (an 8-byte header length, then the JSON header).
_ZIP, _PICKLE = b"PK\x03\x04", (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def looks_like_weights_file(path: epath.Path) -> bool:
    """Whether a file's name and first bytes are those of a torch or safetensors weight file."""
    if path.suffix.lower() not in (".pth", ".pt", ".bin", ".ckpt", ".safetensors"):
        return False
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:
        return True  # let the loader name the problem
    if path.suffix.lower() == ".safetensors":
        return len(head) >= 9 and head[8:9] == b"{"
    return head.startswith(_ZIP) or head.startswith(_PICKLE)


def _is_hf_dir(path: epath.Path) -> bool:
    return (path / "config.json").is_file() or any((path / w).is_file() for w in WEIGHT_FILES)


def load(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    trust_pickle: bool = False,
    **convert_kwargs: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loads the variables and ``model.json`` metadata of anything `from_pretrained` accepts (no module built).

    Raises:
      PretrainedError: for a name that is neither a usable path nor a hub id, and hub failures.
      ValueError / FileNotFoundError / ImportError: from the converter, for files that are not CvT checkpoints.
    """
    from cvt_flax import checkpoint, convert

    path = paths.as_path(name_or_path)
    if path.is_dir():
        for model_dir in (path, path / checkpoint.MODEL_DIR):
            if (model_dir / checkpoint.INFO_FILE).is_file():
                variables, info = checkpoint.load_model(model_dir)
                return variables, {**info, "source": str(model_dir)}
        if (path / checkpoint.CHECKPOINT_DIR).is_dir() or (path / "state").is_dir():
            variables, info = checkpoint.load_init_from(str(path))
            if "spec" not in info or "num_classes" not in info:
                raise PretrainedError(
                    f"The checkpoint in {path} does not describe its model (no spec in its metadata)."
                )
            return variables, info
        if _is_hf_dir(path) or any(p.suffix in (".pth", ".pt", ".bin", ".safetensors") for p in path.iterdir()):
            variables, info = convert.convert_checkpoint(path, trust_pickle=trust_pickle, **convert_kwargs)
            return variables, {**info, "source": str(path)}
        raise PretrainedError(
            f"{path} holds no model: expected a cvt-flax model directory (model.json + variables/), a training "
            "workdir (model/ or checkpoints/), a HuggingFace folder (config.json + model.safetensors / "
            "pytorch_model.bin) or a .pth file. " + CONVERT_HINT
        )
    if path.is_file():
        if not looks_like_weights_file(path):
            raise PretrainedError(f"{path} is not a CvT checkpoint ({EXPECTED_INPUTS}).")
        variables, info = convert.convert_checkpoint(path, trust_pickle=trust_pickle, **convert_kwargs)
        return variables, {**info, "source": str(path)}
    if looks_like_hub_id(name_or_path):
        directory = resolve_hub(os.fspath(name_or_path), revision)
        variables, info = checkpoint.load_model(directory)
        return variables, {**info, "source": str(directory)}
    raise PretrainedError(
        f"{os.fspath(name_or_path)!r} is neither an existing file or directory nor a HuggingFace hub id "
        f"(org/name). Published CvT checkpoints: {', '.join(HUB_MODELS)}. " + CONVERT_HINT
    )


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    trust_pickle: bool = False,
    convert_kwargs: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Pretrained:
    """Loads a pretrained CvT, its variables and its metadata (e.g. for the hub id ``microsoft/cvt-13``).

    Args:
      name_or_path: A cvt-flax model directory or training workdir, a HuggingFace hub id (``org/name`` or
        ``org/name@revision``), a local HuggingFace folder, or an official microsoft/CvT ``.pth`` file.
      revision: Hub branch, tag or commit (default main).
      trust_pickle: Allow ``torch.load(weights_only=False)`` for local ``.pth`` files you trust.
      convert_kwargs: For local PyTorch files: `cvt_flax.convert.convert_checkpoint` options (``model``,
        ``num_heads``, ``act``, ``image_size``, ...).
      **overrides: For `cvt_flax.checkpoint.model_from_info` (``dtype='bfloat16'``, ``attention_impl='xla'``, ...).

    Returns:
      `Pretrained` ``(model, variables, info)``: the Flax module, ``{'params', 'batch_stats'}`` (numpy) and the
      ``model.json`` dict (``class_names``, ``preprocessing``, ``image_size``, ``source``, ...; see
      `cvt_flax.metadata`). ``model.apply(variables, images)`` gives logits.

    Raises:
      PretrainedError: an unknown name, or no network and no cached copy (the message says how to convert a local
        file instead).
    """
    from cvt_flax import checkpoint

    variables, info = load(name_or_path, revision=revision, trust_pickle=trust_pickle, **dict(convert_kwargs or {}))
    class_names, preprocessing = metadata.describe(info)
    info = {**info, "class_names": class_names, "preprocessing": preprocessing}
    info.setdefault("image_size", preprocessing["image_size"])
    return Pretrained(checkpoint.model_from_info(info, **overrides), variables, info)
