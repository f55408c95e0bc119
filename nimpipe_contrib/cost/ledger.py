"""Stage ``ledger``: one durable record per model call, and the spend reports.

Every model call a pipeline makes (ok, failed, retried, escalated, cancelled,
blocked) reaches ``record_cost``; this stage puts the record on a queue and a
background writer thread inserts the queued records in batches, one
transaction per batch.  The per-call cost on the turn's path is a queue put
(a few microseconds); the database work happens off it.

Where the records go:

- by default an SQLite file, ``$NIMPIPE_HOME/ledger.sqlite`` (see
  :func:`nimpipe.paths.nimpipe_home`), in WAL mode, ``synchronous=FULL``,
  with a busy timeout, so that several processes can write one file at once;
- with ``url = "postgresql://..."`` (or ``url_env`` naming a variable that
  holds it) a PostgreSQL database shared by a fleet of hosts; needs
  ``pip install 'nimpipe[postgres]'``.  Both hold the same table.

Durability: while the database keeps up, a record is committed at most
``flush_interval`` seconds after its call ended (sooner when ``batch_size``
records are waiting).  A process killed with ``kill -9`` loses only the
records not yet committed, the calls of the last ``flush_interval`` seconds
at most; every committed record survives and the database stays valid.
``Pipeline.close`` and interpreter exit flush the queue.

No record poisons the ledger and the ledger never holds up a turn (see
:class:`Ledger` for the details):

- figures are checked before they reach the database; a record with
  impossible token counts or cost is *quarantined*: kept whole, as JSON with
  secrets masked, in the table ``nimpipe_quarantine`` of the same database,
  with the reason, out of the reports, and named in a warning and by
  ``nimpipe cost``;
- a batch the database refuses is split to find the refused records, which
  are quarantined; the rest is committed;
- an unavailable database is retried for ``retry_timeout`` seconds; then,
  and whenever the queue holds ``max_pending`` records, records go to a
  *spill file* (``ledger.sqlite-spill/`` beside an SQLite file,
  ``$NIMPIPE_HOME/ledger-spill/`` for PostgreSQL), which is written to the
  database as soon as it takes writes again, by this process or by the next
  ledger on the host if this one is gone;
- ``record_cost`` waits for room in a full queue at most ``queue_wait``
  seconds, and at most half the time the turn has left before its deadline.

Settings (``[stages.ledger]``):

``path``
    SQLite file (default ``$NIMPIPE_HOME/ledger.sqlite``); a relative path
    is relative to the config file.
``url`` / ``url_env``
    ``postgresql://user@host/db`` (no password in the file: use ``url_env``,
    ``PGPASSWORD`` or ``~/.pgpass``), or ``sqlite:///path``.
``flush_interval`` (0.5 s), ``batch_size`` (256), ``max_pending`` (100000)
    batching; ``max_pending`` bounds the queue.
``queue_wait`` (0.1 s)
    how long ``record_cost`` waits for room in a full queue (at most half the
    time the turn has left) before it puts the record in the spill file.
``retry_timeout`` (30 s)
    how long the writer retries a batch on an unavailable database before it
    puts the batch in the spill file.
``max_spill`` (100000)
    records the spill file of one process holds at most; beyond, records are
    lost, counted in :attr:`Ledger.lost` with an error on the log.
``synchronous`` (``full``), ``busy_timeout`` (10 s)
    SQLite durability and lock waiting.
``close_timeout`` (10 s)
    how long ``close`` keeps retrying a failing database before it leaves
    the records in the spill file.
``opentelemetry`` (false)
    also emit ``gen_ai.*`` metrics and one span per call when OpenTelemetry
    is installed.
``prices``
    the price file (see :mod:`nimpipe_contrib.cost.prices`).

``nimpipe cost`` (:func:`run_cost_command`) and jaato's ``nimpipe-cost``
(hook ``cost_summary``) report from the same database through
:meth:`Ledger.report`.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import datetime as _dt
import functools
import hashlib
import io
import itertools
import json
import logging
import math
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
from nimpipe.types import CallRecord, Turn
from nimpipe_contrib.cost import prices as pricing
from nimpipe_contrib.cost.store import (
    COLUMNS,
    INT32_MAX,
    QUARANTINE,
    QUARANTINE_COLUMNS,
    TABLE,
    PostgresStore,
    Spill,
    SQLiteStore,
    Store,
    mask_url,
    require_psycopg,
)
from nimpipe_contrib._settings import StageSettings
from nimpipe_contrib.routing.reasons import reasons_for

if TYPE_CHECKING:
    import argparse

    import pluggy

    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline
    from nimpipe_contrib.routing.reasons import RouteReasons

__all__ = [
    "GROUPINGS",
    "MAX_CALL_USD",
    "MAX_TOKENS",
    "QUARANTINE_FILE",
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
    "queue_wait",
    "retry_timeout",
    "max_spill",
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
    from nimpipe.paths import nimpipe_home

    return nimpipe_home() / "ledger.sqlite"


#: The quarantine of last resort, in the spill directory, for records the database
#: refuses even in its quarantine table.
QUARANTINE_FILE = "quarantine.jsonl"


def _spill_dir_of(store: Store) -> Path:
    """Beside an SQLite file (``ledger.sqlite-spill``); per database under ``$NIMPIPE_HOME``."""
    path = getattr(store, "path", None)
    if isinstance(path, Path):
        return path.with_name(path.name + "-spill")
    from nimpipe.paths import nimpipe_home

    digest = hashlib.sha256(store.where.encode("utf-8")).hexdigest()[:16]
    return nimpipe_home() / "ledger-spill" / f"{store.kind}-{digest}"


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
# Checking a record before it reaches the database
# --------------------------------------------------------------------------

#: A token count above this is impossible (no model has such a context).
MAX_TOKENS = 10**9
#: A cost above this for one call is impossible (10**9 tokens at the dearest list prices).
MAX_CALL_USD = 1e6
#: Durations (latency, time to first token) are clamped to this many seconds.
_MAX_SECONDS = 1e7
#: Characters kept of a name (ids, route, model, verdict fields) and of a text (reason, error).
_NAME_CHARS = 512
_TEXT_CHARS = 4096
#: Verdicts kept per record.
_MAX_VERDICTS = 256
_RECORD_FIELDS = tuple(field.name for field in attrs.fields(CallRecord))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _shown(value: Any) -> str:
    # repr() of a 10**5000 int raises; of a hostile object it may be anything.
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return _clean(text, 80)


def _error_text(exc: BaseException) -> str:
    """An exception's message for the log and the quarantine (it may echo a key)."""
    try:
        return _clean(str(exc), 1000)
    except Exception:
        return type(exc).__name__


def _clean(value: Any, limit: int) -> str:
    """``value`` as text any database stores: no NUL, no lone surrogate, secrets masked, capped."""
    if isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    else:
        try:
            text = str(value)
        except Exception:
            text = f"<{type(value).__name__}>"
    if not text:
        return text
    # Masked before the final cut, so that a cut never keeps half a key.
    text = text[: limit * 4]
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    text = scrub(text.replace("\x00", "")) if text else text
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


@functools.lru_cache(maxsize=4096)
def _cached_name(text: str) -> str:
    return _clean(text, _NAME_CHARS)


def _name(value: Any) -> str:
    # Routes, models, agents and sources repeat from record to record: clean each once.
    if type(value) is str and len(value) <= 256:
        return _cached_name(value)
    return _clean(value, _NAME_CHARS)


@functools.lru_cache(maxsize=64)
def _utc_day(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86400))


def _tokens(value: Any, name: str, problems: list[str]) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    problems.append(f"{name} = {_shown(value)} (possible: a whole number from 0 to {MAX_TOKENS})")
    return 0


def _nano_usd(value: Any, problems: list[str]) -> int:
    number = _finite(value)
    if number is None or not 0 <= number <= MAX_CALL_USD:
        problems.append(f"cost_usd = {_shown(value)} (possible: 0 to {MAX_CALL_USD:g} USD)")
        return 0
    return round(number * _NANO)


def _unix_time(value: Any) -> float:
    number = _finite(value)
    # Between 1970 and the year 5138; anything else is the time of recording.
    return number if number is not None and 0 <= number < 1e11 else time.time()


def _micros(value: Any) -> int | None:
    number = _finite(value)
    return None if number is None else round(min(max(number, 0.0), _MAX_SECONDS) * 1e6)


def _small(value: Any, default: int) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return min(max(value, 0), INT32_MAX)
    return default


def _verdicts(value: Any) -> str:
    if not value or not isinstance(value, (list, tuple)):
        return "[]"
    keys = ("rule", "decision", "plugin", "backend")
    return json.dumps([{k: _name(getattr(v, k, "")) for k in keys} for v in value[:_MAX_VERDICTS]])


def _jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON that keeps what was impossible about it, secrets masked."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= 128 else _shown(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return _clean(value, _TEXT_CHARS)
    if depth < 2 and isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value[:_MAX_VERDICTS]]
    if depth < 2 and attrs.has(type(value)):
        return {
            f.name: _jsonable(getattr(value, f.name, None), depth + 1)
            for f in attrs.fields(type(value))
        }
    return _clean(value, _TEXT_CHARS)


def _record_json(record: Any, routing_reason: Any) -> str:
    data = {name: _jsonable(getattr(record, name, None)) for name in _RECORD_FIELDS}
    data["routing_reason"] = _jsonable(routing_reason)
    if not isinstance(record, CallRecord):
        data["type"] = _clean(type(record).__name__, _NAME_CHARS)
    return json.dumps(data, allow_nan=False)


# --------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------

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


class Ledger:
    """A durable log of model calls with a background, batching writer.

    Thread-safe: :meth:`record` may be called from any thread or task.  The
    writer thread starts with the first record (or :meth:`start`); a ledger
    used only for reports never starts it.  ``on_commit`` is called from the
    writer thread with the ``record_id`` of every record of each committed
    batch.

    No record blocks the ledger, and the ledger never blocks a turn:

    - every figure is checked before it reaches the database: a record whose
      token counts or cost are impossible (negative, not finite, not whole,
      above :data:`MAX_TOKENS` tokens or :data:`MAX_CALL_USD`) is
      *quarantined*, kept whole in ``nimpipe_quarantine`` and out of the
      reports; other figures are clamped into their columns (durations to
      0..10**7 s, a time that is no Unix time becomes the time of recording)
      and texts lose NUL characters and lone surrogates and are capped;
    - a batch the database refuses is split until the refused records are
      found; they are quarantined and the rest is committed;
    - a database that is unavailable (locked, unreachable, full) is retried
      with backoff for ``retry_timeout`` seconds, then the batch is kept in
      the :class:`~nimpipe_contrib.cost.store.Spill` file next to the
      database and written once the database takes writes again (by this
      process, or by the next ledger on this host if the process is gone);
    - when ``max_pending`` records are queued, :meth:`record` waits at most
      ``queue_wait`` seconds and at most half the time the turn has left
      before its ``deadline``, then keeps the record in the spill file (a
      writer that took nothing since the last wait ran out is not waited for
      again); when that file holds ``max_spill``
      records, further records are counted in :attr:`lost` with an error on
      the ``nimpipe.ledger`` logger.
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
        telemetry: _Telemetry | None = None,
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
        self.spill_dir = Path(spill_dir) if spill_dir is not None else _spill_dir_of(store)
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
        """A ledger from a ``[stages.ledger]`` table (see the module docstring).

        Opens nothing: no file, directory or connection is made before the
        first record.
        """
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
            queue_wait=settings.number("queue_wait", 0.1, minimum=0.0),
            retry_timeout=settings.number("retry_timeout", 30.0, minimum=0.0),
            max_spill=settings.integer("max_spill", 100_000, minimum=0),
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
            token = secrets.token_hex(4)
            self._origin = f"{self._host}:{os.getpid()}:{token}"
            self._spill = Spill(self.spill_dir, self._host, token, self.max_spill)
            _live_tokens.add(token)
            thread = threading.Thread(target=self._run, name="nimpipe-ledger", daemon=True)
            thread.start()
            self._thread = thread
            _open_ledgers.add(self)

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
        _open_ledgers.discard(self)

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
            row = self._row(record, routing_reason, record_id, problems)
        except Exception as exc:  # a stage's own record type, missing fields
            problems.append(f"unreadable record: {type(exc).__name__}: {_error_text(exc)}")
        if problems:
            error = "impossible figures: " + "; ".join(problems)
            try:
                data = _record_json(record, routing_reason)
            except Exception as exc:
                data = json.dumps({"unreadable": _error_text(exc)})
            return _Entry(record_id, quarantine=self._quarantine_row(record_id, data, error))
        return _Entry(record_id, row=row, record=record)

    def _row(
        self, record: Any, routing_reason: Any, record_id: str, problems: list[str]
    ) -> tuple[Any, ...]:
        when = _unix_time(record.time)
        prompt = _tokens(record.prompt_tokens, "prompt_tokens", problems)
        completion = _tokens(record.completion_tokens, "completion_tokens", problems)
        nusd = _nano_usd(record.cost_usd, problems)
        error = record.error
        return (
            record_id,
            when,
            _utc_day(int(when // 86400)),
            _clean(record.turn_id, _NAME_CHARS),
            _name(record.agent_id),
            _name(record.agent_type),
            _name(record.route),
            _name(record.provider),
            _name(record.model),
            prompt,
            completion,
            _name(record.usage_source),
            nusd,
            _name(record.price_source),
            _micros(record.latency) or 0,
            _micros(record.ttft) if record.ttft is not None else None,
            _name(record.outcome),
            _clean(error, _TEXT_CHARS) if error is not None else None,
            _small(record.attempt, 1),
            _clean(record.reason, _TEXT_CHARS),
            _clean(routing_reason, _TEXT_CHARS),
            int(bool(record.stream)),
            _verdicts(record.verdicts),
            self._host,
            os.getpid(),
        )

    def _quarantine_row(self, record_id: str, data: str, error: str) -> tuple[Any, ...]:
        return (time.time(), record_id, data, _clean(error, _TEXT_CHARS), self._host, os.getpid())

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
            error = f"refused by the database: {type(result).__name__}: {_error_text(result)}"
            row = self._quarantine_row(entry.record_id, data, error)
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
                    _error_text(result),
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
                            _error_text(exc),
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
                        _error_text(exc),
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

    def quarantine(self, *, flush: bool = True) -> list[dict[str, Any]]:
        """The quarantined records (oldest first): ``ts``, ``record_id``, ``record``, ``error``.

        ``record`` is the record as it was given (parsed JSON, secrets
        masked), ``error`` why it was refused.  Includes the quarantine file
        of last resort (:data:`QUARANTINE_FILE`).  With ``flush`` the calls
        this process has queued are written first.
        """
        self._flush_before_reading(flush)
        names = [name for name, _ in QUARANTINE_COLUMNS]
        out = [
            dict(zip(names, row, strict=True))
            for row in self.store.query(
                f"SELECT {', '.join(names)} FROM {QUARANTINE} ORDER BY ts, record_id"
            )
        ]
        file = self.spill_dir / QUARANTINE_FILE
        if file.is_file():
            out += [d for d in Spill.read(file) if isinstance(d, dict)]
        for item in out:
            with contextlib.suppress(TypeError, ValueError):
                item["record"] = json.loads(item["record"])
        return out

    def quarantined_count(self) -> int:
        """Records in quarantine (table and file), for every process."""
        file = self.spill_dir / QUARANTINE_FILE
        extra = Spill.waiting(self.spill_dir, QUARANTINE_FILE) if file.is_file() else 0
        return self.store.count(QUARANTINE) + extra

    def waiting(self) -> int:
        """Records in spill files (of every process on this host), not yet in the database."""
        return Spill.waiting(self.spill_dir)


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
    def record_cost(self, record: CallRecord, turn: Turn, pipeline: Pipeline) -> None:
        ledger = self.ledger
        if ledger is None:
            return
        if record.price_source == "none":
            record = self._reprice(record, pipeline)
        reasons = self._reasons
        reason = reasons.get(record.turn_id, record.attempt) if reasons else ""
        ledger.record(record, reason, deadline=turn.deadline)

    def _reprice(self, record: CallRecord, pipeline: Pipeline) -> CallRecord:
        # A route added after configure (endpoint discovery) may still have a profile.
        route = pipeline.config.routes.get(record.route)
        if route is None or self._book is None:
            return record
        try:
            price = self._book.price_for(attrs.evolve(route, model=record.model))
            if price is None or pricing.price_problem(price) is not None:
                return record
            cost = price.cost(record.prompt_tokens, record.completion_tokens)
        except (TypeError, ValueError, OverflowError):
            return record  # figures that cannot be priced: the writer quarantines the record
        return attrs.evolve(record, cost_usd=cost, price_source=price.source)

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
    held, waiting = ledger.quarantined_count(), ledger.waiting()
    if getattr(args, "json", False):
        payload = {
            "by": by,
            "since": _dt.datetime.fromtimestamp(since, _dt.timezone.utc).isoformat()
            if since is not None
            else None,
            "ledger": ledger.where,
            "rows": [r.as_dict() for r in rows],
            "total": _total(rows).as_dict(),
            "quarantined": held,
            "waiting": waiting,
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
        for note in _side_notes(ledger, held, waiting):
            print(f"nimpipe cost: {note}", file=sys.stderr)
    else:
        print(f"spend by {by} ({ledger.where}" + (f", since {args.since}" if since else "") + ")")
        print(format_report(rows, by))
        for note in _side_notes(ledger, held, waiting):
            print(f"note: {note}")
    return 0


def _side_notes(ledger: Ledger, held: int, waiting: int) -> list[str]:
    notes = []
    if held:
        notes.append(
            f"{held} records quarantined (impossible figures, or refused by the database), "
            f"not counted above: see table {QUARANTINE} or Ledger.quarantine()"
        )
    if waiting:
        notes.append(
            f"{waiting} records wait in {ledger.spill_dir} for the database, not counted above"
        )
    return notes
