"""Local paths and Cloud Storage URLs (``gs://bucket/...``) through one abstraction: `etils.epath`.

Every path a user gives (``--workdir``, ``--config.data_dir``, ``--config.init_from``, model directories,
``convert --input/--output``, ``predict --model``, ``export --output``) goes through `as_path`, which returns an
``epath.Path``: the path type of TFDS and Orbax. Local paths behave as before (``~`` expanded, made absolute,
read and written with ``os``); ``gs://`` URLs are read and written with TensorFlow's GCS file system when
TensorFlow is importable, else with ``gcsfs`` (etils chooses; ``EPATH_USE_TF=false`` forces ``gcsfs``).

What differs on Cloud Storage, and is handled here rather than at every call site:

* An object write is atomic, and a rename is a copy plus a delete: `write_text` / `write_bytes` write a
  temporary file and rename it locally, and write the object directly on Cloud Storage.
* There is no append (``gcsfs`` silently overwrites on ``open('a')``): `AppendFile` appends locally and rewrites
  the whole object on Cloud Storage (at most every ``min_interval_s`` seconds, and on `AppendFile.flush`).
* A folder exists only while objects are under it, and etils' gcsfs back-end refuses to rename into a folder that
  does not exist: `rename` copies each object and deletes the originals; `makedirs` creates nothing there.
* ``glob('**')`` differs between back-ends: `files_under` walks folders with ``iterdir``.
* Libraries that need a local file name (``safetensors.load_file``, ``matplotlib``'s ``savefig``, PIL) get the
  bytes instead: `read_bytes`.

Real ``gs://`` use needs ``google-cloud-storage`` (Orbax looks up buckets with it; tensorboardX writes event files
with it) and, without TensorFlow, ``gcsfs``: ``pip install 'cvt-flax[gcs]'``. `as_path` says so when one is
missing.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import time

from etils import epath

from cvt_flax.errors import UserError

PathLike = str | os.PathLike
CACHE_ENV = "CVT_FLAX_CACHE"


def cache_root() -> pathlib.Path:
    """cvt-flax's local cache of converted hub checkpoints and compiled programs.

    ``$CVT_FLAX_CACHE``, else ``$XDG_CACHE_HOME/cvt_flax`` (``~/.cache/cvt_flax``).
    """
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(base).expanduser() / "cvt_flax"


GCS_EXTRA_HINT = "Install the Cloud Storage clients with `pip install 'cvt-flax[gcs]'` (google-cloud-storage, gcsfs)."


def is_remote(path: PathLike) -> bool:
    """Whether ``path`` is a URL (``gs://``, ``s3://``...) rather than a local path."""
    return "://" in os.fspath(path)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


@functools.cache
def _missing_gcs_clients(epath_use_tf: str) -> tuple[str, ...]:
    missing = []
    if not _installed("google.cloud.storage"):  # Orbax's bucket look-up, tensorboardX's event files
        missing.append("google-cloud-storage")
    # etils reads gs:// with TensorFlow when it imports (unless EPATH_USE_TF=false), else with gcsfs.
    tf_backend = _installed("tensorflow") and epath_use_tf.lower() not in ("false", "0")
    if not tf_backend and not _installed("gcsfs"):
        missing.append("gcsfs")
    return tuple(missing)


def _check_clients(url: str) -> None:
    """Raises a `UserError` naming the missing package when a ``gs://`` URL cannot be read or written here."""
    if not url.startswith("gs://"):
        return
    missing = _missing_gcs_clients(os.environ.get("EPATH_USE_TF", ""))
    if missing:
        raise UserError(f"{url}: Cloud Storage paths need {' and '.join(missing)}. {GCS_EXTRA_HINT}")


def as_path(path: PathLike) -> epath.Path:
    """The ``epath.Path`` of a user-given path: a local one with ``~`` expanded and made absolute, a URL as is.

    Raises:
      UserError: a ``gs://`` URL without the Cloud Storage client packages installed (names them).
    """
    if is_remote(path):
        text = os.fspath(path)
        _check_clients(text)
        return epath.Path(text)
    return epath.Path(os.fspath(path)).expanduser().absolute()


def makedirs(path: PathLike) -> epath.Path:
    """Creates a local folder and its parents; on Cloud Storage nothing (returns the path either way).

    Cloud Storage has no folders (object names imply them), and a mistyped bucket must not be created.
    """
    path = as_path(path)
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes a whole file atomically: a temporary file renamed over it locally, one object write on Cloud Storage.

    Readers never see a half-written file; a crash leaves the previous version (or nothing).
    """
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data)  # an object appears complete or not at all; a rename would be a copy
        return
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: PathLike, text: str) -> None:
    """`write_bytes` for text (UTF-8)."""
    write_bytes(path, text.encode("utf-8"))


def read_bytes(path: PathLike) -> bytes:
    """The whole content of a local file or a Cloud Storage object."""
    return as_path(path).read_bytes()


def files_under(folder: PathLike) -> list[epath.Path]:
    """Every file under a folder, at any depth (``rglob``/``glob('**')`` are not supported alike by every back-end)."""
    found = []
    for child in as_path(folder).iterdir():
        if child.is_dir():
            found.extend(files_under(child))
        else:
            found.append(child)
    return found


def rename(src: PathLike, dst: PathLike) -> None:
    """Moves a file or folder to ``dst``; the parent of ``dst`` must exist locally (as for ``os.rename``).

    Cloud Storage has no rename: every object is copied, then the originals are deleted (no destination folder
    is needed; etils' gcsfs back-end would want one, and a folder there exists only while it holds objects).
    """
    src, dst = as_path(src), as_path(dst)
    if not is_remote(src):
        src.rename(dst)
        return
    if src.is_file():
        src.copy(dst)
        src.unlink()
        return
    prefix = len(os.fspath(src).rstrip("/")) + 1
    for f in files_under(src):
        f.copy(dst / os.fspath(f)[prefix:])
    src.rmtree()


class AppendFile:
    """A text file that grows by appended text (e.g. ``metrics.jsonl``), local or on Cloud Storage.

    Locally every `append` appends to the file, as ``open('a')`` does. Cloud Storage objects cannot be appended to
    (``gcsfs`` silently replaces the object on ``open('a')``), so there the whole text is kept in memory and the
    object is rewritten: at most every ``min_interval_s`` seconds (Cloud Storage allows about one write per second
    to the same object), and on `flush`. Call `flush` where nothing may be lost (before a checkpoint, at the end).
    """

    def __init__(self, path: PathLike, text: str | None = None, *, min_interval_s: float = 10.0):
        """Opens the file for appending.

        Args:
          path: The file.
          text: When given, what the file holds from now on (written at once, replacing its content). When None,
            the file is left as it is (on Cloud Storage its current content is read, to be appended to).
          min_interval_s: On Cloud Storage, the shortest time between two rewrites of the object.
        """
        self.path = as_path(path)
        self.remote = is_remote(self.path)
        self.min_interval_s = min_interval_s
        self._dirty = False
        if text is not None:
            write_text(self.path, text)
        elif self.remote:
            text = self.path.read_text() if self.path.exists() else ""
        self._text = text or ""
        self._written_at = time.monotonic()

    def append(self, text: str) -> None:
        """Appends ``text`` (written at once locally; within ``min_interval_s`` on Cloud Storage)."""
        if not self.remote:
            with self.path.open("a") as f:
                f.write(text)
            return
        self._text += text
        self._dirty = True
        if time.monotonic() - self._written_at >= self.min_interval_s:
            self.flush()

    def flush(self) -> None:
        """Writes what is not written yet (Cloud Storage; a no-op locally)."""
        if self._dirty:
            self.path.write_text(self._text)
            self._dirty = False
            self._written_at = time.monotonic()


__all__ = [
    "AppendFile",
    "as_path",
    "files_under",
    "is_remote",
    "makedirs",
    "read_bytes",
    "rename",
    "write_bytes",
    "write_text",
]
