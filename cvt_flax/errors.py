"""User errors: one clear message that names the problem and the fix, never a traceback in the user's face.

The command-line programs (``main.py`` / ``cvt-train``, ``python -m cvt_flax.convert``, ...) call `report` on an
exception: a user error prints one message on stderr and the program exits with status 2, its traceback going to a
log file (or to the terminal with ``--verbose``); anything else is an internal bug and keeps its traceback.

What counts as a user error (`is_user_error`):

* `UserError` (and its subclasses, e.g. `cvt_flax.data.DatasetError`), raised where cvt-flax checks its inputs;
* a ``ValueError``, ``TypeError``, ``KeyError``, ``RuntimeError``, ``FileNotFoundError``, ``FileExistsError``,
  ``NotADirectoryError`` or ``ImportError`` raised by a ``raise`` statement of cvt-flax's own code (``cvt_flax/``
  or ``configs/``): the project writes those messages for users (they say which ``--config`` field to set);
* file-system conditions the user must fix, whoever raised them: no space left, permission denied, read-only
  file system, a path that is a file where a folder is needed (`os_error_message` words them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import IO, Any

_HERE = pathlib.Path(__file__).resolve()
# Files whose `raise` statements speak to users: the package and the checkout's configs.
_OWN_ROOTS = (str(_HERE.parent) + os.sep, str(_HERE.parents[1] / "configs") + os.sep)
_OWN_TYPES = (
    ValueError, TypeError, KeyError, RuntimeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError,
)  # fmt: skip
EXIT_USER_ERROR = 2
# After a failed save or read, `held_stderr` and `quiet_reader_threads` hold fd 2 until it has been quiet this long
# (at most QUIET_MAX_S), for output that other threads print late.
QUIET_S = 1.0
QUIET_MAX_S = 15.0
_HOLDING = {"active": False}  # fd 2 is the process's: one hold at a time


class UserError(ValueError):
    """An error the user can fix (config, flags, data, checkpoint, file system); its message says how."""


class TrainingDivergedError(UserError, FloatingPointError):
    """A non-finite loss or parameters: the recipe diverged.

    Exit 2 like other user errors; the message says how to recover, and the last good checkpoint stays.
    """


def _raised_by_own_code(exc: BaseException) -> bool:
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return False
    filename = str(pathlib.Path(last.tb_frame.f_code.co_filename).resolve())
    return filename.startswith(_OWN_ROOTS)


def os_error_message(err: OSError) -> str | None:
    """A one-line message with the fix for file-system conditions the user controls (None for others)."""
    path = err.filename or "the path"
    if err.errno == errno.ENOSPC:
        return (
            f"No space left on the device that holds {path}. Free space there (checkpoints of earlier steps in "
            "<workdir>/checkpoints can go: the newest intact one is enough to resume) or choose another --workdir."
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return (
            f"Permission denied for {path}. Choose a --workdir (or data_dir) you can write to, or fix its permissions."
        )
    if err.errno == errno.EROFS:
        return f"{path} is on a read-only file system. Choose a --workdir on a writable disk."
    if err.errno in (errno.EEXIST, errno.ENOTDIR) and path != "the path" and os.path.isfile(str(path)):
        return f"{path} is a file, but a folder is needed there. Choose another --workdir or move the file."
    return None


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a user error (see the module docstring)."""
    if isinstance(exc, UserError):
        return True
    if isinstance(exc, OSError) and os_error_message(exc) is not None:
        return True
    return isinstance(exc, _OWN_TYPES) and _raised_by_own_code(exc)


def message(exc: BaseException) -> str:
    """The user-facing text of a user error."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError):
        text = os_error_message(exc)
        if text:
            return text
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text.strip() or type(exc).__name__


def report(exc: BaseException, *, log_file: str | os.PathLike | None = None, verbose: bool = False,
           stream: IO[str] | None = None) -> int:  # fmt: skip
    """Prints a user error as one message (traceback to ``log_file``); re-raises anything else.

    Args:
      exc: The exception caught at the top of a program.
      log_file: Where the traceback of a user error goes (appended); None: nowhere.
      verbose: Print the traceback on the terminal as well.
      stream: Where the message goes (default stderr).

    Returns:
      The exit status for a user error (`EXIT_USER_ERROR`).

    Raises:
      BaseException: ``exc`` itself when it is not a user error (an internal bug keeps its traceback).
    """
    if not is_user_error(exc):
        raise exc
    stream = stream or sys.stderr
    trace = "".join(traceback.format_exception(exc))
    if log_file is not None:
        try:
            path = pathlib.Path(log_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(trace + "\n")
        except OSError:
            pass  # the message still reaches the user
    if verbose:
        stream.write(trace)
    text = message(exc)
    stream.write(f"error: {text}\n")
    stream.flush()
    return EXIT_USER_ERROR


@contextlib.contextmanager
def silenced_stderr() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null for the block; exceptions raised inside still propagate.

    For output that bypasses every log level: TensorFlow's C++ start-up notes (oneDNN, CPU features), and the
    tracebacks that Orbax's and TensorStore's threads print while a manager closes after a failed save.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def held_stderr(drop_if: Callable[[BaseException], bool]) -> Iterator[None]:
    """Holds file descriptor 2's output during the block and writes it after, unless ``drop_if(the error)``.

    For Orbax saves: when one fails on a full disk, Orbax closes its asyncio loop while TensorStore's threads
    still complete writes, and each of their callbacks prints a "RuntimeError: Event loop is closed" traceback
    straight to the process's stderr; the failure itself is reported once, by the caller. Output of a block that
    succeeds (or fails otherwise) is kept, only delayed to the block's end.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    failed: BaseException | None = None
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException as e:
            failed = e
            raise
        finally:
            dropping = failed is not None and drop_if(failed)
            if dropping:
                # The threads' callbacks keep arriving for a moment after the failure: let them land here.
                sys.stderr.flush()
                _wait_until_quiet(held.fileno())
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not dropping:
                held.seek(0)
                data = held.read()
                if data:
                    os.write(2, data)


# Markers of the tracebacks that Orbax's and TensorStore's reader threads print after a failed read (one per array
# still in flight): the failure itself is reported once, by the caller.
THREAD_NOISE = (
    "Event loop is closed",
    "Task exception was never retrieved",
    "Task was destroyed but it is pending",
    "coroutine ignored GeneratorExit",
)
_BLOCK_START = ("Traceback (most recent call last)", "Exception in thread", "Exception ignored in", "Task exception",
                "Task was destroyed", "Future exception", "During handling of", "The above exception",
                "future:", "exception=")  # fmt: skip


def split_noise(text: str, markers: tuple[str, ...] = THREAD_NOISE) -> tuple[str, str]:
    """Splits captured stderr into ``(kept, noise)``: traceback blocks that mention a marker are noise.

    A block is a run of lines from a traceback's first line (``Traceback (most recent call last):``, ``Exception in
    thread ...``, ``Exception ignored in ...``, asyncio's ``Task exception was never retrieved``) through its indented
    lines to the exception's own line; every other line (log records, warnings) is kept, in order. The threads write
    concurrently, so their blocks can interleave: indented lines outside any block (the tail of a block whose head
    was closed by another thread's exception line) open a block of their own, and a stray line that mentions a
    marker is noise on its own.
    """
    kept: list[str] = []
    noise: list[str] = []
    block: list[str] = []

    def close() -> None:
        if block:
            text_ = "".join(block)
            (noise if any(m in text_ for m in markers) else kept).extend(block)
            block.clear()

    for line in text.splitlines(keepends=True):
        continuation = line[:1] in (" ", "\t", "^")
        if line.startswith(_BLOCK_START) or continuation or (block and line[:1] in ("\n", "")):
            block.append(line)
        elif block:
            block.append(line)  # the exception's line ends the block
            close()
        elif any(m in line for m in markers):
            noise.append(line)
        else:
            kept.append(line)
    close()
    return "".join(kept), "".join(noise)


@contextlib.contextmanager
def _noise_hooks(log_file: str | os.PathLike | None, markers: tuple[str, ...] = THREAD_NOISE) -> Iterator[None]:
    """Routes the reader threads' unhandled exceptions to ``log_file`` whole, one write each, while the block runs.

    Python prints an exception of a thread or of a callback (``sys.unraisablehook``, ``threading.excepthook``) in
    several writes, which interleave between threads; formatted here as one string, a marker-bearing one is appended
    to the log (or dropped) and never reaches fd 2. Other exceptions go to the hooks that were installed before.
    """
    lock = threading.Lock()
    prev_unraisable, prev_thread = sys.unraisablehook, threading.excepthook

    def noisy(exc: BaseException | None, header: str) -> bool:
        if exc is None:
            return False
        text = header + "".join(traceback.format_exception(exc))
        if not any(m in text for m in markers):
            return False
        if log_file is not None:
            with lock, contextlib.suppress(OSError), open(log_file, "a") as f:
                f.write(text)
        return True

    def unraisable(u: Any) -> None:
        if not noisy(u.exc_value, f"Exception ignored in: {u.object!r}\n"):
            prev_unraisable(u)

    def thread_hook(a: Any) -> None:
        name = a.thread.name if a.thread is not None else "?"
        if not noisy(a.exc_value, f"Exception in thread {name}:\n"):
            prev_thread(a)

    sys.unraisablehook, threading.excepthook = unraisable, thread_hook
    try:
        yield
    finally:
        if sys.unraisablehook is unraisable:
            sys.unraisablehook = prev_unraisable
        if threading.excepthook is thread_hook:
            threading.excepthook = prev_thread


def _wait_until_quiet(fd: int) -> None:
    """Waits until the file behind ``fd`` has not grown for `QUIET_S` (at most `QUIET_MAX_S`)."""
    start = last_change = time.monotonic()
    size = os.fstat(fd).st_size
    while True:
        time.sleep(0.1)
        now = time.monotonic()
        new = os.fstat(fd).st_size
        if new != size:
            size, last_change = new, now
        if now - last_change >= QUIET_S or now - start >= QUIET_MAX_S:
            return


class _Held:
    """What `quiet_reader_threads` yields: set ``linger`` when a read inside failed but the block goes on."""

    linger = False


@contextlib.contextmanager
def quiet_reader_threads(log_file: str | os.PathLike | None = None) -> Iterator[_Held]:
    """Keeps the tracebacks of Orbax's and TensorStore's reader threads out of the console (`split_noise`).

    Two layers. The threads' Python-level exceptions are routed whole to ``log_file`` by hooks (`_noise_hooks`), so
    they cannot interleave. File descriptor 2 is held as well (for what is printed around the hooks); afterwards the
    held output is written back without the noise (`split_noise`), which is appended to ``log_file`` when given.
    When a read failed (the block raises, or the caller set ``held.linger``), the hold lasts until fd 2 has been
    quiet for `QUIET_S`, so that the threads' late callbacks land here too. Nested blocks pass through to the
    outermost one.
    """
    held_state = _Held()
    if _HOLDING["active"]:
        yield held_state
        return
    sys.stderr.flush()
    saved = os.dup(2)
    _HOLDING["active"] = True
    with tempfile.TemporaryFile() as held, _noise_hooks(log_file):
        os.dup2(held.fileno(), 2)
        try:
            yield held_state
        except BaseException:
            held_state.linger = True
            raise
        finally:
            if held_state.linger:
                sys.stderr.flush()
                _wait_until_quiet(held.fileno())
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            _HOLDING["active"] = False
            held.seek(0)
            kept, noise = split_noise(held.read().decode("utf-8", "replace"))
            if kept:
                os.write(2, kept.encode())
            if noise and log_file is not None:
                with contextlib.suppress(OSError), open(log_file, "a") as f:
                    f.write(noise)
