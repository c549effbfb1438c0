"""Parameter groups for fine-tuning: frozen variables and layer-wise learning-rate decay.

Two config options, both off by default:

* ``--config.freeze``: comma-separated regular expressions of variable names (full match,
  the names of ``--config.init_from_skip``: ``params/stage0/blocks_0/mlp/fc1/kernel``,
  ``batch_stats/stage0/...``). Matching parameters get no update at all (no gradient step,
  no weight decay; their gradients are not even computed, XLA drops them) and do not count
  in gradient clipping or the logged gradient norm; matching BatchNorm statistics keep their
  values (the layers still normalise with the batch's statistics in training, as
  ``torch.nn.BatchNorm`` with frozen buffers would not: freeze both, as
  ``'params/stage[01]/.*,batch_stats/stage[01]/.*'``, to keep stages 0-1 as they are).
  A linear probe: ``'params/(?!head/).*,batch_stats/.*'``.
* ``--config.layer_decay``: layer-wise learning-rate decay (BEiT, ConvNeXt): the update of a
  parameter in layer ``i`` of ``L`` is scaled by ``layer_decay ** (L - i)``. Layers, bottom
  up: each stage's token embedding (with the stage's class token), then each of its blocks;
  the final norm and the head are layer ``L`` (full rate). 0 or 1 turns it off.

Weight decay follows the scaled learning rate (AdamW's decoupled decay is part of the
update), as with per-group learning rates in PyTorch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


# ----------------------------------------------------------------------------- names


def path_name(path: Sequence[Any]) -> str:
    """``'stage0/blocks_0/mlp/fc1/kernel'`` for a `jax.tree_util` key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def variable_names(variables: Mapping[str, PyTree]) -> list[str]:
    """``collection/module/.../leaf`` names of every array in ``{'params': ..., 'batch_stats': ...}``."""
    names = []
    for collection, tree in variables.items():
        if tree is None:
            continue
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        names.extend(f"{collection}/{path_name(p)}" for p, _ in leaves)
    return names


# ----------------------------------------------------------------------------- freezing


def split_patterns(text: str) -> list[str]:
    r"""Splits ``text`` at the commas outside brackets, so that ``'blocks_[0-9]{1,2}/.*,head/.*'`` is two entries.

    A backslash-escaped character never splits or nests (``'a\,b'`` is one entry), nor does anything
    inside a character class (``'[(,]'``).
    """
    items, current, depth, escaped, in_class = [], [], 0, False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "({":
            depth += 1
        elif ch in ")}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0 and not in_class:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    return items


def parse_patterns(text: str | Sequence[str], option: str = "--config.freeze") -> tuple[re.Pattern[str], ...]:
    """Compiles a comma-separated list (or a sequence) of regular expressions; empty entries are skipped.

    The one parser of ``--config.freeze`` and ``--config.init_from_skip``; commas inside brackets
    (``{1,2}``, ``(a|b,c)``) belong to the expression (`split_patterns`).

    Raises:
      ValueError: an entry that is not a regular expression (names the option and the entry).
    """
    items = split_patterns(str(text or "")) if isinstance(text, str) or text is None else list(text)
    out = []
    for p in (s.strip() for s in items):
        if not p:
            continue
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{option}: {p!r} is not a regular expression ({e}).") from None
    return tuple(out)


class Freeze:
    """Which variables a run keeps fixed (`parse_patterns` of ``--config.freeze``).

    Attributes:
      patterns: Compiled full-match patterns over ``collection/...`` names.
    """

    def __init__(self, text: str = ""):
        self.text = str(text or "")
        self.patterns = parse_patterns(self.text)

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"Freeze({self.text!r})"

    def matches(self, name: str) -> bool:
        """True when ``name`` (``params/...`` or ``batch_stats/...``) is frozen."""
        return any(p.fullmatch(name) for p in self.patterns)

    def mask(self, tree: PyTree, collection: str) -> PyTree:
        """A tree of bools like ``tree``: True where the variable ``collection/<path>`` is frozen."""
        return jax.tree_util.tree_map_with_path(lambda p, _: self.matches(f"{collection}/{path_name(p)}"), tree)

    def check(self, variables: Mapping[str, PyTree], model_name: str = "") -> None:
        """Fails early on a pattern that matches nothing, or on freezing every parameter.

        Raises:
          ValueError: naming the pattern, an example name and the fix.
        """
        names = variable_names(variables)
        what = model_name or "the model"
        params = [n for n in names if n.startswith("params/")]
        for p in self.patterns:
            if not any(p.fullmatch(n) for n in names):
                raise ValueError(
                    f"--config.freeze: {p.pattern!r} matches no variable of {what}; names look like "
                    f"{sorted(params or names)[0]!r} (a full match, e.g. 'params/stage0/.*,batch_stats/stage0/.*')."
                )
        if params and all(self.matches(n) for n in params):
            raise ValueError(
                f"--config.freeze={self.text!r} freezes every parameter of {what}: nothing would train. "
                "Leave the head out, e.g. 'params/(?!head/).*' for a linear probe."
            )

    def zero_frozen(self, grads: PyTree) -> PyTree:
        """``grads`` with the frozen parameters' gradients replaced by zeros (XLA then skips computing them)."""
        if not self:
            return grads
        return jax.tree_util.tree_map_with_path(
            lambda p, g: jnp.zeros_like(g) if self.matches(f"params/{path_name(p)}") else g, grads
        )

    def keep_frozen_stats(self, old: PyTree, new: PyTree) -> PyTree:
        """``new`` BatchNorm statistics, except that frozen ones keep their ``old`` values."""
        if not self or not old:
            return new
        return jax.tree_util.tree_map_with_path(
            lambda p, o, n: o if self.matches(f"batch_stats/{path_name(p)}") else n, old, new
        )

    def wrap(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """``tx`` for the trainable parameters, no update at all (`optax.set_to_zero`) for the frozen ones."""
        if not self:
            return tx

        def labels(params: PyTree) -> PyTree:
            return jax.tree.map(lambda f: "frozen" if f else "train", self.mask(params, "params"))

        return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


# ----------------------------------------------------------------------------- layer-wise decay


def layer_decay_active(decay: float) -> bool:
    """True for a decay that changes anything (``0 < decay < 1``; 0 and 1 mean off)."""
    return 0.0 < float(decay) < 1.0


def num_layers(depth: Sequence[int]) -> int:
    """``L``: one layer per stage's token embedding and per block; the final norm and head are layer ``L``."""
    return sum(int(d) + 1 for d in depth)


def layer_id(name: str, depth: Sequence[int]) -> int:
    """The layer of parameter ``name`` (``stage1/blocks_0/attn/...``, ``head/kernel``; no collection prefix).

    Stage ``s``'s token embedding (and class token) is layer ``sum(depth[:s] + 1)``, its block ``j`` the
    next ``j + 1``; everything outside the stages (final norm, head) is ``num_layers(depth)``.
    """
    parts = name.split("/")
    m = re.fullmatch(r"stage(\d+)", parts[0])
    if not m:
        return num_layers(depth)
    s = int(m.group(1))
    base = num_layers(depth[:s])
    b = re.fullmatch(r"blocks_(\d+)", parts[1]) if len(parts) > 1 else None
    return base + 1 + int(b.group(1)) if b else base


def layer_scale(name: str, depth: Sequence[int], decay: float) -> float:
    """The learning-rate multiplier ``decay ** (L - layer_id)`` of parameter ``name`` (see `layer_id`)."""
    return float(decay) ** (num_layers(depth) - layer_id(name, depth))


def scale_by_layer_decay(depth: Sequence[int], decay: float) -> optax.GradientTransformation:
    """Multiplies each update by its layer's `layer_scale` (stateless; the multipliers follow from the names)."""

    def init_fn(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: PyTree, state: optax.EmptyState, params: PyTree = None) -> tuple[PyTree, optax.EmptyState]:
        del params
        scaled = jax.tree_util.tree_map_with_path(lambda p, u: u * layer_scale(path_name(p), depth, decay), updates)
        return scaled, state

    return optax.GradientTransformation(init_fn, update_fn)
