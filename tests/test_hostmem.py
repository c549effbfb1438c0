"""The allocator restart of `cvt_flax.hostmem`: when it happens, what it sets, that the command survives it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from cvt_flax import hostmem

ARGV = ["python", "main.py", "--workdir=w"]


def tuned(env=None, argv=ARGV, **kw):
    kw = {"platform_name": "linux", "glibc": (2, 36), "thp": True, **kw}
    return hostmem.tuned_environment({"PATH": "/bin", **(env or {})}, argv, **kw)


def test_adds_the_tunable_and_keeps_the_rest():
    assert tuned()["GLIBC_TUNABLES"] == hostmem.TUNABLE
    assert tuned()["PATH"] == "/bin"
    both = tuned({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
    assert both == f"glibc.malloc.arena_max=2:{hostmem.TUNABLE}"


@pytest.mark.parametrize(
    "env,argv,kw",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, ARGV, {}),  # the user chose already
        ({hostmem.OPT_OUT: "0"}, ARGV, {}),
        ({}, ARGV, {"platform_name": "darwin"}),
        ({}, ARGV, {"glibc": (2, 31)}),  # no hugetlb tunable before 2.35
        ({}, ARGV, {"thp": False}),  # transparent_hugepage=never
        ({}, ["python", "-c", "print(1)"], {}),  # cannot be started again
        ({}, ["python", "-"], {}),
        ({}, ["python"], {}),
    ],
)
def test_no_restart(env, argv, kw):
    assert tuned(env, argv, **kw) is None


@pytest.mark.skipif(hostmem.tuned_environment({}, ["python", "x.py"]) is None, reason="no glibc>=2.35 with THP here")
def test_the_command_restarts_once_with_the_same_arguments(tmp_path):
    script = tmp_path / "cmd.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            print("start", os.getpid(), flush=True)
            from cvt_flax import hostmem
            hostmem.reexec_with_huge_pages()
            print("run", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    out = subprocess.run(
        [sys.executable, str(script), "a", "--b=1"], env=env, capture_output=True, text=True, check=True
    )
    lines = out.stdout.split()
    starts = [lines[i + 1] for i, w in enumerate(lines) if w == "start"]
    assert len(starts) == 2 and starts[0] == starts[1]  # started twice, same process (execve)
    assert f"run {starts[0]} {hostmem.TUNABLE} ['a', '--b=1']" in out.stdout


def test_no_restart_in_an_interactive_session(monkeypatch):
    monkeypatch.setitem(sys.modules, "IPython", object())
    monkeypatch.setattr(hostmem.os, "execve", lambda *a: pytest.fail("restarted an interactive session"))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    hostmem.reexec_with_huge_pages()
