"""The ledger's writer: a queue, a thread that commits it in batches, and the spill file.

:class:`Writer` is the writing half of :class:`~nimpipe_contrib.cost.ledger.Ledger`
(see there for what it guarantees): ``record`` queues a record, a daemon thread
turns queued records into rows (:mod:`.rows`) and commits them one
transaction per batch, quarantines what is impossible or refused, retries an
unavailable database and keeps what it cannot write in a
:class:`~nimpipe_contrib.cost.store.Spill` file until the database takes it.
Writers still running at interpreter exit are closed (their queues flushed).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import queue
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from nimpipe.errors import NimpipeError
from nimpipe.types import CallRecord
from nimpipe_contrib.cost.rows import call_row, error_text, quarantine_row, record_json
from nimpipe_contrib.cost.store import (
    COLUMNS,
    QUARANTINE,
    QUARANTINE_COLUMNS,
    TABLE,
    Spill,
    Store,
)
from nimpipe_contrib.cost.telemetry import Telemetry

__all__ = ["QUARANTINE_FILE", "Writer", "spill_dir_of"]

logger = logging.getLogger("nimpipe.ledger")

#: The quarantine of last resort, in the spill directory, for records the database
#: refuses even in its quarantine table.
QUARANTINE_FILE = "quarantine.jsonl"


def spill_dir_of(store: Store) -> Path:
    """Beside an SQLite file (``ledger.sqlite-spill``); per database under ``$NIMPIPE_HOME``."""
    path = getattr(store, "path", None)
    if isinstance(path, Path):
        return path.with_name(path.name + "-spill")
    from nimpipe.paths import nimpipe_home

    digest = hashlib.sha256(store.where.encode("utf-8")).hexdigest()[:16]
    return nimpipe_home() / "ledger-spill" / f"{store.kind}-{digest}"


_STOP = object()
#: ``_insert`` gave up on a database that stays unavailable.
_GAVE_UP = object()
#: Tokens of the ledgers open in this process (their spill files are not orphans).
_live_tokens: set[str] = set()
_ROW_WIDTH = len(COLUMNS)
_QUARANTINE_WIDTH = len(QUARANTINE_COLUMNS)


@attrs.frozen
class _Entry:
    """A record on its way to the database: a row of ``nimpipe_calls`` or of the quarantine."""

    record_id: str
    row: tuple[Any, ...] | None = None
    quarantine: tuple[Any, ...] | None = None
    #: The record itself, for OpenTelemetry (``None`` once it went through the spill file).
    record: Any = None

    def line(self) -> str:
        if self.row is not None:
            return json.dumps({"row": list(self.row)}, allow_nan=False)
        return json.dumps({"quarantine": list(self.quarantine or ())}, allow_nan=False)

    @classmethod
    def from_line(cls, data: Any) -> _Entry | None:
        if not isinstance(data, dict):
            return None
        row, held = data.get("row"), data.get("quarantine")
        if isinstance(row, list) and len(row) == _ROW_WIDTH and isinstance(row[0], str):
            return cls(row[0], row=tuple(row))
        if isinstance(held, list) and len(held) == _QUARANTINE_WIDTH and isinstance(held[1], str):
            return cls(held[1], quarantine=tuple(held))
        return None


class Writer:
    """The writing half of a ledger: queue, batch writer thread, quarantine and spill file.

    See :class:`~nimpipe_contrib.cost.ledger.Ledger` for the guarantees and
    the keywords.
    """

    def __init__(
        self,
        store: Store,
        *,
        flush_interval: float = 0.5,
        batch_size: int = 256,
        max_pending: int = 100_000,
        close_timeout: float = 10.0,
        queue_wait: float = 0.1,
        retry_timeout: float = 30.0,
        max_spill: int = 100_000,
        spill_dir: str | os.PathLike[str] | None = None,
        on_commit: Callable[[Sequence[str]], None] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.batch_size = max(1, batch_size)
        self.max_pending = max(1, max_pending)
        self.close_timeout = close_timeout
        self.queue_wait = max(0.0, queue_wait)
        self.retry_timeout = max(0.0, retry_timeout)
        self.max_spill = max(0, max_spill)
        #: Where the spill files (and the quarantine file of last resort) go.
        self.spill_dir = Path(spill_dir) if spill_dir is not None else spill_dir_of(store)
        self.on_commit = on_commit
        self._telemetry = telemetry
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._closed = False
        self._close_deadline = 0.0
        self._origin = ""
        self._host = ""
        self._ids = itertools.count(1)
        self._spill: Spill | None = None
        #: Items the writer has taken off the queue, and that count when a wait ran out.
        self._taken = 0
        self._stalled_at = -1
        #: Whether the database gave up on a batch and has not taken one since.
        self._down = False
        self._probe_at = 0.0
        self._probe_delay = 1.0
        self._said: dict[str, float] = {}
        #: Records committed, and records lost (neither committed, quarantined nor spilled).
        self.committed = 0
        self.lost = 0
        #: Failed commit attempts (each retried or spilled).
        self.write_failures = 0
        #: Records quarantined (impossible figures, or refused by the database).
        self.quarantined = 0
        #: Records written to the spill file (a record re-spilled counts again).
        self.spilled = 0

    @property
    def where(self) -> str:
        """Where the records live (a path or a URL without its password)."""
        return f"{self.store.kind}:{self.store.where}"

    # -- writing ------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (the first :meth:`record` does it too)."""
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is not None:
                return
            if self._closed:
                raise NimpipeError(f"the ledger at {self.where} is closed")
            self._host = socket.gethostname()
            token = secrets.token_hex(4)
            self._origin = f"{self._host}:{os.getpid()}:{token}"
            self._spill = Spill(self.spill_dir, self._host, token, self.max_spill)
            _live_tokens.add(token)
            thread = threading.Thread(target=self._run, name="nimpipe-ledger", daemon=True)
            thread.start()
            self._thread = thread
            _open_writers.add(self)

    def record(
        self, record: CallRecord, routing_reason: str = "", *, deadline: float | None = None
    ) -> None:
        """Queue ``record`` for the writer; returns at once unless the queue is full.

        On a full queue it waits at most ``queue_wait`` seconds, and at most
        half the time left before ``deadline`` (a :func:`time.monotonic`
        value, the turn's, which must still return its answer), then keeps
        the record in the spill file.
        """
        if self._thread is None:
            self.start()
        elif self._closed:
            raise NimpipeError(f"the ledger at {self.where} is closed")
        item = (record, routing_reason, next(self._ids))
        if self._queue.qsize() >= self.max_pending and not self._wait_for_room(deadline):
            self._keep([self._prepare(*item)], "the writer's queue is full")
            return
        self._queue.put(item)

    def _wait_for_room(self, deadline: float | None) -> bool:
        taken = self._taken
        if taken == self._stalled_at:
            return False  # the writer has taken nothing since the last wait ran out
        now = time.monotonic()
        end = now + self.queue_wait
        if deadline is not None:
            # Half the time left at most: the turn still has its answer to return.
            end = min(end, now + max(0.0, deadline - now) / 2)
        self._say(
            "full",
            "ledger %s: %d records waiting to be written; the writer is behind",
            self.where,
            self._queue.qsize(),
        )
        while self._queue.qsize() >= self.max_pending and not self._closed:
            if time.monotonic() >= end:
                if self._taken == taken:
                    self._stalled_at = taken
                return False
            time.sleep(0.002)
        return not self._closed

    @property
    def pending(self) -> int:
        """Records queued or in this process's spill file, not yet committed (approximate)."""
        return self._queue.qsize() + (self._spill.pending if self._spill is not None else 0)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record queued so far is committed (or quarantined).

        ``False`` on timeout, or when records still wait in the spill file
        because the database does not take them.
        """
        if self._thread is None or not self._thread.is_alive():
            return self._queue.empty() and not self._spill_waiting()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout) and not self._spill_waiting()

    def close(self, timeout: float | None = None) -> None:
        """Commit what is queued and stop the writer (idempotent).

        Keeps retrying a failing database for ``timeout`` seconds (default
        ``close_timeout``); records still unwritten then stay in the spill
        file for the next ledger on this host, with a warning on the
        ``nimpipe.ledger`` logger.
        """
        wait = self.close_timeout if timeout is None else timeout
        with self._start_lock:
            if self._closed:
                return
            self._close_deadline = time.monotonic() + wait
            self._closed = True
        thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join(wait + 5.0)
            if thread.is_alive():
                logger.error("ledger %s: the writer did not stop within %.0f s", self.where, wait)
        if self._spill is not None:
            _live_tokens.discard(self._spill.token)
        _open_writers.discard(self)

    # -- the writer thread -----------------------------------------------------

    def _run(self) -> None:
        batch: list[tuple[Any, Any, int]] = []
        waiters: list[threading.Event] = []
        deadline = 0.0
        stop = False
        get = self._queue.get
        self._drain()  # what a process that is gone left in its spill file
        while not stop:
            if batch:
                timeout: float | None = max(0.0, deadline - time.monotonic())
            elif self._spill_waiting():
                timeout = max(0.05, self._probe_at - time.monotonic()) if self._down else 0.05
            else:
                timeout = None
            try:
                item = get(timeout=timeout)
            except queue.Empty:
                item = None
            due = item is None
            while item is not None:
                self._taken += 1
                if item is _STOP:
                    stop = due = True
                    break
                if isinstance(item, threading.Event):
                    waiters.append(item)
                    due = True
                    break
                if not batch:
                    deadline = time.monotonic() + self.flush_interval
                batch.append(item)
                if len(batch) >= self.batch_size:
                    due = True
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            if due:
                if batch:
                    self._commit([self._prepare(*item) for item in batch])
                    batch = []
                if self._spill_waiting() and self._may_drain():
                    self._drain()
                for waiter in waiters:
                    waiter.set()
                waiters = []
        if self._spill is not None:
            if self._spill.pending:
                logger.warning(
                    "ledger %s: %d records wait in %s; the next ledger on this host writes them",
                    self.where,
                    self._spill.pending,
                    self._spill.path,
                )
            self._spill.close()
        self.store.close_writer()

    def _prepare(self, record: Any, routing_reason: Any, number: int) -> _Entry:
        """The row of ``record``, or its quarantine row when its figures are impossible."""
        record_id = f"{self._origin}:{number}"
        problems: list[str] = []
        try:
            row = call_row(record, routing_reason, record_id, self._host, problems)
        except Exception as exc:  # a stage's own record type, missing fields
            problems.append(f"unreadable record: {type(exc).__name__}: {error_text(exc)}")
        if problems:
            error = "impossible figures: " + "; ".join(problems)
            try:
                data = record_json(record, routing_reason)
            except Exception as exc:
                data = json.dumps({"unreadable": error_text(exc)})
            return _Entry(record_id, quarantine=quarantine_row(record_id, data, error, self._host))
        return _Entry(record_id, row=row, record=record)

    def _commit(self, entries: Sequence[_Entry]) -> None:
        held = [e for e in entries if e.quarantine is not None]
        if held:
            self._hold(held)
        rows = [e for e in entries if e.row is not None]
        if rows:
            self._write(rows)

    def _write(self, entries: Sequence[_Entry]) -> None:
        """Commit ``entries``; split a batch the database refuses to find the refused ones."""
        result = self._insert(TABLE, [e.row for e in entries if e.row is not None])
        if result is None:
            self._committed(entries)
        elif result is _GAVE_UP:
            self._keep(entries, "the database is unavailable")
        elif len(entries) > 1:
            middle = len(entries) // 2
            self._write(entries[:middle])
            self._write(entries[middle:])
        else:
            (entry,) = entries
            assert entry.row is not None
            names = [name for name, _ in COLUMNS]
            data = json.dumps(dict(zip(names, entry.row, strict=True)))
            error = f"refused by the database: {type(result).__name__}: {error_text(result)}"
            row = quarantine_row(entry.record_id, data, error, self._host)
            self._hold([_Entry(entry.record_id, quarantine=row)])

    def _hold(self, entries: Sequence[_Entry]) -> None:
        """Quarantine ``entries``: the quarantine table, else the quarantine file."""
        rows = [e.quarantine for e in entries if e.quarantine is not None]
        result = self._insert(QUARANTINE, rows)
        if result is _GAVE_UP:
            self._keep(entries, "the database is unavailable")
            return
        if result is not None:
            try:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                names = [name for name, _ in QUARANTINE_COLUMNS]
                with (self.spill_dir / QUARANTINE_FILE).open("a", encoding="utf-8") as f:
                    f.writelines(json.dumps(dict(zip(names, r, strict=True))) + "\n" for r in rows)
            except OSError as exc:
                with self._count_lock:
                    self.lost += len(rows)
                logger.error(
                    "ledger %s: %d refused records lost: the database refuses the quarantine "
                    "(%s) and %s cannot be written (%s)",
                    self.where,
                    len(rows),
                    error_text(result),
                    self.spill_dir / QUARANTINE_FILE,
                    exc,
                )
                return
        with self._count_lock:
            self.quarantined += len(rows)
        where = QUARANTINE if result is None else str(self.spill_dir / QUARANTINE_FILE)
        for row in rows:
            self._say(
                "quarantine",
                "ledger %s: record %s quarantined in %s, not counted in reports: %s",
                self.where,
                row[1],
                where,
                row[3],
            )

    def _insert(self, table: str, rows: list[Any]) -> Any:
        """``None`` once committed, the error if the database refuses the rows, or ``_GAVE_UP``."""
        delay = 0.05
        give_up = time.monotonic() + (0.0 if self._down else self.retry_timeout)
        while True:
            try:
                self.store.open_writer()
                self.store.insert(rows, table)
            except Exception as exc:
                if self.store.refused(exc):
                    return exc
                self.write_failures += 1
                now = time.monotonic()
                limit = min(give_up, self._close_deadline) if self._closed else give_up
                if isinstance(exc, (OSError, RuntimeError)) or self.store.kind != "sqlite":
                    self.store.close_writer()
                if now >= limit:
                    if not self._down:
                        logger.warning(
                            "ledger %s: cannot write (%s: %s); records wait in %s until the "
                            "database takes them",
                            self.where,
                            type(exc).__name__,
                            error_text(exc),
                            self.spill_dir,
                        )
                    self._down = True
                    self._probe_at = now + self._probe_delay
                    self._probe_delay = min(self._probe_delay * 2, 30.0)
                    return _GAVE_UP
                if self.write_failures in (1, 10) or self.write_failures % 100 == 0:
                    logger.warning(
                        "ledger %s: cannot write %d records (will retry): %s: %s",
                        self.where,
                        len(rows),
                        type(exc).__name__,
                        error_text(exc),
                    )
                time.sleep(min(delay, max(0.0, limit - now)))
                delay = min(delay * 2, 2.0)
            else:
                if self._down:
                    logger.warning("ledger %s: the database takes writes again", self.where)
                self._down = False
                self._probe_delay = 1.0
                return None

    def _committed(self, entries: Sequence[_Entry]) -> None:
        with self._count_lock:
            self.committed += len(entries)
        if self.on_commit is not None:
            try:
                self.on_commit([e.record_id for e in entries])
            except Exception:
                logger.exception("ledger %s: on_commit callback failed", self.where)
        if self._telemetry is not None:
            for entry in entries:
                if entry.record is None:
                    continue
                try:
                    self._telemetry.emit(entry.record)
                except Exception:
                    logger.exception("ledger %s: OpenTelemetry export failed", self.where)
                    self._telemetry = None
                    break

    # -- the spill file ----------------------------------------------------------

    def _spill_waiting(self) -> bool:
        return self._spill is not None and self._spill.pending > 0

    def _keep(self, entries: Sequence[_Entry], why: str) -> None:
        """Put ``entries`` in the spill file; count what does not fit as lost."""
        if not entries:
            return
        written, problem = 0, f"the spill file is full (max_spill = {self.max_spill})"
        if self._spill is not None:
            try:
                written = self._spill.append([e.line() for e in entries])
            except OSError as exc:
                problem = f"the spill file cannot be written: {exc}"
        with self._count_lock:
            self.spilled += written
            self.lost += len(entries) - written
        if written:
            self._say(
                "spill",
                "ledger %s: %d records kept in %s (%s); they are written when the database "
                "takes them",
                self.where,
                written,
                self._spill.path if self._spill is not None else self.spill_dir,
                why,
            )
        if written < len(entries):
            logger.error(
                "ledger %s: %d records lost (%s): %s",
                self.where,
                len(entries) - written,
                why,
                problem,
            )

    def _may_drain(self) -> bool:
        if not self._down:
            return True
        if time.monotonic() < self._probe_at:
            return False
        return self._insert(TABLE, []) is None  # one try: does the database take writes?

    def _drain(self) -> None:
        """Write what waits in this process's spill file and in orphaned ones."""
        if self._spill is None:
            return
        try:
            paths = self._spill.claim(_live_tokens)
        except OSError as exc:
            logger.error("ledger %s: cannot read the spill files: %s", self.where, exc)
            return
        for path in paths:
            chunk: list[_Entry] = []
            unreadable = 0
            try:
                for data in Spill.read(path):
                    entry = _Entry.from_line(data)
                    if entry is None:
                        unreadable += 1
                        continue
                    chunk.append(entry)
                    if len(chunk) >= self.batch_size:
                        self._drain_chunk(chunk)
                        chunk = []
                self._drain_chunk(chunk)
                path.unlink(missing_ok=True)
            except OSError as exc:
                logger.error("ledger %s: cannot read %s: %s", self.where, path, exc)
            if unreadable:
                with self._count_lock:
                    self.lost += unreadable
                logger.error(
                    "ledger %s: %d unreadable lines in %s (cut by a crash) are lost",
                    self.where,
                    unreadable,
                    path,
                )

    def _drain_chunk(self, chunk: list[_Entry]) -> None:
        if self._down:  # back to the spill file without waiting on the database again
            self._keep(chunk, "the database is unavailable")
        else:
            self._commit(chunk)

    def _say(self, kind: str, message: str, *args: Any) -> None:
        # One warning of a kind per 10 s: a flood of records must not flood the log.
        now = time.monotonic()
        if now - self._said.get(kind, -math.inf) >= 10.0:
            self._said[kind] = now
            logger.warning(message, *args)

    # -- reading ----------------------------------------------------------------


#: Writers with a running thread, flushed at interpreter exit.
_open_writers: weakref.WeakSet[Writer] = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:
    for writer in list(_open_writers):
        with contextlib.suppress(Exception):
            writer.close()
