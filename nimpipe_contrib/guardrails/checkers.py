"""The checker hooks: how any plugin becomes a guardrails provider.

The ``guardrails`` stage declares these hooks (through ``addhooks``) and calls
them on every turn next to its own backends; a plugin that implements any of
them is a guardrails provider.  Each returns a :class:`~nimpipe.types.Verdict`
or ``None`` (nothing to say), and the stage aggregates them: the first
``block`` stops the turn (unless the stage runs in report-only mode), a
``rewrite`` replaces the text, every verdict is recorded.

A provider that may be installed without the ``guardrails`` stage declares the
hooks itself, so that its implementations are never "unknown hooks"::

    from nimpipe.stage import hookimpl
    from nimpipe.types import Verdict
    from nimpipe_contrib.guardrails.checkers import declare_hooks

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

from typing import TYPE_CHECKING

from nimpipe.stage import hookspec

if TYPE_CHECKING:
    import pluggy

    from nimpipe.pipeline import Pipeline
    from nimpipe.types import ToolCall, Turn, Verdict

__all__ = ["HOOK_NAMES", "GuardrailsCheckerSpec", "declare_hooks"]

#: The hooks a guardrails provider implements.
HOOK_NAMES = (
    "guardrails_check_input",
    "guardrails_check_output",
    "guardrails_check_tool_call",
)


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
