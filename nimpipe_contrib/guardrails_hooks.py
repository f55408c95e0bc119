"""The checker hooks: how any plugin becomes a guardrails provider.

The ``guardrails`` stage declares these hooks (through ``addhooks``) and calls
them on every turn next to its own backends; a plugin that implements any of
them is a guardrails provider.  Each returns a :class:`~nimpipe.types.Verdict`
or ``None`` (nothing to say), and the stage aggregates them: the first
``block`` stops the turn (unless the stage runs in report-only mode), a
``rewrite`` replaces the text, every verdict is recorded.

A provider that may be installed without the ``guardrails`` stage declares the
hooks itself, so that its implementations are never "unknown hooks"::

    from nimpipe import hookimpl
    from nimpipe.types import Verdict
    from nimpipe_contrib.guardrails_hooks import declare_hooks

    class NoShouting:
        @hookimpl
        def addhooks(self, pluginmanager):
            declare_hooks(pluginmanager)

        @hookimpl
        def guardrails_check_output(self, turn, text):
            if text.isupper():
                return Verdict(rule="no-shouting", decision="block", detail="all capitals")
            return None

Calling order: for input and output, the checker hooks run first, before the
model call for input (so that a rewrite, such as a redaction, is what the
model and the backends see), then the backends judge the rewritten text.  For
tool calls, hooks and backends run at the same time.  The hooks are collected
(every implementation runs); keep them fast or make them ``async def``.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
from typing import TYPE_CHECKING

import attrs

from nimpipe import hookspec
from nimpipe.redaction import scrub, scrub_fields

if TYPE_CHECKING:
    import pluggy

    from nimpipe.pipeline import Pipeline
    from nimpipe.types import ToolCall, Turn, Verdict

__all__ = [
    "HOOK_NAMES",
    "GuardrailsCheckerSpec",
    "VerdictLog",
    "declare_hooks",
    "publish_verdict",
]

#: The hooks a guardrails provider implements.
HOOK_NAMES = (
    "guardrails_check_input",
    "guardrails_check_output",
    "guardrails_check_tool_call",
)

#: Logger that receives every verdict, at INFO (and ``nimpipe.trace`` under ``NIMPIPE_TRACE``).
verdict_log = logging.getLogger("nimpipe.guardrails")


class GuardrailsCheckerSpec:
    """Hook specifications of guardrails providers (declared by :func:`declare_hooks`)."""

    # ----------------------------------------------------------------------
    # Phase 1: input
    # ----------------------------------------------------------------------

    @hookspec
    def guardrails_check_input(self, turn: Turn, text: str, pipeline: Pipeline) -> Verdict | None:
        """Judge the user's input of a turn.

        Called once per turn by the ``guardrails`` stage from ``pre_input``,
        before the model call and before the stage's backends (which then see
        the text as rewritten by the providers).

        :param turn: the turn.
        :param text: the text of the last user message, as earlier providers
            left it.
        :param pipeline: the running pipeline.
        :return: ``None`` to say nothing; a :class:`~nimpipe.types.Verdict`
            with decision ``pass``, ``block`` or ``rewrite`` (for ``rewrite``,
            ``detail`` holds the replacement text).  *Collected*: every
            implementation runs; the first ``block`` wins.
        """

    # ----------------------------------------------------------------------
    # Phase 3: response (tool calls)
    # ----------------------------------------------------------------------

    @hookspec
    def guardrails_check_tool_call(
        self, turn: Turn, call: ToolCall, pipeline: Pipeline
    ) -> Verdict | None:
        """Judge one tool call the model proposed, before the agent runs it.

        Called by the ``guardrails`` stage from ``on_response`` for every tool
        call of a response, at the same time as the backends.

        :param turn: the turn.
        :param call: the proposed call (``name`` and the raw JSON ``arguments``).
        :param pipeline: the running pipeline.
        :return: ``None``, or a :class:`~nimpipe.types.Verdict` with decision
            ``pass`` or ``block`` (a tool call cannot be rewritten: ``rewrite``
            counts as ``block``).  *Collected*: every implementation runs; the
            first ``block`` wins.
        """

    # ----------------------------------------------------------------------
    # Phase 4: output
    # ----------------------------------------------------------------------

    @hookspec
    def guardrails_check_output(self, turn: Turn, text: str, pipeline: Pipeline) -> Verdict | None:
        """Judge the answer before it reaches the caller.

        Called by the ``guardrails`` stage from ``post_output`` on the whole
        answer, or, with the ``sentence`` stream policy, on the text released
        so far plus the next sentence; the output is held back meanwhile.

        :param turn: the turn.
        :param text: the text to judge, as earlier providers left it.
        :param pipeline: the running pipeline.
        :return: ``None``, or a :class:`~nimpipe.types.Verdict` with decision
            ``pass``, ``block`` or ``rewrite`` (``detail`` holds the
            replacement text).  *Collected*: every implementation runs; the
            first ``block`` wins.
        """


def declare_hooks(pluginmanager: pluggy.PluginManager) -> None:
    """Declare the checker hooks on ``pluginmanager`` unless they already are.

    Call it from ``addhooks``; any number of plugins may call it.
    """
    caller = getattr(pluginmanager.hook, HOOK_NAMES[0], None)
    if caller is not None and caller.spec is not None:
        return
    pluginmanager.add_hookspecs(GuardrailsCheckerSpec)


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
