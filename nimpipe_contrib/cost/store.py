"""Where the ledger keeps its records: SQLite (embedded default) or PostgreSQL (fleets).

Both backends hold the same table, ``nimpipe_calls``, with the same columns
and types.  Money is stored as an integer number of nano-dollars
(``cost_nusd``) and times as integer microseconds, so that sums are exact and
the two backends give identical reports; grouping keys are plain text (``day``
is the UTC date, written by the client), and reports are ordered in Python,
never by a database collation.

A record the database refuses (its ``insert`` raises an error that
:meth:`Store.refused` recognises as being about the rows, not the
connection) goes to a second table, ``nimpipe_quarantine``: the record as
JSON, secrets masked, with the error.  Records the database cannot take yet
(it is down, locked for longer than the writer waits, or the writer's queue is
full) wait in a :class:`Spill` file next to it, one JSON line each, until the
writer can commit them.

A store has one writer connection, used only by the ledger's writer thread,
and opens a short-lived connection for every query.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from nimpipe.errors import ConfigError

__all__ = [
    "COLUMNS",
    "INT32_MAX",
    "INT64_MAX",
    "QUARANTINE",
    "QUARANTINE_COLUMNS",
    "SCHEMA_VERSION",
    "TABLE",
    "PostgresStore",
    "SQLiteStore",
    "Spill",
    "Store",
    "mask_url",
    "require_psycopg",
]

#: The table of call records.
TABLE = "nimpipe_calls"
#: Version of the schema, kept in ``nimpipe_meta``.
SCHEMA_VERSION = "1"

#: Columns of ``nimpipe_calls`` in insert order, with their SQL type.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("record_id", "TEXT NOT NULL UNIQUE"),
    ("ts", "DOUBLE PRECISION NOT NULL"),
    ("day", "TEXT NOT NULL"),
    ("turn_id", "TEXT NOT NULL"),
    ("agent_id", "TEXT NOT NULL"),
    ("agent_type", "TEXT NOT NULL"),
    ("route", "TEXT NOT NULL"),
    ("provider", "TEXT NOT NULL"),
    ("model", "TEXT NOT NULL"),
    ("prompt_tokens", "BIGINT NOT NULL"),
    ("completion_tokens", "BIGINT NOT NULL"),
    ("usage_source", "TEXT NOT NULL"),
    ("cost_nusd", "BIGINT NOT NULL"),
    ("price_source", "TEXT NOT NULL"),
    ("latency_us", "BIGINT NOT NULL"),
    ("ttft_us", "BIGINT"),
    ("outcome", "TEXT NOT NULL"),
    ("error", "TEXT"),
    ("attempt", "INTEGER NOT NULL"),
    ("reason", "TEXT NOT NULL"),
    ("routing_reason", "TEXT NOT NULL"),
    ("stream", "INTEGER NOT NULL"),
    ("verdicts", "TEXT NOT NULL"),
    ("host", "TEXT NOT NULL"),
    ("pid", "INTEGER NOT NULL"),
)

#: Records the database refused, kept out of the reports.
QUARANTINE = "nimpipe_quarantine"
#: Columns of ``nimpipe_quarantine`` in insert order.
QUARANTINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ts", "DOUBLE PRECISION NOT NULL"),  # when the record was quarantined
    ("record_id", "TEXT NOT NULL UNIQUE"),
    ("record", "TEXT NOT NULL"),  # the record as JSON, secrets masked
    ("error", "TEXT NOT NULL"),  # why it was refused
    ("host", "TEXT NOT NULL"),
    ("pid", "INTEGER NOT NULL"),
)
#: The largest ``BIGINT`` (SQLite ``INTEGER`` is the same 64 bits).
INT64_MAX = 2**63 - 1
#: The largest PostgreSQL ``INTEGER`` (``attempt``, ``stream``, ``pid``).
INT32_MAX = 2**31 - 1

_INDEXES = (
    f"CREATE INDEX IF NOT EXISTS nimpipe_calls_ts ON {TABLE} (ts)",
    f"CREATE INDEX IF NOT EXISTS nimpipe_calls_agent_ts ON {TABLE} (agent_id, ts)",
)
_META = "CREATE TABLE IF NOT EXISTS nimpipe_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


def _table_sql(
    id_column: str, table: str = TABLE, columns: Sequence[tuple[str, str]] = COLUMNS
) -> str:
    body = ",\n  ".join([id_column, *(f"{name} {kind}" for name, kind in columns)])
    return f"CREATE TABLE IF NOT EXISTS {table} (\n  {body}\n)"


def _insert_sql(table: str, mark: str) -> str:
    # Only a known record_id is skipped (a batch retried after a lost commit);
    # any other constraint is an error, never a silently dropped row.
    columns = COLUMNS if table == TABLE else QUARANTINE_COLUMNS
    names = ", ".join(name for name, _ in columns)
    marks = ", ".join([mark] * len(columns))
    return f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT (record_id) DO NOTHING"


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and reports)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0] + ":***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc[1]}"))


class Store(Protocol):
    """A backend: one writer connection plus short-lived query connections."""

    #: ``sqlite`` or ``postgresql``.
    kind: str
    #: Where the records live, without secrets (a path or a masked URL).
    where: str
    #: The placeholder of a query parameter (``?`` or ``%s``).
    param: str

    def open_writer(self) -> None:
        """Connect the writer and create the schema if needed."""

    def insert(self, rows: Sequence[tuple[Any, ...]], table: str = TABLE) -> None:
        """Insert ``rows`` into ``table`` in one transaction (ids already present are skipped).

        ``table`` is :data:`TABLE` or :data:`QUARANTINE`.  ``insert([])`` takes
        the write lock and commits nothing: it tells whether the database
        takes writes.
        """

    def refused(self, exc: BaseException) -> bool:
        """Whether ``exc`` from :meth:`insert` is about the rows, so retrying them cannot help.

        Anything else (a lock, a lost connection, a full disk) is transient.
        """

    def close_writer(self) -> None:
        """Close the writer connection (no error if not open)."""

    def exists(self) -> bool:
        """Whether the ledger has been created at all."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query on a fresh connection; ``[]`` if there is no ledger yet."""

    def count(self, table: str) -> int:
        """Rows in ``table``; 0 when it does not exist."""


# --------------------------------------------------------------------------
# SQLite
# --------------------------------------------------------------------------


class SQLiteStore:
    """The embedded ledger: one SQLite file in WAL mode, safe for several processes.

    ``synchronous="full"`` fsyncs the write-ahead log at every commit: a
    committed batch survives a power cut as well as ``kill -9``.
    ``"normal"`` survives a process crash but may lose the last commits on a
    power cut; the writer commits once per batch, so FULL costs one fsync per
    batch, not per call, and is the default.
    """

    kind = "sqlite"
    param = "?"

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: str = "full", busy_timeout: float = 10.0
    ) -> None:
        self.path = Path(path).expanduser()
        self.where = str(self.path)
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self._writer: sqlite3.Connection | None = None

    def _connect(self, *, create: bool) -> sqlite3.Connection:
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            uri = f"file:{self.path}?mode=rwc"
        else:
            uri = f"file:{self.path}?mode=rw"
        conn = sqlite3.connect(
            uri,
            uri=True,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return conn

    def open_writer(self) -> None:
        if self._writer is not None:
            return
        conn = self._connect(create=True)
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch {self.path} to WAL (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(_table_sql("id INTEGER PRIMARY KEY"))
                conn.execute(_table_sql("id INTEGER PRIMARY KEY", QUARANTINE, QUARANTINE_COLUMNS))
                for sql in _INDEXES:
                    conn.execute(sql)
                conn.execute(_META)
                conn.execute(
                    "INSERT OR IGNORE INTO nimpipe_meta (key, value) VALUES ('schema_version', ?)",
                    (SCHEMA_VERSION,),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        self._writer = conn

    def insert(self, rows: Sequence[tuple[Any, ...]], table: str = TABLE) -> None:
        conn = self._writer
        if conn is None:
            raise sqlite3.OperationalError("the ledger writer is not connected")
        sql = _insert_sql(table, "?")
        # IMMEDIATE takes the write lock up front, so that two writers wait for
        # each other (busy_timeout) instead of failing on a lock upgrade.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def refused(self, exc: BaseException) -> bool:
        # Binding a value (an int beyond 64 bits, text that is not Unicode) or a
        # constraint (a trigger's RAISE(ABORT), NOT NULL) refuses these rows;
        # OperationalError (locked, I/O, disk full) and ProgrammingError (the
        # schema) are about the database.
        return isinstance(
            exc,
            (
                sqlite3.IntegrityError,
                sqlite3.DataError,
                sqlite3.InterfaceError,
                OverflowError,
                TypeError,
                ValueError,
            ),
        )

    def close_writer(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def exists(self) -> bool:
        if not self.path.is_file():
            return False
        return bool(
            self.query("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,))
        )

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if not self.path.is_file():
            return []
        conn = self._connect(create=False)
        try:
            return conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def count(self, table: str) -> int:
        rows = self.query(f"SELECT COUNT(*) FROM {table}")
        return int(rows[0][0]) if rows else 0


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------

#: Key of the advisory lock that serialises schema creation between hosts.
_SCHEMA_LOCK = 0x6E696D70  # "nimp"


def require_psycopg() -> Any:
    """Import psycopg 3, or fail with the extra to install."""
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            "a PostgreSQL ledger needs psycopg 3: pip install 'nimpipe[postgres]'",
            key="stages.ledger.url",
        ) from None
    return psycopg


class PostgresStore:
    """A ledger shared by a fleet: the same table in a PostgreSQL database.

    Durability is the server's: a commit returns once PostgreSQL has made it
    durable (``synchronous_commit``).  Inserts skip rows whose ``record_id``
    is already stored, so a batch retried after a lost connection is never
    counted twice.
    """

    kind = "postgresql"
    param = "%s"

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        self.url = url
        self.where = mask_url(url)
        self.connect_timeout = connect_timeout
        self._writer: Any = None

    def _connect(self) -> Any:
        psycopg = require_psycopg()
        return psycopg.connect(self.url, connect_timeout=max(1, int(self.connect_timeout)))

    def open_writer(self) -> None:
        if self._writer is not None:
            return
        conn = self._connect()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(_table_sql("id BIGSERIAL PRIMARY KEY"))
                conn.execute(_table_sql("id BIGSERIAL PRIMARY KEY", QUARANTINE, QUARANTINE_COLUMNS))
                for sql in _INDEXES:
                    conn.execute(sql)
                conn.execute(_META)
                conn.execute(
                    "INSERT INTO nimpipe_meta (key, value) VALUES ('schema_version', %s) "
                    "ON CONFLICT (key) DO NOTHING",
                    (SCHEMA_VERSION,),
                )
        except BaseException:
            conn.close()
            raise
        self._writer = conn

    def insert(self, rows: Sequence[tuple[Any, ...]], table: str = TABLE) -> None:
        conn = self._writer
        if conn is None:
            raise RuntimeError("the ledger writer is not connected")
        sql = _insert_sql(table, "%s")
        try:
            with conn.transaction():
                if not rows:
                    conn.execute("SELECT 1")
                else:
                    with conn.cursor() as cur:
                        cur.executemany(sql, rows)
        except BaseException:
            # A broken connection is replaced on the next attempt.
            self.close_writer()
            raise

    def refused(self, exc: BaseException) -> bool:
        # DataError: a value out of range, text with NUL or not UTF-8;
        # IntegrityError: a constraint.  Connection, lock and server errors
        # (OperationalError, InterfaceError, InternalError) are transient.
        psycopg = require_psycopg()
        return isinstance(
            exc,
            (psycopg.DataError, psycopg.IntegrityError, OverflowError, TypeError, ValueError),
        )

    def close_writer(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def exists(self) -> bool:
        with self._session() as conn:
            return self._present(conn)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._session() as conn:
            if not self._present(conn):
                return []
            return list(conn.execute(sql, tuple(params)).fetchall())

    def count(self, table: str) -> int:
        with self._session() as conn:
            if not self._present(conn, table):
                return 0
            return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    @staticmethod
    def _present(conn: Any, table: str = TABLE) -> bool:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        return bool(row[0])

    @contextlib.contextmanager
    def _session(self) -> Iterator[Any]:
        conn = self._connect()
        try:
            yield conn
        finally:
            with contextlib.suppress(Exception):
                conn.rollback()
            conn.close()


# --------------------------------------------------------------------------
# The spill file: records waiting for the database
# --------------------------------------------------------------------------

_SPILL_NAME = re.compile(r"^spill-(?P<host>.+)-(?P<pid>\d+)-(?P<token>[0-9a-f]+)\.jsonl(?:\..+)?$")


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]", "_", text) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spill:
    """Records the database cannot take yet: one JSON line each, in a file of this process.

    Each process appends to its own file, ``spill-HOST-PID-TOKEN.jsonl`` in
    ``directory``, at most ``limit`` lines at a time.  :meth:`claim` hands the
    writer this process's file and the files of processes on this host that
    are gone (a killed process's spill is written by the next ledger on the
    host), each renamed first so that nothing appends to it while it is read.
    Lines are flushed to the operating system as they are written: they
    survive ``kill -9`` of the process, not a power cut.
    """

    def __init__(self, directory: Path, host: str, token: str, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self.token = token
        self._host = _file_safe(host)
        self._name = f"spill-{self._host}-{os.getpid()}-{token}.jsonl"
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._claims = 0
        #: Lines in this process's current spill file.
        self.pending = 0

    @property
    def path(self) -> Path:
        """This process's spill file."""
        return self.directory / self._name

    def append(self, lines: Sequence[str]) -> int:
        """Append ``lines`` (each one JSON document); returns how many fit under ``limit``.

        Raises :class:`OSError` when the file cannot be written.
        """
        with self._lock:
            take = list(lines[: max(0, self.limit - self.pending)])
            if not take:
                return 0
            if self._file is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._file.write("".join(f"{line}\n" for line in take))
            self._file.flush()
            self.pending += len(take)
            return len(take)

    def claim(self, live_tokens: set[str]) -> list[Path]:
        """This process's file and orphaned ones, renamed for reading (oldest first).

        A file is an orphan when its process is gone, or when it is this
        process's but of a ledger no longer open (its token is not in
        ``live_tokens``).  The caller reads each claimed file, then deletes it.
        """
        claimed: list[Path] = []
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self.pending and self.path.exists():
                claimed.append(self._rename(self.path))
            self.pending = 0
        if not self.directory.is_dir():
            return claimed
        pid = os.getpid()
        candidates = []
        for path in self.directory.iterdir():
            match = _SPILL_NAME.match(path.name)
            if match is None or path in claimed or match["host"] != self._host:
                continue
            owner = int(match["pid"])
            if owner == pid and match["token"] in live_tokens:
                continue
            if owner != pid and _alive(owner):
                continue
            candidates.append(path)
        for path in sorted(candidates, key=_mtime):
            with contextlib.suppress(FileNotFoundError):  # another process claimed it first
                claimed.append(self._rename(path))
        return claimed

    def _rename(self, path: Path) -> Path:
        self._claims += 1
        target = self.directory / f"{self._name}.{self._claims}.draining"
        os.replace(path, target)
        return target

    def close(self) -> None:
        """Close this process's file (lines already written stay for the next writer)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    @staticmethod
    def waiting(directory: Path, name: str | None = None) -> int:
        """Lines in every spill file in ``directory`` (all processes), or in file ``name``."""
        if not directory.is_dir():
            return 0
        total = 0
        for path in directory.iterdir():
            if path.name == name if name is not None else _SPILL_NAME.match(path.name):
                with contextlib.suppress(OSError), path.open("rb") as f:
                    total += sum(1 for _ in f)
        return total

    @staticmethod
    def read(path: Path) -> Iterator[Any]:
        """The JSON documents of a claimed file; ``None`` for a line that cannot be read.

        (The last line of a file whose process was killed mid-write may be cut.)
        """
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except ValueError:
                    yield None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
