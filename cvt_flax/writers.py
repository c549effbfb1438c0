"""Metric writers and progress reporting that work with or without TensorFlow.

``clu.metric_writers`` and ``clu.periodic_actions`` import TensorFlow (and
TensorBoard) when they load. `create_default_writer` uses clu's writer when it
imports, and otherwise a writer with the same interface built from
``absl.logging`` and ``tensorboardX`` (TensorBoard event files without
TensorFlow). `ProgressReporter` logs steps/s, images/s and the ETA without
either.
"""

from __future__ import annotations

import contextlib
import datetime
import os
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


def create_default_writer(logdir: str | os.PathLike | None, *, just_logging: bool = False) -> Any:
    """The default writer: clu's (logging + TensorBoard) when clu's writers import, else the fallback.

    Args:
      logdir: Directory for TensorBoard event files (None: logging only).
      just_logging: Only log (for processes other than the first).

    Returns:
      An object with the ``clu.metric_writers.MetricWriter`` interface.
    """
    if clu_writers_available():
        from clu import metric_writers

        return metric_writers.create_default_writer(
            os.fspath(logdir) if logdir is not None else None, just_logging=just_logging
        )
    logging.info(
        "clu.metric_writers is unavailable (it needs TensorFlow and TensorBoard); writing TensorBoard files "
        "with tensorboardX."
    )
    writers: list[MetricWriter] = [LoggingWriter()]
    if logdir is not None and not just_logging:
        writers.append(TensorBoardXWriter(logdir))
    return MultiWriter(writers)


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` for a number of seconds."""
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


class ProgressReporter:
    """Throughput and ETA of a training loop, excluding time spent in `timed` sections.

    Call `report` at log steps; it returns ``steps_per_sec``, ``images_per_sec`` and
    ``eta_seconds`` over the steps since the previous call. The first window
    includes compilation; later ones do not.
    """

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._last_step = start_step
        self._last_time = time.perf_counter()
        self._excluded = 0.0
        self.sections: dict[str, float] = {}
        self.train_time = 0.0
        self.train_steps = 0
        self._windows: list[tuple[int, float]] = []

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

    def report(self, step: int) -> dict[str, float]:
        """Throughput since the previous call and the ETA of the run."""
        now = time.perf_counter()
        dt = max(1e-9, now - self._last_time - self._excluded)
        steps = step - self._last_step
        self.train_time += dt
        self.train_steps += steps
        self._windows.append((steps, dt))
        steps_per_sec = steps / dt
        out = {
            "steps_per_sec": steps_per_sec,
            "images_per_sec": steps_per_sec * self.batch_size,
            "eta_seconds": (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf"),
        }
        self._last_step, self._last_time, self._excluded = step, now, 0.0
        return out

    def steady_images_per_sec(self) -> float:
        """Images/s over all reports but the first (which includes compilation); all of them if only one."""
        windows = self._windows[1:] or self._windows
        steps, seconds = sum(w[0] for w in windows), sum(w[1] for w in windows)
        return steps * self.batch_size / seconds if seconds > 0 else 0.0
