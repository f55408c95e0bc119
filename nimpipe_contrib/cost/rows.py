"""A call record as a row of the ledger: every figure checked, every text cleaned.

:func:`call_row` turns a :class:`~nimpipe.types.CallRecord` into a row of
``nimpipe_calls`` (see :mod:`.store`) and lists the figures that are
impossible; :func:`record_json` keeps such a record whole, secrets masked, for
the quarantine; :func:`clean` makes any value a text every database stores.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import attrs

from nimpipe.redaction import scrub
from nimpipe.types import CallRecord
from nimpipe_contrib.cost.store import INT32_MAX

__all__ = [
    "MAX_CALL_USD",
    "MAX_TOKENS",
    "NANO",
    "TEXT_CHARS",
    "call_row",
    "clean",
    "error_text",
    "quarantine_row",
    "record_json",
]

#: Nano-dollars per dollar: costs are stored as whole nano-dollars.
NANO = 1_000_000_000

#: A token count above this is impossible (no model has such a context).
MAX_TOKENS = 10**9
#: A cost above this for one call is impossible (10**9 tokens at the dearest list prices).
MAX_CALL_USD = 1e6
#: Durations (latency, time to first token) are clamped to this many seconds.
_MAX_SECONDS = 1e7
#: Characters kept of a name (ids, route, model, verdict fields) and of a text (reason, error).
_NAME_CHARS = 512
TEXT_CHARS = 4096
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
    return clean(text, 80)


def error_text(exc: BaseException) -> str:
    """An exception's message for the log and the quarantine (it may echo a key)."""
    try:
        return clean(str(exc), 1000)
    except Exception:
        return type(exc).__name__


def clean(value: Any, limit: int) -> str:
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
    return clean(text, _NAME_CHARS)


def _name(value: Any) -> str:
    # Routes, models, agents and sources repeat from record to record: clean each once.
    if type(value) is str and len(value) <= 256:
        return _cached_name(value)
    return clean(value, _NAME_CHARS)


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
    return round(number * NANO)


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
        return clean(value, TEXT_CHARS)
    if depth < 2 and isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value[:_MAX_VERDICTS]]
    if depth < 2 and attrs.has(type(value)):
        return {
            f.name: _jsonable(getattr(value, f.name, None), depth + 1)
            for f in attrs.fields(type(value))
        }
    return clean(value, TEXT_CHARS)


def record_json(record: Any, routing_reason: Any) -> str:
    data = {name: _jsonable(getattr(record, name, None)) for name in _RECORD_FIELDS}
    data["routing_reason"] = _jsonable(routing_reason)
    if not isinstance(record, CallRecord):
        data["type"] = clean(type(record).__name__, _NAME_CHARS)
    return json.dumps(data, allow_nan=False)


def call_row(
    record: Any, routing_reason: Any, record_id: str, host: str, problems: list[str]
) -> tuple[Any, ...]:
    """The row of ``record`` in ``nimpipe_calls``; impossible figures are added to ``problems``."""
    when = _unix_time(record.time)
    prompt = _tokens(record.prompt_tokens, "prompt_tokens", problems)
    completion = _tokens(record.completion_tokens, "completion_tokens", problems)
    nusd = _nano_usd(record.cost_usd, problems)
    error = record.error
    return (
        record_id,
        when,
        _utc_day(int(when // 86400)),
        clean(record.turn_id, _NAME_CHARS),
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
        clean(error, TEXT_CHARS) if error is not None else None,
        _small(record.attempt, 1),
        clean(record.reason, TEXT_CHARS),
        clean(routing_reason, TEXT_CHARS),
        int(bool(record.stream)),
        _verdicts(record.verdicts),
        host,
        os.getpid(),
    )


def quarantine_row(record_id: str, data: str, error: str, host: str) -> tuple[Any, ...]:
    """A row of ``nimpipe_quarantine``: ``data`` is the record as JSON, ``error`` why."""
    return (time.time(), record_id, data, clean(error, TEXT_CHARS), host, os.getpid())
