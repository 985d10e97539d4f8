"""A real, throw-away PostgreSQL server for tests: own port, own data directory, trust auth.

    pg = PostgresServer(tmp_path).start()        # initdb the first time, then postgres
    engine = sqlalchemy.create_engine(pg.url)    # postgresql+psycopg://fmapi@127.0.0.1:<port>/fmapi
    url = pg.create_database("t1")               # a fresh, empty database
    pg.stop(); ...; pg.start()                   # down for a while, back on the same port and data
    pg.close()                                   # stop and delete what lives outside tmp_path

Debian's binaries live in the newest ``/usr/lib/postgresql/<version>/bin`` (not on PATH;
``FMAPI_POSTGRES_BIN`` overrides). ``initdb`` and ``postgres`` refuse to run as root, so as root
they run as Debian's ``postgres`` system user (util-linux ``setpriv``) and own their
directories. That user cannot enter a root-only directory such as pytest's ``/tmp/pytest-of-root``;
then the data directory goes to a private directory of its own in /tmp (removed by ``close()``
or at exit) instead of loosening pytest's permissions. Logs are always under ``tmpdir/logs``.

The server runs through :class:`fmapi_cli.supervisor.Supervisor` (own process group, told to die
with the test process). ``stop()`` is PostgreSQL's fast shutdown (SIGINT: open sessions are
ended) rather than the supervisor's SIGTERM, PostgreSQL's "smart" shutdown, which would wait for
every client (a connection pool) to disconnect. fsync is off: the data is disposable.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import weakref
from pathlib import Path

import psycopg
from psycopg import sql

from fmapi_cli.supervisor import Child, Supervisor
from helpers.redis_server import free_port

USER = "fmapi"
DATABASE = "fmapi"
OS_USER = "postgres"  # Debian's package creates it
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes, with ".s.PGSQL.<port>" at the end
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binary directory, or None."""
    override = os.environ.get("FMAPI_POSTGRES_BIN")
    if override:
        return Path(override)
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    return max(found, key=lambda p: _version(p.parent.name), default=None)


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


class PostgresServer:
    """One PostgreSQL server on a free port on ``host``, with its logs under ``tmpdir``."""

    def __init__(self, tmpdir: str | os.PathLike, *, host: str = "127.0.0.1") -> None:
        self.dir = Path(tmpdir)
        self.host = host
        self.port: int = 0
        self._as_owner: list[str] = []  # setpriv prefix when running as root
        self._owner: pwd.struct_passwd | None = None
        self._home: Path | None = None  # where data/ and sock/ live
        self._outside: Path | None = None  # a private dir outside tmpdir, if one was needed
        self._sup: Supervisor | None = None
        self._child: Child | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``fmapi`` database."""
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{USER}@{self.host}:{self.port}/{database}"

    @property
    def data_dir(self) -> Path:
        assert self._home is not None, "start() first"
        return self._home / "data"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> PostgresServer:
        """Start the server (initdb first if there is no data yet); return once it accepts."""
        if self.running:
            return self
        bindir = postgres_bin_dir()
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL not found (apt-get install postgresql, or `make system-deps`)"
            )
        self._prepare_dirs()
        fresh = not (self.data_dir / "PG_VERSION").exists()
        if fresh:
            self._initdb(bindir)
        errors = []
        # A free port can be taken between probe and bind: retry with another, but only the
        # first time; a restart must come back on the same port.
        for _ in range(5 if self.port == 0 else 1):
            if self.port == 0 or errors:
                self.port = free_port(self.host)
            err = self._run_postgres(bindir, timeout)
            if err is None:
                if fresh:
                    self._create_database(DATABASE)
                return self
            errors.append(err)
        raise RuntimeError(f"postgres did not start on {self.host}:{self.port}: {errors[-1]}")

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.alive()

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown (open sessions are ended); the data stays for the next start()."""
        child, sup = self._child, self._sup
        self._child = self._sup = None
        if child is None or sup is None:
            return
        if child.alive():
            try:
                os.kill(child.proc.pid, signal.SIGINT)
                child.proc.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                pass  # the supervisor kills what is left
        sup.stop()

    def close(self) -> None:
        """Stop, and delete the data directory if it had to live outside ``tmpdir``."""
        self.stop()
        if self._outside is not None:
            shutil.rmtree(self._outside, ignore_errors=True)
            self._outside = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- databases ---------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` (``[a-z_][a-z0-9_]*``); return its URL."""
        self._create_database(name)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending its sessions first."""
        _check_name(name)
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def _create_database(self, name: str) -> None:
        _check_name(name)
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(host=self.host, port=self.port, user=USER, dbname="postgres",
                               autocommit=True, connect_timeout=5)

    # -- internals ---------------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._home is not None:
            return
        if os.geteuid() == 0:
            try:
                self._owner = pwd.getpwnam(OS_USER)
            except KeyError:
                raise RuntimeError(
                    f"running as root, and there is no {OS_USER!r} user to run PostgreSQL as "
                    "(Debian's postgresql package creates it)"
                ) from None
            self._as_owner = ["setpriv", f"--reuid={OS_USER}", f"--regid={OS_USER}",
                              "--clear-groups", "--pdeathsig", "SIGTERM", "--"]
            if not _others_can_enter(self.dir):
                self._outside = Path(tempfile.mkdtemp(prefix="fmapi-pg-"))
                weakref.finalize(self, shutil.rmtree, str(self._outside), True)
        self._home = self._outside or self.dir
        for d in (self._home, self._home / "data", self._home / "sock"):
            d.mkdir(mode=0o700, exist_ok=True)
            if self._owner is not None:
                os.chown(d, self._owner.pw_uid, self._owner.pw_gid)

    def _initdb(self, bindir: Path) -> None:
        log = self.dir / "logs" / "initdb.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = [*self._as_owner, str(bindir / "initdb"), "-D", str(self.data_dir),
                "--auth=trust", f"--username={USER}", "-E", "UTF8", "--no-locale", "--no-sync"]
        with open(log, "wb") as out:
            rc = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self._home,
                                 stdin=subprocess.DEVNULL)
        if rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"initdb failed (exit {rc}); {log}:\n{tail}")

    def _run_postgres(self, bindir: Path, timeout: float) -> str | None:
        """Start postgres on self.port; None once it accepts connections, else why not."""
        assert self._home is not None
        sockets = self._home / "sock"
        socket_dir = str(sockets) if len(str(sockets)) < _MAX_SOCKET_PATH - 16 else ""
        sup = Supervisor(self.dir / "logs", grace=10.0)
        child = sup.start("postgres", [
            *self._as_owner, str(bindir / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-c", f"listen_addresses={self.host}",
            "-c", f"unix_socket_directories={socket_dir}",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ], cwd=str(self._home))
        self._sup, self._child = sup, child
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while time.monotonic() < deadline:
            if not child.alive():
                break
            try:
                with psycopg.connect(host=self.host, port=self.port, user=USER,
                                     dbname="postgres", connect_timeout=2):
                    return None
            except psycopg.OperationalError as e:
                last = str(e).strip()
            time.sleep(0.05)
        self.stop()
        return f"{last}; last lines of {child.log_path}:\n{child.tail()}"


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"database name {name!r} must match {_NAME.pattern}")


def _others_can_enter(path: Path) -> bool:
    """Whether a user other than the owner can reach ``path`` (every ancestor searchable)."""
    for p in [path, *path.resolve().parents]:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
    return True
