"""Verdicts: the rules the guardrails stages give, the per-turn log, and publishing a verdict."""

from __future__ import annotations

import collections
import logging
import sys
import threading
from typing import TYPE_CHECKING

import attrs

from nimpipe.stage import scrub, scrub_fields

if TYPE_CHECKING:
    from nimpipe.pipeline import Pipeline
    from nimpipe.types import Turn, Verdict

__all__ = [
    "DENIED_TOOL_RULE",
    "GENERATION_BACKEND",
    "UNAVAILABLE_RULE",
    "VerdictLog",
    "publish_verdict",
]

#: The rule of a block caused by a backend that could not judge (fail-closed).
UNAVAILABLE_RULE = "guardrails:unavailable"

#: The rule of a block caused by ``denied_tools``.
DENIED_TOOL_RULE = "guardrails:denied-tool"

#: The ``Verdict.backend`` of the rails a guarded generation ran on the NeMo server.
GENERATION_BACKEND = "microservice:generation"

#: Logger that receives every verdict, at INFO (and ``nimpipe.trace`` under ``NIMPIPE_TRACE``).
verdict_log = logging.getLogger("nimpipe.guardrails")


@attrs.define
class VerdictLog:
    """The verdicts of the most recent turns, by turn id (bounded: old turns drop out).

    Thread-safe.  Each stage that judges turns owns one.
    """

    #: How many turns are kept.
    max_turns: int = 1024
    _turns: collections.OrderedDict[str, list[Verdict]] = attrs.field(
        factory=collections.OrderedDict, init=False
    )
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def add(self, turn_id: str, verdict: Verdict) -> None:
        """Append ``verdict`` to the verdicts of ``turn_id``."""
        with self._lock:
            verdicts = self._turns.get(turn_id)
            if verdicts is None:
                verdicts = self._turns[turn_id] = []
                while len(self._turns) > self.max_turns:
                    self._turns.popitem(last=False)
            verdicts.append(verdict)

    def get(self, turn_id: str) -> tuple[Verdict, ...]:
        """The verdicts recorded for ``turn_id``, oldest first."""
        with self._lock:
            return tuple(self._turns.get(turn_id, ()))

    def all(self) -> tuple[Verdict, ...]:
        """Every verdict kept, oldest turn first."""
        with self._lock:
            return tuple(v for verdicts in self._turns.values() for v in verdicts)

    def clear(self) -> None:
        """Forget every verdict."""
        with self._lock:
            self._turns.clear()


def publish_verdict(
    pipeline: Pipeline | None, turn: Turn, verdict: Verdict, log: VerdictLog
) -> None:
    """Record one verdict of ``turn``: on the turn, in ``log``, on ``nimpipe.guardrails``, traced.

    Call it from a hook (or a deferred check) of the running turn:
    :meth:`Pipeline.add_verdict` attaches the verdict to the turn's next
    :class:`~nimpipe.types.CallRecord` (the ledger) and to
    :attr:`TurnResult.verdicts`.  Rewrite verdicts are recorded with their
    ``detail`` summarised by the caller (never the rewritten text itself).
    The verdict's texts are scrubbed of secrets before they are recorded.
    """
    verdict = scrub_fields(verdict)
    log.add(turn.id, verdict)
    if pipeline is not None:
        pipeline.add_verdict(verdict)
    tracing = pipeline is not None and pipeline.config.trace
    if not tracing and not verdict_log.isEnabledFor(logging.INFO):
        return
    detail = f": {verdict.detail}" if verdict.detail else ""
    source = f"{verdict.plugin or '?'}/{verdict.backend or '-'}"
    message = (
        f"verdict {verdict.rule} {verdict.decision} for turn {turn.id} by {source} "
        f"in {verdict.latency * 1000:.1f} ms{detail}"
    )
    message = scrub(message)
    verdict_log.info(message)
    if tracing:
        trace = logging.getLogger("nimpipe.trace")
        if trace.hasHandlers():
            trace.info(message)
        else:
            print(f"[nimpipe] {message}", file=sys.stderr)
