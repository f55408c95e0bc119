"""The interface every check backend implements, and the helpers they share."""

from __future__ import annotations

import time
from typing import Any, Literal, Protocol

from nimpipe.errors import BackendUnavailable
from nimpipe.stage import scrub
from nimpipe.types import ToolCall, Verdict

__all__ = [
    "INPUT_RAILS",
    "NEMO_REFUSAL",
    "OUTPUT_RAILS",
    "Backend",
    "elapsed",
    "excerpt",
    "rails_verdict",
    "render_tool_call",
]

#: Rail names used in verdicts when the service names none.
INPUT_RAILS = "input rails"
OUTPUT_RAILS = "output rails"

#: What NeMo Guardrails answers when a rail blocks.
NEMO_REFUSAL = "I'm sorry, I can't respond to that."


class Backend(Protocol):
    """What the ``guardrails`` stage needs from a check backend.

    Each method returns a :class:`Verdict` (decision ``pass``, ``block`` or
    ``rewrite`` with the new text in ``detail``), or ``None`` when the backend
    does not check that kind of text; it raises :class:`BackendUnavailable`
    when it cannot judge.  The methods run on the stage's event loop.
    """

    #: Short name recorded as the verdict's ``backend``.
    name: str

    async def check_input(self, text: str, model: str) -> Verdict | None: ...

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None: ...

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


def excerpt(value: Any, limit: int = 200) -> str:
    """At most ``limit`` characters of ``value`` (its ``repr`` unless a string), scrubbed.

    Scrubbed before it is cut, so that a cut never leaves part of a key behind.
    """
    text = value if isinstance(value, str) else _safe_repr(value)
    return scrub(text)[:limit]


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deep>"


def render_tool_call(call: ToolCall) -> str:
    """A proposed tool call as the text an output rail judges."""
    return f"[tool call] {call.name}({call.arguments})"


def elapsed(started: float) -> float:
    """Seconds since ``started`` (a :func:`time.perf_counter` value)."""
    return time.perf_counter() - started


def rails_verdict(
    backend: str,
    kind: Literal["input", "output", "tool call"],
    status: Any,
    rail: Any,
    content: Any,
    original: str,
    latency: float,
) -> Verdict:
    """A verdict from a NeMo ``/v1/checks`` (or ``check_async``) result."""
    status = scrub(str(getattr(status, "value", status)))
    default_rule = INPUT_RAILS if kind == "input" else OUTPUT_RAILS
    rule = scrub(str(rail)) if rail else default_rule
    if status == "blocked":
        return Verdict(
            rule=rule, decision="block", backend=backend, latency=latency, detail=f"{kind} blocked"
        )
    if status == "passed":
        return Verdict(rule=rule, decision="pass", backend=backend, latency=latency)
    if status == "modified":
        if isinstance(content, str) and content != original:
            return Verdict(
                rule=rule,
                decision="rewrite",
                backend=backend,
                latency=latency,
                detail=scrub(content),
            )
        return Verdict(rule=rule, decision="pass", backend=backend, latency=latency)
    raise BackendUnavailable(backend, f"unknown rails status {status!r}")
