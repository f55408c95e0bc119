"""Stage ``ledger``: one durable record per model call, and the spend reports.

Every model call a pipeline makes (ok, failed, retried, escalated, cancelled,
blocked) reaches ``record_cost``; this stage puts the record on a queue and a
background writer thread inserts the queued records in batches, one
transaction per batch.  The per-call cost on the turn's path is a queue put
(a few microseconds); the database work happens off it.

Where the records go:

- by default an SQLite file, ``$NIMPIPE_HOME/ledger.sqlite`` (see
  :func:`nimpipe.embedded.nimpipe_home`), in WAL mode, ``synchronous=FULL``,
  with a busy timeout, so that several processes can write one file at once;
- with ``url = "postgresql://..."`` (or ``url_env`` naming a variable that
  holds it) a PostgreSQL database shared by a fleet of hosts; needs
  ``pip install 'nimpipe[postgres]'``.  Both hold the same table.

Durability: while the database keeps up, a record is committed at most
``flush_interval`` seconds after its call ended (sooner when ``batch_size``
records are waiting).  A process killed with ``kill -9`` loses only the
records not yet committed, the calls of the last ``flush_interval`` seconds
at most; every committed record survives and the database stays valid.  When
the database is unreachable, records wait in memory (``max_pending`` at most)
and are retried.  ``Pipeline.close`` and interpreter exit flush the queue.

Settings (``[stages.ledger]``):

``path``
    SQLite file (default ``$NIMPIPE_HOME/ledger.sqlite``); a relative path
    is relative to the config file.
``url`` / ``url_env``
    ``postgresql://user@host/db`` (no password in the file: use ``url_env``,
    ``PGPASSWORD`` or ``~/.pgpass``), or ``sqlite:///path``.
``flush_interval`` (0.5 s), ``batch_size`` (256), ``max_pending`` (100000)
    batching; ``max_pending`` bounds the queue (a full queue makes
    ``record_cost`` wait rather than drop spend).
``synchronous`` (``full``), ``busy_timeout`` (10 s)
    SQLite durability and lock waiting.
``close_timeout`` (10 s)
    how long ``close`` keeps retrying a failing database before giving up.
``opentelemetry`` (false)
    also emit ``gen_ai.*`` metrics and one span per call when OpenTelemetry
    is installed.
``prices``
    the price file (see :mod:`nimpipe_contrib.pricing`).

``nimpipe cost`` (:func:`run_cost_command`) and jaato's ``nimpipe-cost``
(hook ``cost_summary``) report from the same database through
:meth:`Ledger.report`.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import datetime as _dt
import io
import json
import logging
import os
import queue
import re
import secrets
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe._markers import hookimpl, hookspec
from nimpipe.errors import ConfigError, NimpipeError
from nimpipe.redaction import scrub
from nimpipe.types import CallRecord
from nimpipe_contrib import pricing
from nimpipe_contrib._ledger_store import (
    COLUMNS,
    TABLE,
    PostgresStore,
    SQLiteStore,
    Store,
    mask_url,
    require_psycopg,
)
from nimpipe_contrib._settings import StageSettings
from nimpipe_contrib.route_reasons import reasons_for

if TYPE_CHECKING:
    import argparse

    import pluggy

    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline
    from nimpipe_contrib.route_reasons import RouteReasons

__all__ = [
    "GROUPINGS",
    "Ledger",
    "LedgerStage",
    "ReportRow",
    "create_plugin",
    "default_path",
    "format_report",
    "parse_since",
    "run_cost_command",
]

logger = logging.getLogger("nimpipe.ledger")

STAGE = "ledger"
#: What ``report`` can group by.
GROUPINGS = ("route", "model", "agent", "day")

_KNOWN = (
    "path",
    "url",
    "url_env",
    "flush_interval",
    "batch_size",
    "max_pending",
    "synchronous",
    "busy_timeout",
    "close_timeout",
    "opentelemetry",
    "prices",
)
_GROUP_COLUMNS = {
    "route": ("route",),
    "model": ("model",),
    "agent": ("agent_id", "agent_type"),
    "day": ("day",),
}
_NANO = 1_000_000_000


def default_path() -> Path:
    """``$NIMPIPE_HOME/ledger.sqlite``: the embedded ledger."""
    from nimpipe.embedded import nimpipe_home

    return nimpipe_home() / "ledger.sqlite"


def _scrub(text: str | None) -> str | None:
    """Key-shaped strings masked: error messages may echo a key."""
    return scrub(text) if text else text


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ReportRow:
    """Spend of one group of calls (one route, model, agent or UTC day)."""

    #: The group: a route name, a model id, an agent id or a ``YYYY-MM-DD`` day.
    key: str
    #: The agent's type (``by="agent"`` only).
    agent_type: str | None = None
    calls: int = 0
    #: Calls that failed or were cancelled.
    errors: int = 0
    #: Calls whose answer was escalated to another route.
    escalated: int = 0
    #: Calls whose token counts are estimates (no usage from the server).
    estimated: int = 0
    #: Calls on a route with no known price (counted at cost 0).
    unpriced: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    mean_latency_ms: float = 0.0
    mean_ttft_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as plain data (``agent_type`` only when grouping by agent)."""
        data = attrs.asdict(self)
        if self.agent_type is None:
            del data["agent_type"]
        return data


def _report_sql(by: str, param: str) -> str:
    columns = ", ".join(_GROUP_COLUMNS[by])
    return (
        f"SELECT {columns}, COUNT(*), "
        "SUM(CASE WHEN outcome IN ('error', 'cancelled') THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN outcome = 'escalated' THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN usage_source <> 'server' THEN 1 ELSE 0 END), "
        "SUM(CASE WHEN price_source = 'none' THEN 1 ELSE 0 END), "
        "SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_nusd), "
        "SUM(latency_us), SUM(ttft_us), COUNT(ttft_us) "
        f"FROM {TABLE} WHERE ts >= {param} GROUP BY {columns}"
    )


def _int(value: Any) -> int:
    return int(value) if value is not None else 0


def _rows_of(by: str, raw: Iterable[Sequence[Any]]) -> list[ReportRow]:
    rows = []
    width = len(_GROUP_COLUMNS[by])
    for item in raw:
        keys, figures = item[:width], [_int(v) for v in item[width:]]
        calls, errors, escalated, estimated, unpriced, prompt, completion, nusd = figures[:8]
        latency_us, ttft_us, ttft_n = figures[8:]
        rows.append(
            ReportRow(
                key=str(keys[0]),
                agent_type=str(keys[1]) if by == "agent" else None,
                calls=calls,
                errors=errors,
                escalated=escalated,
                estimated=estimated,
                unpriced=unpriced,
                prompt_tokens=prompt,
                completion_tokens=completion,
                cost_usd=nusd / _NANO,
                mean_latency_ms=round(latency_us / calls / 1000, 1) if calls else 0.0,
                mean_ttft_ms=round(ttft_us / ttft_n / 1000, 1) if ttft_n else None,
            )
        )
    if by == "day":
        rows.sort(key=lambda r: r.key)
    else:
        rows.sort(key=lambda r: (-r.cost_usd, -r.calls, r.key, r.agent_type or ""))
    return rows


def _total(rows: Sequence[ReportRow]) -> ReportRow:
    calls = sum(r.calls for r in rows)
    latency = sum(r.mean_latency_ms * r.calls for r in rows)
    return ReportRow(
        key="total",
        calls=calls,
        errors=sum(r.errors for r in rows),
        escalated=sum(r.escalated for r in rows),
        estimated=sum(r.estimated for r in rows),
        unpriced=sum(r.unpriced for r in rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
        cost_usd=round(sum(r.cost_usd for r in rows), 9),
        mean_latency_ms=round(latency / calls, 1) if calls else 0.0,
    )


# --------------------------------------------------------------------------
# OpenTelemetry (optional)
# --------------------------------------------------------------------------


class _Telemetry:
    """``gen_ai.*`` metrics and one span per call, through the OpenTelemetry API."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace

        meter = metrics.get_meter("nimpipe")
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens per model call"
        )
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of model calls"
        )
        self._cost = meter.create_counter(
            "nimpipe.cost", unit="USD", description="Spend on model calls"
        )
        self._tracer = trace.get_tracer("nimpipe")
        self._kind = trace.SpanKind.CLIENT
        self._error = trace.Status(trace.StatusCode.ERROR)

    def emit(self, record: CallRecord) -> None:
        base = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "nvidia_nim",
            "gen_ai.request.model": record.model,
            "server.address": record.provider,
            "nimpipe.route": record.route,
        }
        self._tokens.record(record.prompt_tokens, {**base, "gen_ai.token.type": "input"})
        self._tokens.record(record.completion_tokens, {**base, "gen_ai.token.type": "output"})
        self._duration.record(record.latency, base)
        if record.cost_usd:
            self._cost.add(record.cost_usd, base)
        start = int(record.time * 1e9)
        span = self._tracer.start_span(
            f"chat {record.model}",
            kind=self._kind,
            start_time=start,
            attributes={
                **base,
                "gen_ai.usage.input_tokens": record.prompt_tokens,
                "gen_ai.usage.output_tokens": record.completion_tokens,
                "nimpipe.turn_id": record.turn_id,
                "nimpipe.agent_id": record.agent_id,
                "nimpipe.agent_type": record.agent_type,
                "nimpipe.outcome": record.outcome,
                "nimpipe.usage_source": record.usage_source,
                "nimpipe.cost_usd": record.cost_usd,
                "nimpipe.attempt": record.attempt,
            },
        )
        if record.error:
            span.set_attribute("error.type", record.error)
            span.set_status(self._error)
        span.end(end_time=start + int(record.latency * 1e9))


def _telemetry(settings: StageSettings) -> _Telemetry | None:
    if not settings.boolean("opentelemetry", False):
        return None
    try:
        return _Telemetry()
    except ImportError:
        raise settings.fail(
            "opentelemetry", "needs OpenTelemetry: pip install opentelemetry-api (and an SDK)"
        ) from None


# --------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------

_STOP = object()


class Ledger:
    """A durable log of model calls with a background, batching writer.

    Thread-safe: :meth:`record` may be called from any thread or task.  The
    writer thread starts with the first record (or :meth:`start`); a ledger
    used only for reports never starts it.  ``on_commit`` is called from the
    writer thread with the ``record_id`` of every record of each committed
    batch.
    """

    def __init__(
        self,
        store: Store,
        *,
        flush_interval: float = 0.5,
        batch_size: int = 256,
        max_pending: int = 100_000,
        close_timeout: float = 10.0,
        on_commit: Callable[[Sequence[str]], None] | None = None,
        telemetry: _Telemetry | None = None,
    ) -> None:
        self.store = store
        self.flush_interval = flush_interval
        self.batch_size = max(1, batch_size)
        self.max_pending = max_pending
        self.close_timeout = close_timeout
        self.on_commit = on_commit
        self._telemetry = telemetry
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._stopping = False
        self._close_deadline = 0.0
        self._origin = ""
        self._host = ""
        self._next_id = 0
        #: Records committed, and records given up on (database unreachable at close).
        self.committed = 0
        self.lost = 0
        #: Failed commit attempts (each retried).
        self.write_failures = 0

    # -- construction -----------------------------------------------------

    @classmethod
    def open(cls, target: str | os.PathLike[str] | None = None, **options: Any) -> Ledger:
        """A ledger at ``target``: a path, ``sqlite:///path``, ``postgresql://...``, or the default.

        ``options`` are the keywords of :class:`Ledger` plus ``synchronous``
        and ``busy_timeout`` for SQLite.
        """
        synchronous = options.pop("synchronous", "full")
        busy_timeout = options.pop("busy_timeout", 10.0)
        text = os.fspath(target) if target is not None else None
        store: Store
        if text is not None and text.startswith(("postgresql://", "postgres://")):
            require_psycopg()
            store = PostgresStore(text)
        else:
            if text is not None and text.startswith("sqlite:"):
                text = text.removeprefix("sqlite:").removeprefix("//")
            path = Path(text) if text else default_path()
            store = SQLiteStore(path, synchronous=synchronous, busy_timeout=busy_timeout)
        return cls(store, **options)

    @classmethod
    def from_settings(cls, settings: StageSettings, **options: Any) -> Ledger:
        """A ledger from a ``[stages.ledger]`` table (see the module docstring)."""
        settings.only(_KNOWN)
        target = _target(settings)
        if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):
            require_psycopg()
        return cls.open(
            target,
            flush_interval=settings.number("flush_interval", 0.5, minimum=0.0),
            batch_size=settings.integer("batch_size", 256, minimum=1),
            max_pending=settings.integer("max_pending", 100_000, minimum=1),
            close_timeout=settings.number("close_timeout", 10.0, minimum=0.0),
            synchronous=settings.choice("synchronous", ("full", "normal"), "full"),
            busy_timeout=settings.number("busy_timeout", 10.0, minimum=0.0),
            telemetry=_telemetry(settings),
            **options,
        )

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
            self._origin = f"{self._host}:{os.getpid()}:{secrets.token_hex(4)}"
            thread = threading.Thread(target=self._run, name="nimpipe-ledger", daemon=True)
            thread.start()
            self._thread = thread
            _open_ledgers.add(self)

    def record(self, record: CallRecord, routing_reason: str = "") -> None:
        """Queue ``record`` for the writer; returns at once (waits only on a full queue)."""
        if self._thread is None:
            self.start()
        elif self._closed:
            raise NimpipeError(f"the ledger at {self.where} is closed")
        if self._queue.qsize() >= self.max_pending:
            self._wait_for_room()
        self._queue.put((record, routing_reason))

    def _wait_for_room(self) -> None:
        logger.warning(
            "ledger %s: %d records waiting to be written; slowing callers down",
            self.where,
            self._queue.qsize(),
        )
        while self._queue.qsize() >= self.max_pending and not self._closed:
            time.sleep(0.01)

    @property
    def pending(self) -> int:
        """Records queued and not yet committed (approximate)."""
        return self._queue.qsize()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record queued so far is committed; ``False`` on timeout."""
        if self._thread is None or not self._thread.is_alive():
            return self._queue.empty()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Commit what is queued and stop the writer (idempotent).

        Keeps retrying a failing database for ``timeout`` seconds (default
        ``close_timeout``); records still unwritten then are counted in
        :attr:`lost` and reported on the ``nimpipe.ledger`` logger.
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
        _open_ledgers.discard(self)

    # -- the writer thread -----------------------------------------------------

    def _run(self) -> None:
        batch: list[tuple[CallRecord, str]] = []
        waiters: list[threading.Event] = []
        deadline = 0.0
        stop = False
        get = self._queue.get
        while not stop:
            try:
                timeout = max(0.0, deadline - time.monotonic()) if batch else None
                item = get(timeout=timeout)
            except queue.Empty:
                item = None
            due = item is None
            while item is not None:
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
                    self._commit(batch)
                    batch = []
                for waiter in waiters:
                    waiter.set()
                waiters = []
        self.store.close_writer()

    def _row(self, record: CallRecord, routing_reason: str) -> tuple[Any, ...]:
        self._next_id += 1
        verdicts = json.dumps(
            [
                {"rule": v.rule, "decision": v.decision, "plugin": v.plugin, "backend": v.backend}
                for v in record.verdicts
            ]
        )
        return (
            f"{self._origin}:{self._next_id}",
            record.time,
            time.strftime("%Y-%m-%d", time.gmtime(record.time)),
            record.turn_id,
            record.agent_id,
            record.agent_type,
            record.route,
            record.provider,
            record.model,
            record.prompt_tokens,
            record.completion_tokens,
            record.usage_source,
            round(record.cost_usd * _NANO),
            record.price_source,
            round(record.latency * 1e6),
            round(record.ttft * 1e6) if record.ttft is not None else None,
            record.outcome,
            _scrub(record.error),
            record.attempt,
            _scrub(record.reason) or "",
            _scrub(routing_reason) or "",
            int(record.stream),
            verdicts,
            self._host,
            os.getpid(),
        )

    def _commit(self, batch: list[tuple[CallRecord, str]]) -> None:
        rows = []
        for record, reason in batch:
            try:
                rows.append(self._row(record, reason))
            except Exception:
                # One malformed record (a stage's own CallRecord) must not stop the writer.
                self.lost += 1
                logger.exception("ledger %s: cannot store record %r", self.where, record)
        if not rows:
            return
        delay = 0.05
        while True:
            try:
                self.store.open_writer()
                self.store.insert(rows)
                break
            except Exception as exc:
                self.write_failures += 1
                if self._closed and time.monotonic() >= self._close_deadline:
                    self.lost += len(rows)
                    logger.error(
                        "ledger %s: %d records not written at close: %s: %s",
                        self.where,
                        len(rows),
                        type(exc).__name__,
                        exc,
                    )
                    return
                if self.write_failures in (1, 10) or self.write_failures % 100 == 0:
                    logger.warning(
                        "ledger %s: cannot write %d records (will retry): %s: %s",
                        self.where,
                        len(rows),
                        type(exc).__name__,
                        exc,
                    )
                if isinstance(exc, (OSError, RuntimeError)) or self.store.kind != "sqlite":
                    self.store.close_writer()
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.committed += len(rows)
        if self.on_commit is not None:
            try:
                self.on_commit([row[0] for row in rows])
            except Exception:
                logger.exception("ledger %s: on_commit callback failed", self.where)
        if self._telemetry is not None:
            for record, _ in batch:
                try:
                    self._telemetry.emit(record)
                except Exception:
                    logger.exception("ledger %s: OpenTelemetry export failed", self.where)
                    self._telemetry = None
                    break

    # -- reading ----------------------------------------------------------------

    def exists(self) -> bool:
        """Whether any record was ever written here."""
        return self.store.exists()

    def report(
        self, by: str = "route", since: float | None = None, *, flush: bool = True
    ) -> list[ReportRow]:
        """Spend grouped ``by`` route, model, agent or (UTC) day, for calls since ``since``.

        ``since`` is a Unix time (``None``: all).  With ``flush`` the calls
        this process has queued are committed first.
        """
        if by not in GROUPINGS:
            raise ValueError(f"by must be one of {', '.join(GROUPINGS)}, got {by!r}")
        self._flush_before_reading(flush)
        raw = self.store.query(_report_sql(by, self.store.param), (since or 0.0,))
        return _rows_of(by, raw)

    def spend(self, since: float, *, flush: bool = True) -> tuple[float, dict[str, float]]:
        """Total spend since ``since`` (Unix time) and the spend of each agent id."""
        self._flush_before_reading(flush)
        p = self.store.param
        raw = self.store.query(
            f"SELECT agent_id, SUM(cost_nusd) FROM {TABLE} WHERE ts >= {p} GROUP BY agent_id",
            (since,),
        )
        agents = {str(agent): _int(nusd) / _NANO for agent, nusd in raw}
        return sum(_int(nusd) for _, nusd in raw) / _NANO, agents

    def _flush_before_reading(self, flush: bool) -> None:
        if flush and self._thread is not None and not self._closed:
            self.flush(self.close_timeout)

    def rows(
        self, *, since: float | None = None, turn_id: str | None = None, flush: bool = True
    ) -> list[dict[str, Any]]:
        """The stored records (oldest first) as dicts of the table's columns.

        With ``flush`` the calls this process has queued are committed first.
        """
        self._flush_before_reading(flush)
        p = self.store.param
        where = [f"ts >= {p}"]
        params: list[Any] = [since or 0.0]
        if turn_id is not None:
            where.append(f"turn_id = {p}")
            params.append(turn_id)
        names = [name for name, _ in COLUMNS]
        raw = self.store.query(
            f"SELECT {', '.join(names)} FROM {TABLE} WHERE {' AND '.join(where)} "
            "ORDER BY ts, record_id",
            params,
        )
        return [dict(zip(names, row, strict=True)) for row in raw]


def _target(settings: StageSettings) -> str | None:
    url = settings.string("url", None)
    env_name = settings.string("url_env", None)
    path = settings.string("path", None)
    given = [k for k, v in (("url", url), ("url_env", env_name), ("path", path)) if v]
    if len(given) > 1:
        raise settings.fail(given[1], f"give one of url, url_env and path, not {given[0]} too")
    if env_name:
        url = os.environ.get(env_name)
        if not url:
            raise settings.fail("url_env", f"${env_name} is not set")
    if url:
        if not url.startswith(("postgresql://", "postgres://", "sqlite:")):
            raise settings.fail(
                "url_env" if env_name else "url",
                f"must be a postgresql:// or sqlite: URL, got {mask_url(url)!r}",
            )
        if not env_name and mask_url(url) != url:
            raise settings.fail(
                "url",
                "holds a password; keep it out of config files: name a variable with "
                "url_env, or use PGPASSWORD or ~/.pgpass",
            )
        return url
    if path is not None:
        resolved = Path(path).expanduser()
        if not resolved.is_absolute() and settings.source:
            resolved = Path(settings.source).parent / resolved
        return str(resolved)
    return None


#: Ledgers with a running writer, flushed at interpreter exit.
_open_ledgers: weakref.WeakSet[Ledger] = weakref.WeakSet()


@atexit.register
def _close_open_ledgers() -> None:
    for ledger in list(_open_ledgers):
        with contextlib.suppress(Exception):
            ledger.close()


# --------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------


class _CostSummarySpec:
    """The hook jaato's ``nimpipe-cost`` asks (see :mod:`nimpipe.jaato._reports`)."""

    @hookspec
    def cost_summary(self, pipeline: Pipeline) -> list[Mapping[str, Any]] | None:
        """Spend per agent from the persistent ledger.

        :param pipeline: the running pipeline.
        :return: rows with ``agent_id``, ``agent_type``, ``calls``,
            ``prompt_tokens``, ``completion_tokens`` and ``cost_usd``.
            *Collected*.
        """


@attrs.define
class LedgerStage:
    """The ``ledger`` stage of one pipeline: ``record_cost`` queues, a thread writes."""

    ledger: Ledger | None = None
    _reasons: RouteReasons | None = None
    _book: pricing.PriceBook | None = None

    @hookimpl
    def addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
        caller = getattr(pluginmanager.hook, "cost_summary", None)
        if caller is None or not caller.has_spec():
            pluginmanager.add_hookspecs(_CostSummarySpec)

    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        settings = StageSettings.of(pipeline, STAGE)
        self.ledger = Ledger.from_settings(settings)
        pricing.price_routes(pipeline)
        self._book = pricing.price_book_for(pipeline)
        self._reasons = reasons_for(pipeline)
        self.ledger.start()

    @hookimpl
    def record_cost(self, record: CallRecord, pipeline: Pipeline) -> None:
        ledger = self.ledger
        if ledger is None:
            return
        if record.price_source == "none":
            record = self._reprice(record, pipeline)
        reasons = self._reasons
        ledger.record(record, reasons.get(record.turn_id, record.attempt) if reasons else "")

    def _reprice(self, record: CallRecord, pipeline: Pipeline) -> CallRecord:
        # A route added after configure (endpoint discovery) may still have a profile.
        route = pipeline.config.routes.get(record.route)
        if route is None or self._book is None:
            return record
        price = self._book.price_for(attrs.evolve(route, model=record.model))
        if price is None:
            return record
        return attrs.evolve(
            record,
            cost_usd=price.cost(record.prompt_tokens, record.completion_tokens),
            price_source=price.source,
        )

    @hookimpl
    def unconfigure(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    @hookimpl
    def cost_summary(self) -> list[Mapping[str, Any]] | None:
        if self.ledger is None:
            return None
        return [
            {
                "agent_id": row.key,
                "agent_type": row.agent_type,
                "calls": row.calls,
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
                "cost_usd": round(row.cost_usd, 6),
            }
            for row in self.ledger.report("agent")
        ]


def create_plugin() -> LedgerStage:
    """A fresh ``ledger`` stage for one pipeline."""
    return LedgerStage()


# --------------------------------------------------------------------------
# nimpipe cost
# --------------------------------------------------------------------------

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """A Unix time from ``7d``, ``24h``, ``30m``, ``2w``, ``today``, or an ISO date/time.

    ISO values without a zone are UTC.  Raises :class:`ConfigError` (key
    ``--since``) for anything else.
    """
    now = time.time() if now is None else now
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if text.strip().lower() == "today":
        day = _dt.datetime.fromtimestamp(now, _dt.timezone.utc).date()
        return _dt.datetime(day.year, day.month, day.day, tzinfo=_dt.timezone.utc).timestamp()
    try:
        when = _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"cannot read {text!r}: use e.g. 7d, 24h, 30m, today or 2025-06-01",
            key="--since",
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return when.timestamp()


_HEADERS = (
    ("calls", "calls"),
    ("errors", "errors"),
    ("escalated", "escalated"),
    ("estimated", "estimated"),
    ("prompt_tokens", "prompt tok"),
    ("completion_tokens", "output tok"),
    ("cost_usd", "cost USD"),
    ("mean_latency_ms", "mean ms"),
)


def format_report(rows: Sequence[ReportRow], by: str) -> str:
    """The report as a plain-text table with a total line."""
    first = {"agent": "agent (type)"}.get(by, by)
    table = [[first, *(title for _, title in _HEADERS)]]
    for row in [*rows, _total(rows)] if rows else []:
        key = f"{row.key} ({row.agent_type})" if row.agent_type else row.key
        cells = [key]
        for field, _ in _HEADERS:
            value = getattr(row, field)
            cells.append(f"{value:.6f}" if field == "cost_usd" else f"{value:g}")
        table.append(cells)
    if len(table) == 1:
        return "(no model call recorded)"
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = []
    for n, cells in enumerate(table):
        if n == len(table) - 1 and n > 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
    notes = []
    unpriced = sum(r.unpriced for r in rows)
    estimated = sum(r.estimated for r in rows)
    if estimated:
        notes.append(f"{estimated} calls have estimated token counts (no usage from the server)")
    if unpriced:
        notes.append(f"{unpriced} calls were on routes with no price (counted at $0)")
    return "\n".join(lines + [f"note: {n}" for n in notes])


def run_cost_command(config: Config, args: argparse.Namespace) -> int:
    """``nimpipe cost [--by route|model|agent|day] [--since WHEN] [--json|--csv]``."""
    settings = StageSettings.from_config(config, STAGE)
    ledger = Ledger.from_settings(settings)
    since = parse_since(args.since) if getattr(args, "since", None) else None
    by = getattr(args, "by", None) or "route"
    if not ledger.exists():
        print(
            f"nimpipe cost: no ledger at {ledger.where} yet: enable the ledger stage "
            "([stages.ledger] in nimpipe.toml) and run some turns",
            file=sys.stderr,
        )
        return 1
    rows = ledger.report(by, since, flush=False)
    if getattr(args, "json", False):
        payload = {
            "by": by,
            "since": _dt.datetime.fromtimestamp(since, _dt.timezone.utc).isoformat()
            if since is not None
            else None,
            "ledger": ledger.where,
            "rows": [r.as_dict() for r in rows],
            "total": _total(rows).as_dict(),
        }
        print(json.dumps(payload, indent=2))
    elif getattr(args, "csv", False):
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        fields = ["key", *(["agent_type"] if by == "agent" else []), *(f for f, _ in _HEADERS)]
        fields += ["unpriced", "mean_ttft_ms"]
        writer.writerow([by if f == "key" else f for f in fields])
        for row in rows:
            data = row.as_dict()
            writer.writerow(["" if data.get(f) is None else data.get(f) for f in fields])
        sys.stdout.write(out.getvalue())
    else:
        print(f"spend by {by} ({ledger.where}" + (f", since {args.since}" if since else "") + ")")
        print(format_report(rows, by))
    return 0
