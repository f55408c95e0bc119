"""The ``guardrails`` stage: input, output and tool-call checks around every turn.

Enable it with a ``[stages.guardrails]`` table (the settings, their defaults
and checks are :class:`~nimpipe_contrib.guardrails.settings.GuardrailsSettings`;
``docs/guardrails.md`` explains them).  What it does on every turn:

- **input**: the checker hooks of guardrails providers run first (they may
  rewrite, e.g. redact); then the backends judge the input.  With
  ``input_mode = "concurrent"`` that check runs alongside the model call and
  a block cancels the call (a turn costs about max(check, model), the
  cancelled call is recorded ``cancelled`` with the tokens it spent, and none
  of its text is shown); with ``"sequential"`` the check comes first and a
  blocked input never reaches the model.
- **output**: the answer is judged before it is released; while this stage is
  enabled streamed output is held back (``buffer`` policy) or released
  sentence by sentence as each sentence passes (``sentence`` policy).
- **tool calls**: every tool call the model proposes is judged before the
  turn returns it to the agent.
- **failures**: a backend that is down, slower than ``timeout`` or answers
  something that is no verdict blocks the turn with rule
  ``guardrails:unavailable`` (fail-closed), unless ``fail_open = true``, which
  lets the turn through and records an ``unchecked`` verdict.
- **guarded generation** (``approach = "generation"``, see
  :mod:`~nimpipe_contrib.guardrails.generation`): every model call is sent
  through the NeMo Guardrails server; the server runs its input rails, the
  model and its output rails, and the stage turns the rails' log into
  verdicts and a typed block instead of running its own rails-only checks.
- **verdicts**: every check gives a :class:`~nimpipe.types.Verdict` (rail,
  decision, backend, latency) recorded per turn (:meth:`GuardrailsStage.verdicts`)
  and logged on ``nimpipe.guardrails``; a block names the rail in ``Block.rule``.
- **secrets**: whatever a backend or a provider says (rail names, details,
  error messages) is scrubbed of keys (:func:`nimpipe.stage.scrub`) before it
  reaches a verdict, a block's reason or a log line; the keys of the
  backends are registered as secrets.

Optional jobs run in companion plugins (:mod:`~nimpipe_contrib.guardrails.companions`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs

from nimpipe.errors import NimpipeError
from nimpipe.stage import hookimpl
from nimpipe.types import Block, Deferred, Retry, Role, ToolCall, Turn, Verdict
from nimpipe_contrib.guardrails import generation
from nimpipe_contrib.guardrails.backends.base import Backend
from nimpipe_contrib.guardrails.backends.inprocess import InProcessBackend
from nimpipe_contrib.guardrails.backends.loop import LoopThread
from nimpipe_contrib.guardrails.backends.microservice import MicroserviceBackend
from nimpipe_contrib.guardrails.checkers import declare_hooks
from nimpipe_contrib.guardrails.companions import companions_for
from nimpipe_contrib.guardrails.judge import Judge, ready
from nimpipe_contrib.guardrails.settings import STAGE, GuardrailsSettings
from nimpipe_contrib.guardrails.verdicts import DENIED_TOOL_RULE, VerdictLog

if TYPE_CHECKING:
    import pluggy

    from nimpipe.errors import ProviderError
    from nimpipe.pipeline import Pipeline
    from nimpipe.types import Attempt, Output, Response, Route

__all__ = ["GuardrailsStage", "create_plugin"]


def _with_last_user_text(turn: Turn, text: str) -> Turn:
    messages = list(turn.messages)
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role is Role.USER:
            messages[index] = attrs.evolve(messages[index], content=text)
            break
    return attrs.evolve(turn, messages=messages)


@attrs.define
class GuardrailsStage:
    """The ``guardrails`` stage (one per pipeline; see the module docstring).

    :param settings: the settings; ``None`` reads ``[stages.guardrails]`` at
        ``configure``.
    """

    settings: GuardrailsSettings | None = None
    #: Every verdict of the most recent turns.
    verdict_log: VerdictLog = attrs.field(factory=VerdictLog)
    _backends: tuple[Backend, ...] = attrs.field(default=(), init=False)
    _loop: LoopThread = attrs.field(factory=lambda: LoopThread("nimpipe-guardrails"), init=False)
    _companions: list[str] = attrs.field(factory=list, init=False)
    _judge: Judge | None = attrs.field(default=None, init=False)

    # -- lifecycle --------------------------------------------------------------

    @hookimpl
    def addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
        declare_hooks(pluginmanager)

    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        if self.settings is None:
            self.settings = GuardrailsSettings.from_config(pipeline.config)
        settings = self.settings
        self._backends = settings.build_backends()
        for backend in self._backends:
            if isinstance(backend, InProcessBackend):
                backend.begin_loading()  # in the background; the first check waits for it
        self._judge = Judge(settings, self._backends, self._loop, self.verdict_log)
        from nimpipe import __version__

        for companion, name in companions_for(self, pipeline):
            self._companions.append(
                pipeline.plugins.register(companion, name, kind="contrib", version=__version__)
            )

    @hookimpl
    def unconfigure(self, pipeline: Pipeline) -> None:
        for name in self._companions:
            pipeline.plugins.unregister(name)
        self._companions.clear()
        self._loop.close([backend.aclose() for backend in self._backends])

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every backend is loaded (in-process rails); raises on failure."""
        for backend in self._backends:
            self._loop.submit(backend.start()).result(timeout)

    def verdicts(self, turn_id: str) -> tuple[Verdict, ...]:
        """The verdicts recorded for one turn, in the order they were given."""
        return self.verdict_log.get(turn_id)

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The configured backends (after ``configure``)."""
        return self._backends

    def _checking_backends(self, response: Response | None = None) -> tuple[Backend, ...]:
        """The backends that judge input (``response`` ``None``) or the output of ``response``.

        With guarded generation the NeMo server's own rails judge the input
        and, when its reply carries the rails' log, the output: the
        microservice backend's rails-only checks would only repeat them.
        """
        if self._settings.approach != "generation":
            return self._backends
        if response is not None and generation.generation_log(response) is None:
            return self._backends
        return tuple(b for b in self._backends if not isinstance(b, MicroserviceBackend))

    # -- input --------------------------------------------------------------------

    @hookimpl(trylast=True)
    async def pre_input(self, turn: Turn, pipeline: Pipeline) -> Turn | Block | Deferred | None:
        settings = self._settings
        if not settings.check_input or not self._checking_backends():
            return None
        text = turn.last_user_text
        if settings.input_mode == "concurrent":
            check = functools.partial(self._judge_input_concurrently, turn, text, pipeline)
            return Deferred(check=check, name="guardrails input", plugin=STAGE)
        outcome = await self.judge.decide(
            turn, "input", text, pipeline, self._backend_verdicts(turn, pipeline, "input", text)
        )
        if outcome.block is not None:
            return outcome.block
        if outcome.text is not None:
            return _with_last_user_text(turn, outcome.text)
        return None

    async def _judge_input_concurrently(
        self, turn: Turn, text: str, pipeline: Pipeline
    ) -> Block | None:
        outcome = await self.judge.decide(
            turn, "input", text, pipeline, self._backend_verdicts(turn, pipeline, "input", text)
        )
        if outcome.block is None and outcome.rewrite is not None:
            # The model is already reading the original input: a rewrite cannot apply.
            return self.judge.block(
                outcome.rewrite,
                f"{outcome.rewrite.rule} rewrote the input, which the concurrent input "
                'check cannot apply (set input_mode = "sequential")',
            )
        return outcome.block

    async def check_input_with_providers(
        self, turn: Turn, pipeline: Pipeline
    ) -> Turn | Block | None:
        """Run the providers' ``guardrails_check_input`` hooks (before the backends)."""
        text = turn.last_user_text
        verdicts = await self.judge.provider_verdicts(
            pipeline, "guardrails_check_input", turn=turn, text=text
        )
        outcome = await self.judge.decide(turn, "input", text, pipeline, ready(verdicts))
        if outcome.block is not None:
            return outcome.block
        if outcome.text is not None:
            return _with_last_user_text(turn, outcome.text)
        return None

    # -- output -------------------------------------------------------------------

    @hookimpl(trylast=True)
    async def post_output(
        self, turn: Turn, output: Output, pipeline: Pipeline
    ) -> str | Block | None:
        settings = self._settings
        if not settings.check_output:
            return None
        if output.final and output.released and output.released == output.text:
            # Sentence by sentence, every prefix of this answer was judged as it was released.
            return None
        segment = output.text
        verdicts = await self.judge.provider_verdicts(
            pipeline, "guardrails_check_output", turn=turn, text=segment
        )
        outcome = await self.judge.decide(turn, "output", segment, pipeline, ready(verdicts))
        if outcome.block is not None:
            return outcome.block
        rewritten = outcome.text
        if rewritten is not None:
            segment = rewritten
        backends = self._checking_backends(output.response)
        if backends:
            judged = segment if output.final else output.released + segment
            outcome = await self.judge.decide(
                turn,
                "output",
                judged,
                pipeline,
                self._backend_verdicts(turn, pipeline, "output", judged, backends),
            )
            if outcome.block is not None:
                return outcome.block
            if outcome.text is not None:
                if output.final:
                    return outcome.text
                if outcome.text.startswith(output.released):
                    return outcome.text[len(output.released) :]
                assert outcome.rewrite is not None
                return self.judge.block(outcome.rewrite, "a rail rewrote text already released")
        return rewritten

    # -- tool calls -----------------------------------------------------------------

    async def check_tool_calls(
        self, turn: Turn, calls: Sequence[ToolCall], pipeline: Pipeline
    ) -> Block | None:
        """Judge the tool calls of a response (denied tools, providers, backends at once)."""
        settings = self._settings
        prompt = turn.last_user_text
        model = self._check_model(turn, pipeline)
        jobs: list[Coroutine[Any, Any, list[Verdict]]] = []
        denied = [
            Verdict(
                rule=DENIED_TOOL_RULE,
                decision="block",
                plugin=STAGE,
                backend="denied_tools",
                detail=f"tool {call.name!r} is denied",
            )
            for call in calls
            if call.name in settings.denied_tools
        ]
        for call in calls:
            jobs.append(
                self.judge.provider_verdicts(
                    pipeline, "guardrails_check_tool_call", turn=turn, call=call
                )
            )
            jobs.append(
                self.judge.run_backends(
                    turn,
                    functools.partial(_tool_call_check, prompt=prompt, call=call, model=model),
                )
            )
        gathered = await asyncio.gather(*jobs)
        verdicts = denied + [v for group in gathered for v in group]
        outcome = await self.judge.decide(turn, "tool call", prompt, pipeline, ready(verdicts))
        return outcome.block

    # -- guarded generation -------------------------------------------------------------

    def generation_route(self, route: Route, attempt: Attempt) -> Route | None:
        """``route`` sent through the NeMo Guardrails server, or ``None`` to call it directly.

        See :func:`nimpipe_contrib.guardrails.generation.generation_route`.
        """
        return generation.generation_route(self._settings, route, attempt)

    async def judge_generation(
        self,
        turn: Turn,
        route: Route,
        response: Response | None,
        error: ProviderError | None,
        pipeline: Pipeline,
    ) -> Block | Retry | None:
        """Record the rails a guarded generation ran; block when one of them stopped the turn.

        See :func:`nimpipe_contrib.guardrails.generation.judge_generation`.
        """
        return await generation.judge_generation(self.judge, turn, route, response, error, pipeline)

    # -- verdicts ---------------------------------------------------------------------

    @property
    def judge(self) -> Judge:
        """How this stage reaches a decision on a text (after ``configure``)."""
        if self._judge is None:
            raise NimpipeError("the guardrails stage is used before configure()")
        return self._judge

    @property
    def _settings(self) -> GuardrailsSettings:
        if self.settings is None:
            raise NimpipeError("the guardrails stage is used before configure()")
        return self.settings

    def _check_model(self, turn: Turn, pipeline: Pipeline) -> str:
        settings = self._settings
        if settings.model:
            return settings.model
        if turn.model:
            return turn.model
        config = pipeline.config
        name = turn.route or config.default_route
        route = config.routes.get(name) if name else None
        if route is None and config.routes:
            route = next(iter(config.routes.values()))
        return route.model if route is not None else "default"

    async def _backend_verdicts(
        self,
        turn: Turn,
        pipeline: Pipeline,
        kind: Literal["input", "output"],
        text: str,
        backends: Sequence[Backend] | None = None,
    ) -> list[Verdict]:
        model = self._check_model(turn, pipeline)
        if kind == "input":
            check = functools.partial(_input_check, text=text, model=model)
        else:
            check = functools.partial(
                _output_check, prompt=turn.last_user_text, text=text, model=model
            )
        if backends is None:
            backends = self._checking_backends()
        return await self.judge.run_backends(turn, check, backends)


async def _input_check(backend: Backend, *, text: str, model: str) -> Verdict | None:
    return await backend.check_input(text, model)


async def _output_check(backend: Backend, *, prompt: str, text: str, model: str) -> Verdict | None:
    return await backend.check_output(prompt, text, model)


async def _tool_call_check(
    backend: Backend, *, prompt: str, call: ToolCall, model: str
) -> Verdict | None:
    return await backend.check_tool_call(prompt, call, model)


def create_plugin() -> GuardrailsStage:
    """The stage object registered as ``guardrails`` (one per pipeline)."""
    return GuardrailsStage()
