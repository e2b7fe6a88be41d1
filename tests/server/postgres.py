"""A private PostgreSQL server for the test session: Debian's binaries, a temporary cluster, loopback.

Offers:
    find_binaries() -> Path | None        /usr/lib/postgresql/<newest>/bin, if initdb and postgres are there
    start_postgres() -> PostgresServer    initdb into a temp dir and start ``postgres`` on a free port
    PostgresServer
      .url(database) -> str               postgresql+psycopg://glassbox@127.0.0.1:<port>/<database>
      .create_database(prefix) -> str     a new empty database's URL (a fresh one per test)
      .stop()                             fast shutdown, then the temp dir is deleted
    Unavailable                           why no server could be started (tests skip with it)

    server = start_postgres()
    store = JobStore(server.create_database("store"))
    ...
    server.stop()

PostgreSQL refuses to run as root, and tests run as root here and in CI: then initdb and postgres
run as the ``postgres`` system user that Debian's package creates (the temp dir is handed to it);
otherwise as the current user. The cluster trusts local connections (it listens on 127.0.0.1 and
a socket in its own 0700 directory only) and skips fsync: it lives as long as the test session.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from waiting import HANG, REQUEST

__all__ = ["PostgresServer", "Unavailable", "find_binaries", "start_postgres"]

SUPERUSER = "glassbox"  # the cluster's superuser: the role every test URL connects as
# Limits that only stop hangs: on a busy machine initdb and the first connection can take minutes,
# and a server that did not start in time would skip (not fail) every PostgreSQL test.
_START_SECONDS = HANG
_CONNECT_SECONDS = int(REQUEST)
_names = itertools.count(1)


class Unavailable(Exception):
    """No private PostgreSQL server can be started here; the message says why."""


def find_binaries() -> Path | None:
    """The bin dir of the newest Debian PostgreSQL (scripts/setup_system.sh installs it)."""
    found = []
    for bin_dir in Path("/usr/lib/postgresql").glob("*/bin"):
        if (bin_dir / "initdb").exists() and (bin_dir / "postgres").exists():
            version = bin_dir.parent.name
            found.append((int(version) if version.isdigit() else 0, bin_dir))
    return max(found)[1] if found else None


class PostgresServer:
    """A running private cluster (see the module docstring)."""

    def __init__(self, process: subprocess.Popen, port: int, root: Path, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.root = root
        self.log_path = log_path

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def create_database(self, prefix: str = "test") -> str:
        """Create a new empty database (named ``<prefix>_<n>``) and return its SQLAlchemy URL."""
        name = f"{prefix}_{next(_names)}"
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT: open connections are ended), then delete the cluster."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def _admin(self):
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True, connect_timeout=_CONNECT_SECONDS) as conn:
            yield conn


def _as_postgres_user() -> dict:
    """Popen arguments that drop root to the ``postgres`` user; none when not root."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise Unavailable("running as root and there is no 'postgres' user to run PostgreSQL as (it "
                          "refuses to run as root; scripts/setup_system.sh installs it)") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _free_port() -> int:
    """A free loopback port, below the kernel's ephemeral range (glassbox.cli.free_port): the port is
    bound only later, and one of that range may meanwhile be taken by any outgoing connection."""
    from glassbox.cli import free_port

    return free_port()


def start_postgres(attempts: int = 3) -> PostgresServer:
    """initdb a new cluster in a temp dir and start it on a free loopback port (see the module
    docstring). Raises ``Unavailable`` when the binaries, psycopg or a usable user are missing."""
    bin_dir = find_binaries()
    if bin_dir is None:
        raise Unavailable("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); "
                          "run scripts/setup_system.sh")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Unavailable("psycopg is not installed: pip install -e '.[postgres]'") from None
    drop = _as_postgres_user()
    # Not under pytest's tmp dirs: those are 0700 root-owned, so the postgres user could not enter.
    root = Path(tempfile.mkdtemp(prefix="glassbox-pg-"))
    try:
        if drop:
            os.chown(root, drop["user"], drop["group"])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(root),
               "TZ": "UTC"}
        data = root / "data"
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
             "--no-sync", "--no-instructions"],
            capture_output=True, text=True, env=env, timeout=HANG, cwd=root, **drop,
        )
        if initdb.returncode != 0:
            raise Unavailable(f"initdb failed ({initdb.returncode}):\n{initdb.stdout}{initdb.stderr}")
        log_path = root / "postgres.log"
        for _attempt in range(attempts):
            server = _launch(bin_dir, data, root, log_path, env, drop)
            if server is not None:
                return server
        raise Unavailable(f"postgres did not start:\n{log_path.read_text(errors='replace')}")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _launch(bin_dir: Path, data: Path, root: Path, log_path: Path, env: dict, drop: dict
            ) -> PostgresServer | None:
    """Start postgres once; None if it exited early (e.g. the free port was taken meanwhile)."""
    import psycopg

    port = _free_port()
    command = [
        str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
        "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
        # A throwaway cluster: durability is not under test, speed is welcome.
        "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
    ]
    with open(log_path, "ab") as log:
        if drop:
            os.chown(log_path, drop["user"], drop["group"])
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=root, **drop)
    server = PostgresServer(process, port, root, log_path)
    deadline = time.monotonic() + _START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user=SUPERUSER, dbname="postgres",
                                 connect_timeout=_CONNECT_SECONDS):
                return server
        except psycopg.OperationalError:  # refused: not listening yet
            time.sleep(0.1)  # nothing to wait on but the port (and the process): poll it
    process.kill()
    process.wait(30)
    raise Unavailable(f"postgres did not accept connections within {_START_SECONDS:g} s:\n{server.output()}")
