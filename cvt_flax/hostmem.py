"""Transparent huge pages for the host allocator, which makes XLA's CPU backend train about 10% faster.

XLA's CPU runtime allocates each execution's temporary buffer anew (165 MiB for a cvt_mini training step at
batch 64) and glibc serves allocations that large with a fresh ``mmap`` that it unmaps again on ``free``: every
step then touches every page of it for the first time, 43,000 minor page faults per step, 80 ms of kernel time
on the 2-core CPU (measured with ``getrusage``; see README "On this CPU"). glibc's tunable
``glibc.malloc.hugetlb=1`` (glibc 2.35 and later) advises the kernel to back those mappings with 2 MiB
transparent huge pages: about 300 faults per step instead, and a training step about 10% shorter.

glibc reads its tunables only when a process starts, so `reexec_with_huge_pages` starts the same command again
(``os.execve``: same process id, same arguments) with ``GLIBC_TUNABLES`` extended, before JAX is imported. It
does nothing when the tunable is already set, off Linux/glibc, on glibc older than 2.35, when the kernel has
transparent huge pages switched off, when the command cannot be repeated (``python -c``, a script on standard
input, an interactive session or notebook) or when ``CVT_FLAX_HUGE_PAGES=0``.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "CVT_FLAX_HUGE_PAGES"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)


def _glibc_version() -> tuple[int, ...] | None:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def _thp_available(path: str = THP_SETTING) -> bool:
    try:
        with open(path) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def tuned_environment(
    env: Mapping[str, str],
    argv: Sequence[str],
    *,
    platform_name: str = sys.platform,
    glibc: tuple[int, ...] | None = None,
    thp: bool | None = None,
) -> dict[str, str] | None:
    """The environment to restart ``argv`` with, or None where no restart is wanted or possible.

    Args:
      env: The current environment.
      argv: The command as started (``sys.orig_argv``).
      platform_name: ``sys.platform``.
      glibc: The glibc version (default: this process's).
      thp: Whether the kernel offers transparent huge pages (default: read from /sys).
    """
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or not platform_name.startswith("linux"):
        return None
    if len(argv) < 2 or argv[1] == "-" or argv[1].startswith("-c"):  # python -c ... / a script on stdin
        return None
    version = _glibc_version() if glibc is None else glibc
    if version is None or version < MIN_GLIBC:
        return None
    if not (_thp_available() if thp is None else thp):
        return None
    new = dict(env)
    new["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return new


def reexec_with_huge_pages() -> None:
    """Starts this command again with ``glibc.malloc.hugetlb=1`` where that helps (see the module docstring).

    Call it first thing in a command's entry point, before JAX (or anything that starts threads) is imported.
    Returns where no restart is wanted; otherwise does not return.
    """
    if sys.flags.interactive or "IPython" in sys.modules or hasattr(sys, "ps1"):
        return  # A notebook or interactive session: restarting would restart the session itself.
    argv = list(getattr(sys, "orig_argv", []))
    env = tuned_environment(os.environ, argv)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return  # The command keeps running without the tunable.
