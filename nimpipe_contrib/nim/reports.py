"""What the NIM commands and hooks show: the ``nimpipe models`` and ``nimpipe status`` tables.

Pure functions of what the catalog and the registry know: no request, no
printing (:mod:`nimpipe_contrib.nim.commands` prints).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nimpipe_contrib.nim.registry import HealthState

if TYPE_CHECKING:
    from nimpipe.types import Route
    from nimpipe_contrib.nim.catalog_cache import EndpointCatalog
    from nimpipe_contrib.nim.endpoints import Endpoint
    from nimpipe_contrib.nim.health_settings import HealthSettings
    from nimpipe_contrib.nim.model_catalog import ModelInfo
    from nimpipe_contrib.nim.registry import EndpointHealth, HealthRegistry

__all__ = ["models_report", "route_status_rows", "status_report", "status_row"]


# --------------------------------------------------------------------------
# ``nimpipe models``
# --------------------------------------------------------------------------


def _age_text(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def models_report(
    infos: Sequence[ModelInfo], endpoints: Sequence[EndpointCatalog], *, capabilities: bool
) -> tuple[list[str], list[str]]:
    """The ``nimpipe models`` table, and one line per endpoint that did not answer."""
    header = ["model", "context", "source", "routes", "endpoint", "base model"]
    if capabilities:
        header += ["capabilities", "price in/out per 1k"]
    rows = []
    for info in infos:
        row: list[Any] = [
            info.id,
            info.context_length,
            info.context_source,
            ", ".join(info.routes) or "-",
            info.endpoint + (" (cached)" if info.origin == "disk" else ""),
            info.parent or "-",
        ]
        if capabilities:
            price = info.price
            row += [
                ", ".join(info.capabilities) or "-",
                f"${price.input_per_1k:g} / ${price.output_per_1k:g}" if price else "-",
            ]
        rows.append(row)
    table = _table(header, rows) if rows else ["(no model found)"]
    problems = []
    for entry in endpoints:
        if entry.error:
            kept = (
                f"; showing the catalog cached {_age_text(entry.age())}"
                if entry.cards
                else "; nothing cached"
            )
            problems.append(f"{entry.endpoint}: {entry.error}{kept}")
        elif entry.skipped and not entry.cards:
            problems.append(f"{entry.endpoint}: not asked ({entry.skipped}); nothing cached")
    return table, problems


# --------------------------------------------------------------------------
# ``nimpipe status`` and ``nim_status``
# --------------------------------------------------------------------------


def _number(value: float | None) -> int | float | None:
    if value is None or math.isnan(value):
        return None
    return int(value) if float(value).is_integer() else round(value, 2)


def _percent(value: float | None) -> str | None:
    if value is None or math.isnan(value):
        return None
    return f"{value * 100:.0f}%"


def status_row(
    health: EndpointHealth, settings: HealthSettings, endpoint: Endpoint | None = None
) -> dict[str, Any]:
    """One endpoint's row, as ``nimpipe status --json`` prints it."""
    state = health.state.value
    if health.state is HealthState.READY and health.overloaded(settings):
        state = "ready (overloaded)"
    contexts = sorted(set(health.max_model_len.values()))
    return {
        "endpoint": health.endpoint,
        "routes": list(endpoint.routes) if endpoint else [],
        "self_hosted": (endpoint.self_hosted or endpoint.local) if endpoint else None,
        "health": state,
        "state": health.state.value,
        "overloaded": health.overloaded(settings),
        "circuit": health.circuit.value,
        "live": health.live,
        "ready": health.ready,
        "latency_ms": None if health.probe_latency is None else health.probe_latency * 1000,
        "models": list(health.models),
        "context": contexts[0] if len(contexts) == 1 else (contexts or None),
        "waiting": _number(health.waiting),
        "running": _number(health.running),
        "kv_cache": health.kv_cache,
        "tokens_per_s": health.tokens_per_s,
        "prompt_tokens_total": _number(health.prompt_tokens_total),
        "generation_tokens_total": _number(health.generation_tokens_total),
        "metrics": health.metrics_status,
        "call_latency_ms": None if health.latency_ewma is None else health.latency_ewma * 1000,
        "ttft_ms": None if health.ttft_ewma is None else health.ttft_ewma * 1000,
        "last_error": health.last_error,
        "problems": list(health.problems),
        "checked_at": health.checked_at,
    }


def status_report(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``nimpipe status`` table, with a line under each endpoint that has a problem."""
    header = (
        "endpoint",
        "health",
        "latency",
        "models",
        "context",
        "queue",
        "running",
        "kv-cache",
        "tok/s",
    )

    def fmt(value: Any, unit: str = "") -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
        return f"{value}{unit}"

    body = []
    for row in rows:
        context = row["context"]
        metrics_missing = row["metrics"] in ("unavailable", "malformed", "error")
        body.append(
            [
                row["endpoint"],
                row["health"],
                fmt(row["latency_ms"], " ms"),
                ", ".join(row["models"]) or "-",
                ", ".join(map(str, context)) if isinstance(context, list) else fmt(context),
                "n/a" if metrics_missing and row["waiting"] is None else fmt(row["waiting"]),
                "n/a" if metrics_missing and row["running"] is None else fmt(row["running"]),
                "n/a"
                if metrics_missing and row["kv_cache"] is None
                else (_percent(row["kv_cache"]) or "-"),
                fmt(row["tokens_per_s"]),
            ]
        )
    cells = [list(header), *body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for index, cells_row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells_row, widths, strict=True)).rstrip())
        if index == 0:
            continue
        row = rows[index - 1]
        notes = []
        if row["last_error"]:
            notes.append(row["last_error"])
        notes.extend(p for p in row["problems"] if p != row["last_error"])
        if row["metrics"] == "unavailable":
            notes.append("metrics: unavailable (the server exposes none)")
        if row["circuit"] != "closed":
            notes.append(f"circuit {row['circuit']}")
        lines.extend(f"    {note}" for note in notes)
    return lines


def route_status_rows(
    routes: Iterable[Route], registry: HealthRegistry, settings: HealthSettings
) -> list[dict[str, Any]]:
    """The rows of the ``nim_status`` hook (jaato's ``nim-status``): one per route."""
    rows = []
    for route in routes:
        health = registry.snapshot(route)
        row = status_row(health, settings)
        detail = [row["endpoint"]]
        if row["latency_ms"] is not None:
            detail.append(f"{row['latency_ms']:.0f} ms")
        if row["context"]:
            detail.append(f"context {row['context']}")
        if row["tokens_per_s"] is not None:
            detail.append(f"{row['tokens_per_s']:.1f} tok/s")
        if row["last_error"]:
            detail.append(row["last_error"])
        rows.append(
            {
                "route": route.name,
                "state": row["health"],
                "ready": health.ready,
                "waiting": _number(health.waiting),
                "running": _number(health.running),
                "kv_cache": _percent(health.kv_cache),
                "detail": "; ".join(detail),
                "endpoint": row["endpoint"],
                "latency_ms": row["latency_ms"],
                "models": row["models"],
                "context": row["context"],
                "tokens_per_s": row["tokens_per_s"],
            }
        )
    return rows
