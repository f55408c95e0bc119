"""Where the ledger keeps its records: SQLite (embedded default) or PostgreSQL (fleets).

Both backends hold the same table, ``nimpipe_calls``, with the same columns
and types.  Money is stored as an integer number of nano-dollars
(``cost_nusd``) and times as integer microseconds, so that sums are exact and
the two backends give identical reports; grouping keys are plain text (``day``
is the UTC date, written by the client), and reports are ordered in Python,
never by a database collation.

A store has one writer connection, used only by the ledger's writer thread,
and opens a short-lived connection for every query.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from nimpipe.errors import ConfigError

__all__ = [
    "COLUMNS",
    "SCHEMA_VERSION",
    "TABLE",
    "PostgresStore",
    "SQLiteStore",
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

_NAMES = ", ".join(name for name, _ in COLUMNS)
_INDEXES = (
    f"CREATE INDEX IF NOT EXISTS nimpipe_calls_ts ON {TABLE} (ts)",
    f"CREATE INDEX IF NOT EXISTS nimpipe_calls_agent_ts ON {TABLE} (agent_id, ts)",
)
_META = "CREATE TABLE IF NOT EXISTS nimpipe_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


def _table_sql(id_column: str) -> str:
    body = ",\n  ".join([id_column, *(f"{name} {kind}" for name, kind in COLUMNS)])
    return f"CREATE TABLE IF NOT EXISTS {TABLE} (\n  {body}\n)"


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

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert ``rows`` in one transaction (rows already present are skipped)."""

    def close_writer(self) -> None:
        """Close the writer connection (no error if not open)."""

    def exists(self) -> bool:
        """Whether the ledger has been created at all."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query on a fresh connection; ``[]`` if there is no ledger yet."""


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

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        conn = self._writer
        if conn is None:
            raise sqlite3.OperationalError("the ledger writer is not connected")
        marks = ", ".join("?" * len(COLUMNS))
        # IMMEDIATE takes the write lock up front, so that two writers wait for
        # each other (busy_timeout) instead of failing on a lock upgrade.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(f"INSERT OR IGNORE INTO {TABLE} ({_NAMES}) VALUES ({marks})", rows)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

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

    def insert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        conn = self._writer
        if conn is None:
            raise RuntimeError("the ledger writer is not connected")
        marks = ", ".join(["%s"] * len(COLUMNS))
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {TABLE} ({_NAMES}) VALUES ({marks}) "
                    "ON CONFLICT (record_id) DO NOTHING",
                    rows,
                )
        except BaseException:
            # A broken connection is replaced on the next attempt.
            self.close_writer()
            raise

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

    @staticmethod
    def _present(conn: Any) -> bool:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,)).fetchone()
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
