"""Parsing of config-file arguments: ``--config=configs/imagenet.py:variant=21,res=384``.

ml_collections passes everything after ``.py:`` to ``get_config(arg)`` as one
string; `parse` turns it into a dict of typed options, with a clear error for
unknown keys or bad values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"Config argument {key}={text!r} must be true or false.")
    if isinstance(default, int) and not isinstance(default, bool):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"Config argument {key}={text!r} must be an integer.") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"Config argument {key}={text!r} must be a number.") from None
    return text


def parse(arg: str | None, defaults: Mapping[str, Any], choices: Mapping[str, tuple] | None = None) -> dict[str, Any]:
    """Parses ``'key=value,key=value'`` against ``defaults`` (which also gives each value's type).

    Args:
      arg: The string after ``.py:`` (None or '' for none).
      defaults: Allowed keys and their defaults.
      choices: Allowed values per key (optional).

    Returns:
      ``defaults`` updated with the parsed values.

    Raises:
      ValueError: for an unknown key, a malformed item or a value out of ``choices``.
    """
    out = dict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(
                f"Config argument {item!r} is not key=value. Allowed keys: {', '.join(sorted(defaults))} "
                f"(e.g. --config=configs/FILE.py:{next(iter(defaults))}=...)."
            )
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r}; allowed: {', '.join(sorted(defaults))}.")
        value = _convert(key, value, defaults[key])
        if choices and key in choices and value not in choices[key]:
            raise ValueError(f"Config argument {key}={value!r} is not one of {list(choices[key])}.")
        out[key] = value
    return out
