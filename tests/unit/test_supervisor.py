"""The dev supervisor: readiness, failure detection, and no orphans after stop."""

from __future__ import annotations

import os
import sys
import time

import pytest

from fmapi_cli.supervisor import ChildFailed, Supervisor


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_stop_kills_children_and_grandchildren(tmp_path):
    sup = Supervisor(tmp_path, grace=2)
    pidfile = tmp_path / "grandchild.pid"
    # A child that spawns a grandchild ignoring SIGTERM, then sleeps.
    code = (
        "import os, signal, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    child = sup.start("parent", [sys.executable, "-c", code])
    grandchild = int(sup.wait_for_file(child, pidfile, 10))
    assert _alive(grandchild)
    t0 = time.monotonic()
    sup.stop()
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert not _alive(child.proc.pid)


def test_a_child_that_dies_before_ready_fails_fast_with_its_log(tmp_path):
    sup = Supervisor(tmp_path)
    child = sup.start("broken", [sys.executable, "-c", "print('config is wrong'); raise SystemExit(3)"])
    t0 = time.monotonic()
    with pytest.raises(ChildFailed) as exc:
        sup.wait_for_file(child, tmp_path / "never", timeout=30)
    assert time.monotonic() - t0 < 10
    assert "config is wrong" in str(exc.value) and "3" in str(exc.value)
    assert sup.check() is child
    sup.stop()


def test_children_die_with_a_killed_supervisor(tmp_path):
    """SIGKILL gives the supervisor no chance to stop anything: the kernel tells its children."""
    import signal
    import subprocess

    code = (
        "import sys, time\n"
        "from fmapi_cli.supervisor import Supervisor\n"
        f"c = Supervisor({str(tmp_path)!r}).start('sleeper', ['sleep', '60'])\n"
        "print(c.proc.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    sup = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(sup.stdout.readline())
    assert _alive(child)
    # Once the child runs its own program (setpriv has set the signal and exec'd it).
    deadline = time.monotonic() + 5
    while b"sleep" not in open(f"/proc/{child}/cmdline", "rb").read().split(b"\0")[0]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sup.send_signal(signal.SIGKILL)
    sup.wait()
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
