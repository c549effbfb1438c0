"""Metric writers, the console and progress reporting; with or without TensorFlow.

``clu.metric_writers`` and ``clu.periodic_actions`` import TensorFlow (and
TensorBoard) when they load. `create_default_writer` writes TensorBoard event
files with clu's writer when it imports, and otherwise with ``tensorboardX``;
the console gets one formatted line per log interval from the training loop,
not a second copy from the writer. `quiet_console` keeps third-party INFO
messages off the console, and `ProgressReporter` measures steps/s, images/s and
the ETA from steady-state speed (compilation excluded), drawing a progress bar
when stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import datetime
import logging as std_logging
import os
import pathlib
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

Scalar = int | float | np.number | np.ndarray


class MetricWriter:
    """The interface of ``clu.metric_writers.MetricWriter`` (without importing clu's writers).

    Subclasses implement `write_scalars` and whatever else they support; the other
    methods do nothing by default.
    """

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
        """Writes generic summaries; this fallback writes scalars only."""
        del metadata
        self.write_scalars(step, {k: v for k, v in values.items() if np.ndim(v) == 0})

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        """Writes scalar values for ``step``."""
        raise NotImplementedError

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Writes images ``[N, H, W, C]`` (or ``[H, W, C]``) for ``step``."""

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        """Not supported by the fallback writers."""

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        """Not supported by the fallback writers."""

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Writes text for ``step``."""

    def write_histograms(
        self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None
    ) -> None:
        """Writes histograms for ``step``."""

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Writes the run's hyper-parameters."""

    def flush(self) -> None:
        """Flushes pending writes."""

    def close(self) -> None:
        """Flushes and releases resources."""
        self.flush()


def _fmt(value: Any) -> str:
    value = np.asarray(value)
    if value.ndim == 0 and np.issubdtype(value.dtype, np.floating):
        return f"{float(value):.6g}"
    return str(value.tolist() if value.ndim else value.item())


class LoggingWriter(MetricWriter):
    """Writes metrics to ``absl.logging`` (INFO), as clu's LoggingWriter."""

    def __init__(self, collection: str | None = None):
        self._prefix = f"[{collection}] " if collection else ""

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(scalars.items()))
        logging.info("%s[%d] %s", self._prefix, step, values)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        for k, v in images.items():
            logging.info("%s[%d] Got image %s with shape %s.", self._prefix, step, k, np.shape(v))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for k, v in texts.items():
            logging.info("%s[%d] %s: %s", self._prefix, step, k, v)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        logging.info("%s[Hyperparameters] %s", self._prefix, dict(hparams))


class TensorBoardXWriter(MetricWriter):
    """TensorBoard event files through ``tensorboardX`` (no TensorFlow needed)."""

    def __init__(self, logdir: str | os.PathLike):
        from tensorboardX import SummaryWriter

        self.logdir = os.fspath(logdir)
        self._writer = SummaryWriter(logdir=self.logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        for k, v in scalars.items():
            self._writer.add_scalar(k, float(np.asarray(v)), global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        for k, v in images.items():
            v = np.asarray(v)
            if v.ndim == 3:
                v = v[None]
            self._writer.add_images(k, v, global_step=step, dataformats="NHWC")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for k, v in texts.items():
            self._writer.add_text(k, v, global_step=step)

    def write_histograms(
        self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None
    ) -> None:
        for k, v in arrays.items():
            bins = (num_buckets or {}).get(k, "tensorflow")
            self._writer.add_histogram(k, np.asarray(v), global_step=step, bins=bins)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        flat = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()}
        self._writer.add_text("hparams", "\n".join(f"{k}: {v}  " for k, v in sorted(flat.items())), global_step=0)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MultiWriter(MetricWriter):
    """Forwards every call to several writers."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self._writers = list(writers)

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
        for w in self._writers:
            w.write_summaries(step, values, metadata)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        for w in self._writers:
            w.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        for w in self._writers:
            w.write_images(step, images)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for w in self._writers:
            w.write_texts(step, texts)

    def write_histograms(
        self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None
    ) -> None:
        for w in self._writers:
            w.write_histograms(step, arrays, num_buckets)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for w in self._writers:
            w.write_hparams(hparams)

    def flush(self) -> None:
        for w in self._writers:
            w.flush()

    def close(self) -> None:
        for w in self._writers:
            w.close()


def clu_writers_available() -> bool:
    """Whether ``clu.metric_writers`` imports (it needs TensorFlow and TensorBoard)."""
    try:
        from clu import metric_writers  # noqa: F401
    except Exception:  # ImportError, or a broken TensorFlow install.
        return False
    return True


class NullWriter(MetricWriter):
    """Writes nothing (the processes other than the first)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        del step, scalars


def create_default_writer(logdir: str | os.PathLike | None, *, just_logging: bool = False) -> Any:
    """TensorBoard event files in ``logdir``: clu's writer when clu's writers import, else tensorboardX.

    Nothing is echoed on the console: the training loop prints its own formatted line per log interval.

    Args:
      logdir: Directory for TensorBoard event files (None: write nothing).
      just_logging: Write nothing (the processes other than the first); the name is clu's.

    Returns:
      An object with the ``clu.metric_writers.MetricWriter`` interface.
    """
    if logdir is None or just_logging:
        return NullWriter()
    if clu_writers_available():
        from clu import metric_writers

        return metric_writers.SummaryWriter(os.fspath(logdir))
    logging.debug("clu.metric_writers is unavailable (it needs TensorFlow and TensorBoard); using tensorboardX.")
    return TensorBoardXWriter(logdir)


# ----------------------------------------------------------------------------- console


_PROJECT_ROOT = str(pathlib.Path(__file__).resolve().parent) + os.sep


class _ConsoleFilter(std_logging.Filter):
    """Keeps the console to cvt-flax's own messages: other libraries' INFO/DEBUG records go.

    Warnings and errors of every library still show, but for one harmless Orbax warning (the item-level metadata
    file, which `load_init_from` does not need) and Orbax's echo of a failed background save (re-raised and
    reported in the training thread).
    """

    def filter(self, record: std_logging.LogRecord) -> bool:
        path = (record.pathname or "").replace(os.sep, "/")
        if "/orbax/" in path and record.levelno >= std_logging.ERROR:
            # A failed background save: Orbax logs it with a traceback from its thread, then raises it in the
            # training thread at the next save or wait, where cvt-flax reports it once.
            return False
        if record.levelno >= std_logging.WARNING:
            return not str(record.msg).startswith("Metadata file does not exist")
        return (record.pathname or "").startswith(_PROJECT_ROOT) or os.path.basename(path) == "main.py"


class _ConsoleFormatter(std_logging.Formatter):
    """``HH:MM:SS message`` (``HH:MM:SS WARNING: message`` from warnings up) instead of absl's long prefix."""

    def format(self, record: std_logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno < std_logging.WARNING else f"{record.levelname}: "
        text = f"{stamp} {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def quiet_console() -> None:
    """A short line format and `_ConsoleFilter` on absl's handler (idempotent)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
        handler.addFilter(_ConsoleFilter())
        handler.setFormatter(_ConsoleFormatter())


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` for a number of seconds."""
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


class ProgressReporter:
    """Throughput and ETA of a training loop, from steady-state speed, excluding time spent in `timed` sections.

    Call `first_step_done` once the first step has finished (it includes compilation), `tick` after every step
    (draws a progress bar when stderr is a terminal) and `report` at log steps: it returns ``steps_per_sec``,
    ``images_per_sec`` and ``eta_seconds`` over the steps since the previous call; the first window starts after
    the first step, so compilation never counts as speed.
    """

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0, *, bar: bool | None = None):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._excluded = 0.0
        self.sections: dict[str, float] = {}
        self.train_time = 0.0
        self.train_steps = 0
        self._windows: list[tuple[int, float]] = []
        self._bar = sys.stderr.isatty() if bar is None else bar
        self._bar_drawn = 0.0
        self._rate: float | None = None

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time spent in this block is not training time (e.g. ``'eval'``, ``'checkpoint'``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self._excluded += dt
            self.sections[name] = self.sections.get(name, 0.0) + dt

    def first_step_done(self, step: int) -> None:
        """Starts the clock after the first step (compilation and start-up are not training speed)."""
        now = time.perf_counter()
        self.sections["first_step"] = now - self._last_time - self._excluded
        self._last_step, self._last_time, self._excluded = step, now, 0.0

    def report(self, step: int) -> dict[str, float]:
        """Throughput since the previous call and the ETA of the run."""
        self.clear_bar()
        now = time.perf_counter()
        dt = max(1e-9, now - self._last_time - self._excluded)
        steps = step - self._last_step
        if steps <= 0:  # the first log step was the first step: no steady-state window yet
            return {"steps_per_sec": 0.0, "images_per_sec": 0.0, "eta_seconds": float("nan")}
        self.train_time += dt
        self.train_steps += steps
        self._windows.append((steps, dt))
        steps_per_sec = steps / dt
        self._rate = steps_per_sec
        out = {
            "steps_per_sec": steps_per_sec,
            "images_per_sec": steps_per_sec * self.batch_size,
            "eta_seconds": (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf"),
        }
        self._last_step, self._last_time, self._excluded = step, now, 0.0
        return out

    def tick(self, step: int) -> None:
        """Redraws the progress bar (terminals only, at most 4 times a second)."""
        if not self._bar:
            return
        now = time.perf_counter()
        if now - self._bar_drawn < 0.25:
            return
        self._bar_drawn = now
        done = step / max(1, self.total_steps)
        width = 30
        filled = int(width * done)
        eta = f" ETA {format_duration((self.total_steps - step) / self._rate)}" if self._rate else ""
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total_steps}{eta}\033[K")
        sys.stderr.flush()

    def clear_bar(self) -> None:
        """Erases the progress bar before a log line."""
        if self._bar and self._bar_drawn:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()

    def steady_images_per_sec(self) -> float:
        """Images/s over the reported windows (the first step, with compilation, excluded)."""
        steps, seconds = sum(w[0] for w in self._windows), sum(w[1] for w in self._windows)
        return steps * self.batch_size / seconds if seconds > 0 else 0.0
