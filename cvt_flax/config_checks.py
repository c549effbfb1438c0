"""Ranges of the numeric recipe fields: a value that makes training meaningless is refused before any compile.

`check_numeric_fields` raises one `UserError` naming the field, its value and the accepted range, e.g.
``--config.learning_rate=nan must be a finite number in (0, inf)``. Only fields whose wrong values train silently
into nonsense are here (a nan learning rate trains until the loss is nan; a negative smoothing inverts the
targets); names, shapes and divisibility are checked where they are used.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from cvt_flax.errors import UserError

INF = math.inf

# field: (low, high, low included, high included, what the bounds mean when it helps the reader)
RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "learning_rate": (0.0, INF, False, False, ""),
    "min_learning_rate": (0.0, INF, True, False, "and at most learning_rate"),
    "warmup_init_lr": (0.0, INF, True, False, ""),
    "warmup_epochs": (0.0, INF, True, False, ""),
    "lr_base_batch_size": (0.0, INF, True, False, "0: no scaling"),
    "weight_decay": (0.0, 10.0, True, True, ""),
    "b1": (0.0, 1.0, True, False, ""),
    "b2": (0.0, 1.0, True, False, ""),
    "eps": (0.0, 1.0, False, True, ""),
    "momentum": (0.0, 1.0, True, False, ""),
    "grad_clip_norm": (0.0, INF, True, False, "0: no clipping"),
    "label_smoothing": (0.0, 1.0, True, False, ""),
    "ema_decay": (0.0, 1.0, True, False, "0: no EMA"),
    "drop_path_rate": (-INF, 1.0, False, False, "negative: the variant's"),
    "dropout_rate": (-INF, 1.0, False, False, "negative: the variant's"),
    "attn_dropout_rate": (-INF, 1.0, False, False, "negative: the variant's"),
    "num_epochs": (0.0, INF, False, False, "used when num_train_steps <= 0"),
    "aug.mixup_alpha": (0.0, INF, True, False, "0: off"),
    "aug.cutmix_alpha": (0.0, INF, True, False, "0: off"),
    "aug.mix_prob": (0.0, 1.0, True, True, ""),
    "aug.cutmix_switch_prob": (0.0, 1.0, True, True, ""),
    "aug.random_erasing": (0.0, 1.0, True, True, ""),
}


def _get(config: ml_collections.ConfigDict, name: str) -> Any:
    node: Any = config
    for part in name.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def _interval(low: float, high: float, low_in: bool, high_in: bool) -> str:
    return f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_numeric_fields(config: ml_collections.ConfigDict) -> None:
    """Refuses the first numeric recipe field outside its range (`RANGES`); fields a config lacks are skipped.

    Raises:
      UserError: naming the field, its value and the accepted range.
    """
    for name, (low, high, low_in, high_in, note) in RANGES.items():
        value = _get(config, name)
        if value is None or isinstance(value, bool):
            continue
        if name == "num_epochs" and int(_get(config, "num_train_steps") or -1) > 0:
            continue
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise UserError(f"--config.{name}={value!r} must be a number.") from None
        inside = (low < x or (low_in and x == low)) and (x < high or (high_in and x == high))
        if not math.isfinite(x) or not inside:
            extra = f" ({note})" if note else ""
            raise UserError(
                f"--config.{name}={value} is out of range: it must be a finite number in "
                f"{_interval(low, high, low_in, high_in)}{extra}."
            )
    lr, min_lr = _get(config, "learning_rate"), _get(config, "min_learning_rate")
    if lr is not None and min_lr is not None and float(min_lr) > float(lr):
        raise UserError(
            f"--config.min_learning_rate={min_lr} is above --config.learning_rate={lr}: the cosine schedule decays "
            "from the peak to the minimum, so set min_learning_rate <= learning_rate."
        )
