"""Training curves from a run's metrics history (``workdir/metrics.jsonl``).

Draw them again from a workdir (the training run draws them at its end)::

    python -m cvt_flax.plots /tmp/cvt_run    # writes /tmp/cvt_run/curves.png
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

HISTORY_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a metrics history (one JSON object per line; ``step`` and ``split`` keys)."""
    records = []
    with open(path) as f:
        for line in f:
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
      out_path: The PNG to write.
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
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return os.fspath(out_path)


def main(argv: list[str]) -> None:
    """``python -m cvt_flax.plots WORKDIR``: draws ``WORKDIR/curves.png`` from ``WORKDIR/metrics.jsonl``."""
    if len(argv) != 2:
        raise SystemExit("usage: python -m cvt_flax.plots WORKDIR")
    workdir = argv[1]
    print(plot_curves(os.path.join(workdir, HISTORY_FILE), os.path.join(workdir, CURVES_FILE), title=workdir))


if __name__ == "__main__":
    main(sys.argv)
