"""Counts in the texts of a lowered and a compiled XLA program: StableHLO ops, kernels, random-number arithmetic.

`stablehlo_op_count` reads ``jit(f).lower(...).as_text()`` (MLIR); `kernel_stats` reads
``lowered.compile().as_text()``, the optimized HLO module after XLA's fusion passes. There, every instruction
that runs on the device is a kernel launch: a ``fusion`` (XLA's own generated kernel, Triton GEMMs included) or
a ``custom-call`` (cuDNN convolutions, cuBLAS GEMMs, TPU/GPU library calls), plus a few unfused operations
(collectives, copies, ...), listed separately. Instructions inside fused computations are not kernels; the
bodies of ``while`` loops (``lax.scan``) and ``conditional`` branches count once each, as written (static
count), with ``dynamic`` adding each loop body's kernels times its known trip count.

No JAX import: these functions parse text, so they are tested on the CPU backend's output and work on any
target's.
"""

from __future__ import annotations

import collections
import re
from typing import Any

# Instructions that launch nothing on the device (bookkeeping, control flow, layout no-ops).
NOT_KERNELS = frozenset(
    {
        "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
        "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "get-dimension-size",
        "copy-done", "send-done", "recv-done", "all-reduce-done", "all-gather-done", "collective-permute-done",
        "async-done", "async-update",
    }
)  # fmt: skip
# Integer operations that threefry (JAX's default random-number generator) is made of.
RNG_ARITHMETIC = ("xor", "shift-left", "shift-right-logical")

_OP_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_STABLEHLO_OP = re.compile(r"^\s*(?:%[\w#:, %]+=\s*)?\"?((?:stablehlo|chlo|mhlo)\.[a-z_]+)", re.M)


def stablehlo_op_count(mlir_text: str) -> int:
    """Operations of the StableHLO dialects (``stablehlo.*``, ``chlo.*``) in a lowered module's text."""
    return len(_STABLEHLO_OP.findall(mlir_text))


def _opcode(rhs: str) -> str | None:
    """The opcode of an instruction's right-hand side ``<shape> <opcode>(<operands>)...``."""
    rhs = rhs.lstrip()
    i = 0
    if rhs.startswith("("):  # tuple shape, possibly nested
        depth = 0
        for pos, ch in enumerate(rhs):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                i = pos + 1
                break
    else:
        while i < len(rhs) and not rhs[i].isspace():
            i += 1
    m = re.match(r"\s*([a-z][a-z0-9\-]*)\(", rhs[i:])
    return m.group(1) if m else None


def parse_computations(hlo_text: str) -> tuple[dict[str, list[tuple[str, str]]], str | None]:
    """``{computation: [(opcode, instruction text), ...]}`` and the entry computation's name."""
    comps: dict[str, list[tuple[str, str]]] = {}
    entry = None
    current: list[tuple[str, str]] | None = None
    for line in hlo_text.splitlines():
        stripped = line.strip()
        if current is None:
            m = _HEADER.match(stripped)
            if m and not stripped.startswith("HloModule"):
                current = comps.setdefault(m.group(2), [])
                if m.group(1):
                    entry = m.group(2)
            continue
        if stripped == "}":
            current = None
            continue
        m = _OP_LINE.match(line)
        if m:
            op = _opcode(m.group(1))
            if op:
                current.append((op, stripped))
    return comps, entry


_CALLEE = re.compile(r"\b(body|condition|true_computation|false_computation|to_apply|calls)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def kernel_stats(hlo_text: str) -> dict[str, Any]:
    """Kernels of an optimized HLO module (``compiled.as_text()``).

    Returns:
      ``{'kernels': fusions + custom calls, 'fusions', 'custom_calls', 'custom_call_targets': {target: n},
      'other_ops': {opcode: n} (unfused device operations), 'dynamic_kernels': kernels with each loop body
      counted trip-count times, 'while_loops', 'rng_arithmetic': {op: n} over all computations (fused ones
      included), 'rng_bit_generators', 'instructions'}``.
    """
    comps, entry = parse_computations(hlo_text)
    if entry is None:
        raise ValueError("No ENTRY computation in this HLO text; pass compiled.as_text() of an XLA executable.")
    counts = {"fusion": 0, "custom-call": 0}
    targets: collections.Counter[str] = collections.Counter()
    other: collections.Counter[str] = collections.Counter()
    loops = 0
    seen: set[str] = set()

    def walk(name: str) -> int:
        """Adds the kernels of a control-flow computation (not a fused one); returns its dynamic kernel count."""
        nonlocal loops
        first = name not in seen
        seen.add(name)
        dynamic = 0
        for op, text in comps.get(name, []):
            if op in ("fusion", "custom-call"):
                dynamic += 1
                if first:
                    counts[op] += 1
                    if op == "custom-call":
                        t = re.search(r'custom_call_target="([^"]+)"', text)
                        targets[t.group(1) if t else "?"] += 1
            elif op not in NOT_KERNELS and not op.endswith("-done"):
                dynamic += 1
                if first:
                    other[op] += 1
            callees = [c for kind, c in _CALLEE.findall(text) if kind != "to_apply" and op != "fusion"]
            for group in _BRANCHES.findall(text):
                callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            trips = 1
            if op == "while":
                loops += first
                m = _TRIP.search(text)
                trips = int(m.group(1)) if m else 1
            for callee in callees:
                dynamic += trips * walk(callee) if callee in comps else 0
        return dynamic

    dynamic = walk(entry)
    everything = [op for instructions in comps.values() for op, _ in instructions]
    ops = collections.Counter(everything)
    return {
        "kernels": counts["fusion"] + counts["custom-call"],
        "fusions": counts["fusion"],
        "custom_calls": counts["custom-call"],
        "custom_call_targets": dict(targets.most_common()),
        "other_ops": dict(other.most_common()),
        "dynamic_kernels": dynamic,
        "while_loops": loops,
        "rng_arithmetic": {op: ops.get(op, 0) for op in RNG_ARITHMETIC},
        "rng_bit_generators": ops.get("rng-bit-generator", 0),
        "instructions": len(everything),
    }
