"""A small process supervisor: start children, wait until they are ready, stop them all.

Each child runs in its own session (process group) with its output in a log file, and is told
to die with SIGTERM when the supervisor dies (PR_SET_PDEATHSIG, set by util-linux's ``setpriv``
as the child starts), so no orphan outlives it. Stop sends SIGTERM to each group, newest first,
waits for the grace period, then SIGKILLs what is left.

No Python runs between fork and exec (no ``preexec_fn``), so Python starts children with vfork:
fork handlers of libraries in the supervisor's process (gRPC's restart its poller thread in the
child, which then dies on the descriptors ``close_fds`` closes) never run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# Runs the child's command with PR_SET_PDEATHSIG set (util-linux, on every Debian system).
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "SIGTERM", "--"] if shutil.which("setpriv") else []


class ChildFailed(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None


class Supervisor:
    def __init__(self, log_dir: Path, grace: float = 10.0) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.grace = grace
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: str | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "ab", buffering=0)
        proc = subprocess.Popen(
            [*_DIE_WITH_PARENT, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
            # What children write (Redis' data, sockets, port files) is the owner's alone.
            umask=0o077,
        )
        log.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def wait_for_file(self, child: Child, path: Path, timeout: float) -> str:
        """Wait until ``child`` writes ``path``; fail at once (with its log) if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                text = path.read_text().strip()
                if text:
                    return text
            if not child.alive():
                raise ChildFailed(
                    f"{child.name} exited with {child.proc.returncode} before it was ready; "
                    f"last lines of {child.log_path}:\n{child.tail()}"
                )
            time.sleep(0.05)
        raise ChildFailed(f"{child.name} not ready after {timeout:.0f}s; see {child.log_path}:\n{child.tail()}")

    def check(self) -> Child | None:
        """The first child that has exited, if any."""
        return next((c for c in self.children if not c.alive()), None)

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.alive():
                _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for child in reversed(self.children):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            # Anything left in the group (including grandchildren) is killed.
            _signal_group(child.proc, signal.SIGKILL)
            try:
                child.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.children.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
