"""A throwaway PostgreSQL server for the ledger tests.

Import the fixtures from a test module::

    from pg_fixture import pg_url, postgres_server  # noqa: F401

``postgres_server`` (session) runs ``initdb`` and ``pg_ctl start`` on a fresh
temporary directory, on a free loopback port, and stops the postmaster by its
process id at the end.  PostgreSQL refuses to run as root, so as root the
binaries run as the ``postgres`` user (``runuser``) on a directory it owns.
``pg_url`` (per test) creates an empty database and drops it afterwards.

Both skip, with the reason, when the PostgreSQL binaries or psycopg are
missing, unless ``NIMPIPE_REQUIRE_POSTGRES`` is set: then they fail.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_databases = itertools.count(1)


def _unavailable(message: str) -> None:
    if os.environ.get("NIMPIPE_REQUIRE_POSTGRES"):
        pytest.fail(f"{message} (NIMPIPE_REQUIRE_POSTGRES is set)")
    pytest.skip(message)


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(pid: int) -> None:
    # SIGINT is PostgreSQL's "fast" shutdown: clients are disconnected, data is flushed.
    for sig, wait in ((signal.SIGINT, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of the ``postgres`` database of a throwaway PostgreSQL server."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'nimpipe[postgres]')")
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        _unavailable("PostgreSQL binaries (initdb, pg_ctl) not found")
    assert initdb is not None and pg_ctl is not None
    as_root = os.geteuid() == 0
    prefix: list[str] = []
    if as_root:
        if shutil.which("runuser") is None:
            _unavailable("running as root and runuser is missing: cannot start PostgreSQL")
        prefix = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's tmp_path: its parents are private to root.
    base = Path(tempfile.mkdtemp(prefix="nimpipe-pg-"))
    data = base / "data"
    pid: int | None = None
    try:
        if as_root:
            shutil.chown(base, "postgres")
        port = _free_port()
        done = subprocess.run(
            [*prefix, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync",
             "-E", "UTF8", "--locale=C"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"initdb failed: {done.stderr[-2000:]}")
        options = f"-p {port} -k {base} -h 127.0.0.1 -F -c max_connections=50"
        done = subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"),
             "-w", "-t", "60", "start"],
            capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip
        pid_file = data / "postmaster.pid"
        if pid_file.is_file():
            pid = int(pid_file.read_text().split()[0])
        if done.returncode != 0:
            log = (base / "log").read_text() if (base / "log").is_file() else ""
            pytest.fail(f"pg_ctl start failed: {done.stderr[-1000:]} {log[-2000:]}")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if pid is not None:
            _stop(pid)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server: str) -> Iterator[str]:
    """URL of a fresh, empty database on the test server (dropped after the test)."""
    import psycopg

    name = f"nimpipe_test_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield postgres_server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
