"""A real, throw-away ``redis-server`` for tests: own port, own directory, no persistence.

    with RedisServer(tmp_path) as r:        # or r = RedisServer(tmp_path); r.start(); ...; r.stop()
        client = redis.Redis.from_url(r.url)

Never touches 127.0.0.1:6379.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def redis_server_binary() -> str | None:
    return os.environ.get("FMAPI_REDIS_SERVER") or shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )


class RedisServer:
    """One redis-server process on a free port, with its files under ``tmpdir``."""

    def __init__(self, tmpdir: str | os.PathLike, *, host: str = "127.0.0.1") -> None:
        self.dir = Path(tmpdir)
        self.host = host
        self.port: int = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        last_err = ""
        for _ in range(5):  # a free port can be taken between probe and bind: retry
            self.port = free_port(self.host)
            log = open(self.dir / f"redis-{self.port}.log", "wb")
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--port", str(self.port),
                    "--bind", self.host,
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.dir),
                    "--daemonize", "no",
                    "--protected-mode", "no",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self.ping():
                    return self
                time.sleep(0.02)
            last_err = (self.dir / f"redis-{self.port}.log").read_text(errors="replace")[-500:]
            self.stop()
        raise RuntimeError(f"redis-server did not start: {last_err}")

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
