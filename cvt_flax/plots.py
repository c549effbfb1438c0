"""Training curves from a run's metrics history (``workdir/metrics.jsonl``).

Draw them again from a workdir (the training run draws them at its end)::

    python -m cvt_flax.plots /tmp/cvt_run    # writes /tmp/cvt_run/curves.png
    python -m cvt_flax.plots gs://my-bucket/runs/in1k    # workdirs on Cloud Storage too
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from cvt_flax import paths

HISTORY_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a metrics history (one JSON object per line; ``step`` and ``split`` keys), local or on Cloud Storage."""
    records = []
    for line in paths.as_path(path).read_text().splitlines():
        line = line.strip()
        if line:
            records.append(json.loads(line))
    return records


def _series(records: Iterable[Mapping[str, Any]], split: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("split") == split and r.get(key) is not None:
            xs.append(r.get("epoch", r["step"]))
            ys.append(float(r[key]))
    return xs, ys


def plot_curves(
    history: str | os.PathLike | list[dict[str, Any]], out_path: str | os.PathLike, title: str | None = None
) -> str:
    """Plots loss and accuracy (train and eval) against epochs into a PNG.

    Args:
      history: Path of a ``metrics.jsonl`` file or the records themselves.
      out_path: The PNG to write (local or on Cloud Storage).
      title: Figure title.

    Returns:
      ``out_path`` as a string.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_history(history) if isinstance(history, str | os.PathLike) else list(history)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        xs, ys = _series(records, split, "loss")
        if xs:
            ax_loss.plot(xs, ys, style, label=f"{split} loss", markersize=3)
        xs, ys = _series(records, split, "accuracy")
        if xs:
            ax_acc.plot(xs, ys, style, label=f"{split} top-1", markersize=3)
    xs, ys = _series(records, "eval", "top5_accuracy")
    if xs:
        ax_acc.plot(xs, ys, "s--", label="eval top-5", markersize=3)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    ax_acc.set_ylim(0, 1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()  # matplotlib writes local files only: render, then write the bytes wherever out_path is
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    paths.write_bytes(out_path, png.getvalue())
    return os.fspath(out_path)


def main(argv: list[str]) -> None:
    """``python -m cvt_flax.plots WORKDIR``: draws ``WORKDIR/curves.png`` from ``WORKDIR/metrics.jsonl``."""
    if len(argv) != 2:
        raise SystemExit("usage: python -m cvt_flax.plots WORKDIR")
    workdir = paths.as_path(argv[1])
    print(plot_curves(workdir / HISTORY_FILE, workdir / CURVES_FILE, title=argv[1]))


if __name__ == "__main__":
    main(sys.argv)
