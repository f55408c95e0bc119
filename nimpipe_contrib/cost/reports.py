"""Spend reports from the ledger: the grouped query, its rows, and ``nimpipe cost``.

:meth:`Ledger.report <nimpipe_contrib.cost.ledger.Ledger.report>` runs
:func:`report_sql` and reads the result with :func:`rows_of`;
:func:`format_report` prints rows as a table; :func:`run_cost_command` is
``nimpipe cost`` (added by :mod:`.commands`); :func:`parse_since` reads its
``--since``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe.errors import ConfigError
from nimpipe_contrib._settings import StageSettings
from nimpipe_contrib.cost.rows import NANO
from nimpipe_contrib.cost.store import QUARANTINE, TABLE

if TYPE_CHECKING:
    import argparse

    from nimpipe.config import Config
    from nimpipe_contrib.cost.ledger import Ledger

__all__ = [
    "GROUPINGS",
    "ReportRow",
    "format_report",
    "parse_since",
    "report_sql",
    "rows_of",
    "run_cost_command",
    "total",
    "whole",
]

#: What ``report`` can group by.
GROUPINGS = ("route", "model", "agent", "day")
_GROUP_COLUMNS = {
    "route": ("route",),
    "model": ("model",),
    "agent": ("agent_id", "agent_type"),
    "day": ("day",),
}


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


def report_sql(by: str, param: str) -> str:
    """The grouped spend query ``by`` a grouping, with ``param`` the store's placeholder."""
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


def whole(value: Any) -> int:
    """A SQL sum as an int (``NULL`` of an empty group is 0)."""
    return int(value) if value is not None else 0


def rows_of(by: str, raw: Iterable[Sequence[Any]]) -> list[ReportRow]:
    """The rows of :func:`report_sql`, dearest first (by day: oldest first)."""
    rows = []
    width = len(_GROUP_COLUMNS[by])
    for item in raw:
        keys, figures = item[:width], [whole(v) for v in item[width:]]
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
                cost_usd=nusd / NANO,
                mean_latency_ms=round(latency_us / calls / 1000, 1) if calls else 0.0,
                mean_ttft_ms=round(ttft_us / ttft_n / 1000, 1) if ttft_n else None,
            )
        )
    if by == "day":
        rows.sort(key=lambda r: r.key)
    else:
        rows.sort(key=lambda r: (-r.cost_usd, -r.calls, r.key, r.agent_type or ""))
    return rows


def total(rows: Sequence[ReportRow]) -> ReportRow:
    """The total line of ``rows``."""
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
    for row in [*rows, total(rows)] if rows else []:
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
    from nimpipe_contrib.cost.ledger import STAGE, Ledger

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
            "total": total(rows).as_dict(),
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
