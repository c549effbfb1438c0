"""Dataset registry, metadata and split arithmetic (no TensorFlow needed).

Everything here works without TensorFlow: TFDS builders read their metadata
(``dataset_info.json``) without it, and image folders are scanned with ``etils.epath``
(local folders or ``gs://`` URLs, like TFDS data_dirs).
Both input pipelines (:mod:`cvt_flax.data.tfdata`, :mod:`cvt_flax.data.device`)
start from :func:`open_source`, which checks that the dataset is there and
resolves TFDS split strings (``'train[:90%]'``, ``'test[:37]'``) to absolute
example ranges, so that every pipeline agrees on which examples a split holds
and on how they are divided between processes.

With several processes (`jax.distributed`), a dataset that has to be downloaded and
prepared (``config.download``) is prepared by process 0 alone while the others wait;
they then read its copy (a shared data_dir: ``gs://``, NFS), or, when the data_dir is a
disk of each host, prepare their own copy afterwards.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import types
from collections.abc import Sequence
from typing import Any

import numpy as np

from cvt_flax import paths, serving
from cvt_flax.data.policy import LUMA
from cvt_flax.errors import UserError

IMAGE_FOLDER = "image_folder"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class DatasetError(UserError):
    """A dataset cannot be used as configured (unknown, not prepared, bad split); the message says the fix."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    """What we know about a supported dataset ahead of reading its metadata."""

    num_classes: int
    mean: tuple[float, ...] | None = None  # on the [0, 1] scale; None: ImageNet's
    std: tuple[float, ...] | None = None
    splits: str = "train, test"
    manual: str | None = None  # manual-download instructions


_IMAGENET_MANUAL = (
    "imagenet2012 needs a manual download: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
    "https://image-net.org (after registering), put them in DIR/downloads/manual/, then run "
    "`tfds build imagenet2012 --data_dir DIR --manual_dir DIR/downloads/manual` (add `--file_format=array_record` "
    "for the device pipeline)"
)

KNOWN_DATASETS: dict[str, _Entry] = {
    "cifar10": _Entry(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": _Entry(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": _Entry(10, (0.2860,), (0.3530,)),
    "mnist": _Entry(10, (0.1307,), (0.3081,)),
    "oxford_iiit_pet": _Entry(37),
    "oxford_flowers102": _Entry(102, splits="train, validation, test"),
    "cats_vs_dogs": _Entry(2, splits="train only (use e.g. 'train[:90%]' / 'train[90%:]')"),
    "food101": _Entry(101, splits="train, validation"),
    "imagenet2012": _Entry(1000, splits="train, validation", manual=_IMAGENET_MANUAL),
}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training loop needs to know about the configured dataset.

    Attributes:
      name: Dataset name (``config.dataset``).
      num_classes: Number of classes (labels are ``0 .. num_classes - 1``).
      num_train_examples: Examples in ``config.train_split`` (all processes together).
      num_eval_examples: Examples in ``config.eval_split`` (all processes together).
      channels: Channels of the images the model receives (after ``config.num_channels``).
      class_names: Class names when the dataset has them, else None.
      source_channels: Channels of the stored images.
      image_shape: Stored image shape ``(H, W, C)``; ``H``/``W`` are None when they vary.
      mean: Per-channel normalisation mean (``channels`` values, [0, 1] scale).
      std: Per-channel normalisation std (``channels`` values, [0, 1] scale).
    """

    name: str
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    channels: int
    class_names: list[str] | None
    source_channels: int = 3
    image_shape: tuple[int | None, int | None, int] = (None, None, 3)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


# A resolved piece of a split: examples [start, stop) of the stored split `name`.
Range = tuple[str, int, int]


@dataclasses.dataclass
class Source:
    """An opened dataset: a prepared TFDS builder or a scanned image folder.

    Attributes:
      name: ``config.dataset``.
      data_dir: Where it lives (TFDS data_dir or the image-folder root; None: TFDS default).
      split_sizes: Examples per stored split.
      class_names: Class names, or None.
      num_classes: Number of classes.
      image_shape: Stored image shape (None for sizes that vary).
      builder: The TFDS builder (None for image folders).
      files: For image folders: split -> list of (path, label), in `tfds.ImageFolder`'s order.
    """

    name: str
    data_dir: str | None
    split_sizes: dict[str, int]
    class_names: list[str] | None
    num_classes: int
    image_shape: tuple[int | None, int | None, int]
    builder: Any = None
    files: dict[str, list[tuple[str, int]]] | None = None

    @property
    def is_image_folder(self) -> bool:
        return self.files is not None

    def resolve(self, split: str) -> list[Range]:
        """Resolves a TFDS split string to absolute example ranges of the stored splits.

        Args:
          split: TFDS split syntax: ``'train'``, ``'test[:37]'``, ``'train[:90%]+validation'``...

        Returns:
          The ranges ``(stored_split, start, stop)`` in order.

        Raises:
          DatasetError: The split names a split the dataset does not have, or a slice out of range.
        """
        import tensorflow_datasets as tfds  # TF-free import

        infos = {k: types.SimpleNamespace(num_examples=n, shard_lengths=[n]) for k, n in self.split_sizes.items()}
        try:
            instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
        except (ValueError, KeyError, AssertionError) as e:
            raise DatasetError(
                f"Split {split!r} of dataset {self.name!r} is not valid ({e}). Its splits are "
                f"{dict(self.split_sizes)}; set --config.train_split / --config.eval_split to TFDS split syntax "
                f"over those, e.g. 'train', 'train[:90%]', 'test[:1000]'."
            ) from e
        ranges = []
        for ins in instructions:
            n = self.split_sizes[ins.splitname]
            start = 0 if ins.from_ is None else ins.from_
            stop = n if ins.to is None else ins.to
            ranges.append((ins.splitname, start, max(start, stop)))
        return ranges

    def num_examples(self, split: str) -> int:
        """Number of examples in a split string (all processes)."""
        return sum(b - a for _, a, b in self.resolve(split))


def ranges_to_spec(ranges: Sequence[Range]) -> str:
    """TFDS split string of absolute ranges (``'train[0:100]+test[5:9]'``); empty ranges are dropped."""
    return "+".join(f"{n}[{a}:{b}]" for n, a, b in ranges if b > a)


def process_ranges(ranges: Sequence[Range], process_index: int, process_count: int) -> list[Range]:
    """The contiguous share of process ``process_index`` in the concatenation of ``ranges``.

    Shares differ by at most one example; the first ``N % process_count`` processes get one more
    (the rule of `tfds.even_splits`).

    Args:
      ranges: Absolute ranges (from `Source.resolve`).
      process_index: This process.
      process_count: Number of processes.

    Returns:
      The ranges of this process's share, in order.
    """
    total = sum(b - a for _, a, b in ranges)
    base, extra = divmod(total, process_count)
    lo = process_index * base + min(process_index, extra)
    hi = lo + base + (1 if process_index < extra else 0)
    out, offset = [], 0
    for name, a, b in ranges:
        n = b - a
        s, e = max(lo, offset), min(hi, offset + n)
        if e > s:
            out.append((name, a + s - offset, a + e - offset))
        offset += n
    return out


def share_sizes(total: int, process_count: int) -> list[int]:
    """Example counts of each process's share of ``total`` examples (see `process_ranges`)."""
    base, extra = divmod(total, process_count)
    return [base + (1 if p < extra else 0) for p in range(process_count)]


# ----------------------------------------------------------------------------- opening


def _known_names() -> str:
    return ", ".join([*KNOWN_DATASETS, IMAGE_FOLDER])


def _prepare_instructions(name: str, data_dir: str | None, array_record: bool) -> str:
    shown = data_dir or "~/tensorflow_datasets"
    entry = KNOWN_DATASETS.get(name)
    if entry is not None and entry.manual:
        how = entry.manual.replace("DIR", shown)
    else:
        fmt = " --file_format=array_record" if array_record else ""
        how = (
            f"on a machine with network, run `tfds build {name} --data_dir {shown}{fmt}` (or "
            f"`tfds.builder('{name}', data_dir='{shown}').download_and_prepare()`), copy {shown}/{name} here"
        )
    return f"To prepare it: {how}; then pass --config.data_dir=<that directory> (and keep --config.download=False)."


def open_source(config: Any, *, for_device: bool = False) -> Source:
    """Opens ``config.dataset``: checks it is known and prepared, reads its metadata.

    Args:
      config: The run config (``dataset``, ``data_dir``, ``download``).
      for_device: The caller is the device pipeline (needs the ArrayRecord file format).

    Returns:
      The opened `Source`.

    Raises:
      DatasetError: Unknown name, missing/unprepared data (with how to prepare it), bad image folder.
    """
    name = str(config.dataset)
    data_dir = config.data_dir or None
    if name == IMAGE_FOLDER:
        return few_shot_subset(_open_image_folder(data_dir), config)
    if int(config.train_examples_per_class) > 0:
        raise DatasetError(
            f"--config.train_examples_per_class={config.train_examples_per_class} picks a few-shot subset of an "
            "image folder; use it with --config.dataset=image_folder (or set it to 0 for the whole split)."
        )
    import tensorflow_datasets as tfds  # TF-free import

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetError(
            f"Unknown dataset {name!r}. Known: {_known_names()} (any TFDS image-classification dataset name "
            f"also works). For your own images use --config.dataset=image_folder with --config.data_dir=ROOT "
            f"holding ROOT/<split>/<class>/*.png|jpg."
        ) from e
    if config.download and _process_count() > 1:
        builder = _prepare_on_process_0(builder, name, data_dir, for_device)
    elif not builder.is_prepared():
        if not config.download:
            raise DatasetError(
                f"Dataset {name!r} is not prepared in {builder.data_dir} and --config.download is False. "
                + _prepare_instructions(name, data_dir, for_device)
            )
        _download_and_prepare(builder, name, data_dir, for_device)
    info = builder.info
    if "image" not in info.features or "label" not in info.features:
        raise DatasetError(
            f"Dataset {name!r} has features {list(info.features)}; an image-classification dataset with 'image' and "
            f"'label' features is needed. Known: {_known_names()}."
        )
    if for_device:
        fmt = getattr(getattr(info, "file_format", None), "value", None)
        if fmt is not None and fmt != "array_record":
            raise DatasetError(
                f"Dataset {name!r} in {builder.data_dir} is stored as {fmt}, but --config.input.pipeline=device "
                f"reads ArrayRecord through tfds.data_source. Prepare it with `tfds build {name} "
                f"--file_format=array_record --data_dir DIR` (or convert it: `tfds convert_format --root_data_dir "
                f"{data_dir or '~/tensorflow_datasets'} --out_file_format array_record`) and pass --config.data_dir, "
                "or use --config.input.pipeline=tfdata."
            )
    label = info.features["label"]
    names = list(label.names) if getattr(label, "names", None) else None
    num_classes = int(label.num_classes) if getattr(label, "num_classes", None) else len(names or [])
    if not num_classes and name in KNOWN_DATASETS:
        num_classes = KNOWN_DATASETS[name].num_classes
    shape = tuple(info.features["image"].shape)
    channels = shape[-1] if len(shape) == 3 and shape[-1] else 3
    split_sizes = {k: int(v.num_examples) for k, v in info.splits.items()}
    if not split_sizes:
        raise DatasetError(
            f"Dataset {name!r} in {builder.data_dir} has no split metadata (dataset_info.json without splits). "
            + _prepare_instructions(name, data_dir, for_device)
        )
    return Source(
        name=name,
        data_dir=data_dir,
        split_sizes=split_sizes,
        class_names=names,
        num_classes=num_classes,
        image_shape=(shape[0] if len(shape) == 3 else None, shape[1] if len(shape) == 3 else None, channels),
        builder=builder,
    )


# Suffix of the split that holds the train images a few-shot subset did not draw (``train_rest``): a validation
# set for tuning (``--config.eval_split=train_rest``) that leaves the test split alone.
HELD_OUT_SUFFIX = "_rest"


def few_shot_subset(source: Source, config: Any) -> Source:
    """A few-shot subset: ``config.train_examples_per_class`` images per class of an image folder's train split.

    Drawn with ``config.train_subset_seed`` (0 images: the whole split); the same subset for the same seed,
    whatever else the config says, so that fine-tuning and training from scratch see the same images. The
    train images not drawn become the split ``<train_split>_rest`` (for tuning without the test split).

    Raises:
      DatasetError: for a train split that is not a plain folder name, or a class with too few images.
    """
    n = int(config.train_examples_per_class)
    if n <= 0:
        return source
    assert source.files is not None
    split = str(config.train_split)
    if split not in source.files:
        raise DatasetError(
            f"--config.train_examples_per_class needs --config.train_split to name one folder of the image folder "
            f"({', '.join(sorted(source.files))}); got {split!r}."
        )
    by_class: dict[int, list[tuple[str, int]]] = {}
    for path, label in sorted(source.files[split]):
        by_class.setdefault(label, []).append((path, label))
    short = {source.class_names[c]: len(v) for c, v in by_class.items() if len(v) < n} if source.class_names else {}
    if short or len(by_class) < source.num_classes:
        raise DatasetError(
            f"--config.train_examples_per_class={n}: some classes of {split!r} have fewer images ({short or 'none'}); "
            "choose a smaller number."
        )
    rng = random.Random(int(config.train_subset_seed))
    subset = []
    for label in sorted(by_class):
        subset += rng.sample(by_class[label], n)
    rng.shuffle(subset)
    drawn = set(subset)
    rest = [f for f in sorted(source.files[split]) if f not in drawn]
    held_out = f"{split}{HELD_OUT_SUFFIX}"
    return dataclasses.replace(
        source,
        files={**source.files, split: subset, held_out: rest},
        split_sizes={**source.split_sizes, split: len(subset), held_out: len(rest)},
    )


def _download_and_prepare(builder: Any, name: str, data_dir: str | None, for_device: bool) -> None:
    """``builder.download_and_prepare()``; a `DatasetError` with the fix when that cannot or did not work."""
    entry = KNOWN_DATASETS.get(name)
    if entry is not None and entry.manual:
        raise DatasetError(f"Dataset {name!r} cannot be downloaded automatically. " + entry.manual)
    if for_device and data_dir and paths.is_remote(data_dir):
        # array_record's writer opens local files only: TFDS cannot prepare ArrayRecord files on Cloud Storage.
        raise DatasetError(
            f"Dataset {name!r} is not prepared in {builder.data_dir}, and --config.input.pipeline=device needs "
            "ArrayRecord files, which cannot be written to Cloud Storage directly. Prepare it on a local disk "
            f"(`tfds build {name} --file_format=array_record --data_dir /tmp/tfds`), copy it up (`gcloud storage cp "
            f"-r /tmp/tfds/{name} {data_dir.rstrip('/')}/`), then run again; or use --config.input.pipeline=tfdata, "
            "which TFDS prepares on Cloud Storage itself."
        )
    try:
        kwargs = {"file_format": "array_record"} if for_device else {}
        builder.download_and_prepare(**kwargs)
    except Exception as e:  # noqa: BLE001 (network errors come in many types)
        raise DatasetError(
            f"Downloading/preparing dataset {name!r} into {builder.data_dir} failed ({type(e).__name__}: {e}). "
            "This machine may have no network. " + _prepare_instructions(name, data_dir, for_device)
        ) from e


def _process_count() -> int:
    import jax

    return jax.process_count()


def _all_processes(flag: bool) -> list[bool]:
    """``flag`` of every process (a collective: every process calls it at the same point)."""
    from jax.experimental import multihost_utils

    return [bool(x) for x in np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).reshape(-1)]


def _prepare_on_process_0(builder: Any, name: str, data_dir: str | None, for_device: bool) -> Any:
    """Downloads and prepares a dataset on process 0 only, the other processes waiting; returns the ready builder.

    Called by every process (the steps are collectives). When process 0's copy is not visible to another process
    afterwards (a data_dir on each host's own disk), that process prepares its own copy.

    Raises:
      DatasetError: when preparing failed (on process 0: on every process, which then all stop).
    """
    import jax
    import tensorflow_datasets as tfds  # TF-free import

    first = jax.process_index() == 0
    if not any(_all_processes(not builder.is_prepared())):
        return builder
    error: DatasetError | None = None
    if first and not builder.is_prepared():
        try:
            _download_and_prepare(builder, name, data_dir, for_device)
        except DatasetError as e:
            error = e
    failed = _all_processes(error is not None)  # also the barrier: the others wait here for process 0
    if error is not None:
        raise error
    if failed[0]:
        raise DatasetError(
            f"Process 0 could not prepare dataset {name!r} in {builder.data_dir} (its message says why). "
            + _prepare_instructions(name, data_dir, for_device)
        )
    if not first:
        builder = tfds.builder(name, data_dir=data_dir)  # reads the metadata process 0 wrote
        if not builder.is_prepared():  # not shared with process 0: this host's data_dir is its own disk
            try:
                _download_and_prepare(builder, name, data_dir, for_device)
            except DatasetError as e:
                error = e
    if any(_all_processes(error is not None)):
        if error is not None:
            raise error
        raise DatasetError(
            f"Another process could not prepare its copy of dataset {name!r} (its message says why). "
            + _prepare_instructions(name, data_dir, for_device)
        )
    return builder


def _open_image_folder(root: str | None) -> Source:
    """Scans ``root/<split>/<label>/*.{png,jpg,jpeg}`` exactly as `tfds.folder_dataset.ImageFolder` does.

    ``root`` may be local or a ``gs://`` URL; the file paths of the `Source` are strings under ``root``.
    """
    if not root or not paths.as_path(root).is_dir():
        raise DatasetError(
            f"--config.dataset=image_folder needs --config.data_dir=ROOT, an existing directory holding "
            f"ROOT/<split>/<class>/*.png|jpg (e.g. ROOT/train/cat/1.png); got data_dir={root!r}."
        )
    root = root if paths.is_remote(root) else os.path.expanduser(root)

    def folders(d: str) -> list[str]:
        return sorted(f.name for f in paths.as_path(d).iterdir() if f.is_dir())

    split_examples: dict[str, list[tuple[str, str]]] = {}
    labels: set[str] = set()
    for split in folders(root):
        examples = []
        for label in folders(os.path.join(root, split)):
            labels.add(label)
            label_dir = os.path.join(root, split, label)
            names = [f.name for f in paths.as_path(label_dir).iterdir()]
            files = [os.path.join(label_dir, f) for f in names if f.lower().endswith(_IMAGE_EXTENSIONS)]
            examples.extend((p, label) for p in sorted(files))
        random.Random(split).shuffle(examples)  # tfds.ImageFolder's deterministic order
        split_examples[split] = examples
    split_examples = {k: v for k, v in split_examples.items() if v}
    if not split_examples:
        raise DatasetError(
            f"No images found under {root}: --config.dataset=image_folder expects ROOT/<split>/<class>/*.png|jpg "
            "(e.g. ROOT/train/cat/1.png, ROOT/test/cat/2.png)."
        )
    class_names = sorted(labels)
    index = {c: i for i, c in enumerate(class_names)}
    files = {k: [(p, index[lab]) for p, lab in v] for k, v in split_examples.items()}
    first = next(iter(files.values()))[0][0]
    with _open_image(first) as im:
        channels = 1 if im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;16") else 3
    return Source(
        name=IMAGE_FOLDER,
        data_dir=root,
        split_sizes={k: len(v) for k, v in files.items()},
        class_names=class_names,
        num_classes=len(class_names),
        image_shape=(None, None, channels),
        files=files,
    )


def _open_image(path: str) -> Any:
    """``PIL.Image.open`` of a local file, or of the bytes of a Cloud Storage object (PIL opens local files only)."""
    from PIL import Image

    return Image.open(io.BytesIO(paths.read_bytes(path)) if paths.is_remote(path) else path)


def verify_images(paths: Sequence[str], threads: int = 16) -> None:
    """Decodes every image once before training starts; a file that does not decode is named, with the fix.

    An image folder is checked in full when a run starts (each file opened and decoded with PIL, in threads:
    about 1,800 small PNGs take well under a second), so that an unreadable file stops the run before anything is
    written instead of failing a tf.data or device batch later with an error that names no file.

    Raises:
      DatasetError: naming up to 10 unreadable files and how many there are.
    """
    import concurrent.futures

    def check(path: str) -> str | None:
        try:
            with _open_image(path) as im:
                serving.decode(im, 3)  # as the pipelines will decode it
        except Exception as e:  # noqa: BLE001 - any failure to decode is the file's
            return f"{path} ({type(e).__name__}: {str(e)[:120]})"
        return None

    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, (os.cpu_count() or 1) * 2))) as pool:
        bad = [b for b in pool.map(check, paths) if b]
    if bad:
        shown = "\n  ".join(bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise DatasetError(
            f"{len(bad)} of {len(paths)} images cannot be read:\n  {shown}{more}\nRemove or replace them (the run "
            "checks every image of an image folder before it starts)."
        )


# ----------------------------------------------------------------------------- config helpers


def model_channels(config: Any, source_channels: int) -> int:
    """Channels the model receives: ``config.num_channels`` (1 or 3), or the dataset's own when it is 0."""
    c = int(config.num_channels or 0)
    if c == 0:
        return source_channels
    if c not in (1, 3):
        raise DatasetError(
            f"config.num_channels={c} is not supported; use 3 (grayscale images are tiled), 1 (RGB converted to "
            "luminance) or 0 (keep the dataset's channels)."
        )
    return c


def normalization_stats(config: Any, name: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) on the [0, 1] scale for ``config.input.normalization``.

    'auto' (or 'dataset'): the dataset's statistics where known (CIFAR, MNIST, Fashion-MNIST), ImageNet's
    otherwise; 'imagenet'; 'inception' (maps to [-1, 1]); 'none' (maps to [0, 1]).
    """
    mode = str(config.input.normalization).lower()
    entry = KNOWN_DATASETS.get(name)
    if mode in ("auto", "dataset"):
        if entry is not None and entry.mean is not None:
            mean, std = entry.mean, entry.std
        elif mode == "dataset":
            raise DatasetError(
                f"No known statistics for dataset {name!r}; use --config.input.normalization=auto|imagenet|"
                "inception|none."
            )
        else:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif mode == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif mode == "inception":
        mean, std = (0.5,), (0.5,)
    elif mode == "none":
        mean, std = (0.0,), (1.0,)
    else:
        raise DatasetError(
            f"Unknown config.input.normalization={mode!r}; use 'auto', 'dataset', 'imagenet', 'inception' or 'none'."
        )
    return _to_channels(mean, channels), _to_channels(std, channels)


def _to_channels(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:  # RGB statistics seen through the luminance conversion (approximately)
        return (float(np.dot(LUMA, values)),)
    raise DatasetError(f"Cannot map {len(values)} normalisation values to {channels} channels.")


def get_dataset_info(config: Any) -> DatasetInfo:
    """Returns the `DatasetInfo` of ``config.dataset`` (checks it is known and prepared).

    Args:
      config: The run config (``dataset``, ``data_dir``, ``download``, ``train_split``, ``eval_split``,
        ``num_channels``, ``input.normalization``, ``input.pipeline``).

    Returns:
      The dataset's `DatasetInfo`.

    Raises:
      DatasetError (a ValueError): Unknown dataset (lists the known ones and 'image_folder'), a dataset that is
        not prepared (says how to prepare it and to pass --config.data_dir), or a bad split.
    """
    for_device = str(config.input.pipeline) == "device"
    source = open_source(config, for_device=for_device)
    if source.is_image_folder:
        verify_images([path for split in source.files.values() for path, _ in split])
    channels = model_channels(config, source.image_shape[2])
    mean, std = normalization_stats(config, source.name, channels)
    return DatasetInfo(
        name=source.name,
        num_classes=source.num_classes,
        num_train_examples=source.num_examples(config.train_split),
        num_eval_examples=source.num_examples(config.eval_split),
        channels=channels,
        class_names=source.class_names,
        source_channels=source.image_shape[2],
        image_shape=source.image_shape,
        mean=mean,
        std=std,
    )
