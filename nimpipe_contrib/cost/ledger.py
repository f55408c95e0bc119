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

``nimpipe cost`` (:func:`.reports.run_cost_command`) and jaato's ``nimpipe-cost``
(hook ``cost_summary``) report from the same database through
:meth:`Ledger.report`.

The writing (queue, batch thread, quarantine, spill file) is
:class:`.writer.Writer`; a record becomes a row in :mod:`.rows`; reports
are :mod:`.reports`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe._markers import hookimpl, hookspec
from nimpipe.types import CallRecord, Turn
from nimpipe_contrib._settings import StageSettings
from nimpipe_contrib.cost import prices as pricing
from nimpipe_contrib.cost.reports import GROUPINGS, ReportRow, report_sql, rows_of, whole
from nimpipe_contrib.cost.rows import NANO
from nimpipe_contrib.cost.store import (
    COLUMNS,
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
from nimpipe_contrib.cost.telemetry import telemetry_from
from nimpipe_contrib.cost.writer import QUARANTINE_FILE, Writer
from nimpipe_contrib.routing.reasons import reasons_for

if TYPE_CHECKING:
    import pluggy

    from nimpipe.pipeline import Pipeline
    from nimpipe_contrib.routing.reasons import RouteReasons

__all__ = ["STAGE", "Ledger", "LedgerStage", "create_plugin", "default_path"]

STAGE = "ledger"

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


def default_path() -> Path:
    """``$NIMPIPE_HOME/ledger.sqlite``: the embedded ledger."""
    from nimpipe.paths import nimpipe_home

    return nimpipe_home() / "ledger.sqlite"


class Ledger(Writer):
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
            telemetry=telemetry_from(settings),
            **options,
        )

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
        raw = self.store.query(report_sql(by, self.store.param), (since or 0.0,))
        return rows_of(by, raw)

    def spend(self, since: float, *, flush: bool = True) -> tuple[float, dict[str, float]]:
        """Total spend since ``since`` (Unix time) and the spend of each agent id."""
        self._flush_before_reading(flush)
        p = self.store.param
        raw = self.store.query(
            f"SELECT agent_id, SUM(cost_nusd) FROM {TABLE} WHERE ts >= {p} GROUP BY agent_id",
            (since,),
        )
        agents = {str(agent): whole(nusd) / NANO for agent, nusd in raw}
        return sum(whole(nusd) for _, nusd in raw) / NANO, agents

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
