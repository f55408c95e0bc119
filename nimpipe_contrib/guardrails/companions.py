"""The plugins the ``guardrails`` stage registers next to itself, and why it needs them.

The pipeline infers what a plugin needs from the hooks it implements: a
plugin with an ``on_response`` hook makes it hold back streamed output until
the response is judged (no ``sentence`` release), and a ``pre_input`` hook
runs before the model call.  So the stage implements only the hooks every
configuration needs, and registers each optional job as a plugin of its own,
only when the settings ask for it (:func:`companions_for`):

- ``guardrails.checkers`` (:class:`InputCheckers`, ``pre_input``): runs the
  providers' ``guardrails_check_input`` hooks before the call, when any
  plugin implements that hook and ``check_input`` is on;
- ``guardrails.tool_calls`` (:class:`ToolCallGuard`, ``on_response``): judges
  proposed tool calls, when ``check_tool_calls`` is on;
- ``guardrails.generation`` (:class:`GenerationGuard`, ``before_call`` and
  ``on_response``): guarded generation, when ``approach = "generation"``.

They go once a stage can declare what it needs instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from nimpipe.stage import hookimpl
from nimpipe_contrib.guardrails.settings import STAGE

if TYPE_CHECKING:
    from nimpipe.errors import ProviderError
    from nimpipe.pipeline import Pipeline
    from nimpipe.types import Attempt, Block, Response, Retry, Route, Turn
    from nimpipe_contrib.guardrails.stage import GuardrailsStage

__all__ = ["GenerationGuard", "InputCheckers", "ToolCallGuard", "companions_for"]


def companions_for(stage: GuardrailsStage, pipeline: Pipeline) -> list[tuple[object, str]]:
    """The companion plugins ``stage``'s settings need, each with the name to register it by."""
    settings = stage.settings
    assert settings is not None
    companions: list[tuple[object, str]] = []
    if settings.check_input and pipeline.plugins.has_impls("guardrails_check_input"):
        companions.append((InputCheckers(stage), f"{STAGE}.checkers"))
    if settings.check_tool_calls:
        companions.append((ToolCallGuard(stage), f"{STAGE}.tool_calls"))
    if settings.approach == "generation":
        companions.append((GenerationGuard(stage), f"{STAGE}.generation"))
    return companions


@attrs.define
class InputCheckers:
    """Runs the providers' input checks before the call (registered as ``guardrails.checkers``)."""

    stage: GuardrailsStage

    @hookimpl
    async def pre_input(self, turn: Turn, pipeline: Pipeline) -> Turn | Block | None:
        return await self.stage.check_input_with_providers(turn, pipeline)


@attrs.define
class ToolCallGuard:
    """Judges proposed tool calls (registered as ``guardrails.tool_calls``).

    It declares that it does not judge answers (only their tool calls), so
    held text is released sentence by sentence under the ``sentence`` policy.
    """

    stage: GuardrailsStage
    #: It only blocks tool calls (text passes post_output): held text may be
    #: released sentence by sentence before it judges.
    judges_answers = False

    @hookimpl
    async def on_response(
        self,
        turn: Turn,
        route: Route,
        response: Response | None,
        error: ProviderError | None,
        attempt: Attempt,
        pipeline: Pipeline,
    ) -> Block | None:
        if response is None or not response.tool_calls:
            return None
        return await self.stage.check_tool_calls(turn, response.tool_calls, pipeline)


@attrs.define
class GenerationGuard:
    """Sends model calls through the NeMo Guardrails server and reads its rails' log.

    Registered as ``guardrails.generation`` with ``approach = "generation"``.
    """

    stage: GuardrailsStage

    @hookimpl(trylast=True)
    def before_call(
        self, turn: Turn, route: Route, attempt: Attempt, pipeline: Pipeline
    ) -> Route | None:
        return self.stage.generation_route(route, attempt)

    @hookimpl
    async def on_response(
        self,
        turn: Turn,
        route: Route,
        response: Response | None,
        error: ProviderError | None,
        attempt: Attempt,
        pipeline: Pipeline,
    ) -> Block | Retry | None:
        return await self.stage.judge_generation(turn, route, response, error, pipeline)
