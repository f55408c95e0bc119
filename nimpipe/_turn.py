"""The turn runner: one turn, top to bottom.

A :class:`TurnRunner` owns everything one turn accumulates (decisions, call
records, verdicts, the text released so far) and walks the phases in order:
input checks, route choice, ``before_call``, the model call (through
:func:`nimpipe._call.call`, which only reports what happened), judgement,
output checks and the result.  It alone decides what reaches the caller (the
release policy) and it makes every :class:`~nimpipe.types.CallRecord`.
"""

from __future__ import annotations

import contextvars
import re
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe._call import Aborted, Mode, Tried, call, check_turn, run_deferred, stamp
from nimpipe._choice import is_local, join_reasons, kept_routes, no_route_message, selected
from nimpipe.errors import NimpipeError, NoRouteError, ProviderError
from nimpipe.types import (
    Accept,
    Attempt,
    Block,
    CallRecord,
    Deferred,
    Escalate,
    Output,
    Response,
    Retry,
    Rewrite,
    Role,
    Route,
    RouteChoice,
    Turn,
    TurnResult,
    Usage,
    Verdict,
)

if TYPE_CHECKING:
    from nimpipe.config import Config
    from nimpipe.pipeline import CancelToken, Pipeline

__all__ = ["TurnLog", "TurnRunner", "current_log", "is_local"]

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
_STRENGTH = {Block: 4, Escalate: 3, Retry: 2, Accept: 1}


@attrs.define
class TurnLog:
    """What one turn accumulates: decisions, call records and check verdicts."""

    decisions: list[Any] = attrs.field(factory=list)
    records: list[CallRecord] = attrs.field(factory=list)
    verdicts: list[Verdict] = attrs.field(factory=list)
    #: How many verdicts are already attached to a record.
    attached: int = 0
    #: The turn as it passed every input check (``None`` until it has).
    checked_turn: Turn | None = None


#: The log of the turn running in the current context (thread or task).
current_log: contextvars.ContextVar[TurnLog | None] = contextvars.ContextVar(
    "nimpipe_turn_log", default=None
)


class _Stop(Exception):
    """A phase blocked the turn: the runner releases the block's message and ends."""

    def __init__(self, block: Block, route: Route | None = None, response: Response | None = None):
        super().__init__(block.reason)
        self.block = block
        self.route = route
        self.response = response


class TurnRunner:
    """Runs one turn through the phases; iterate :meth:`run` for released text and the result."""

    def __init__(
        self,
        pipeline: Pipeline,
        turn: Turn,
        mode: Mode,
        streaming: bool,
        cancel: CancelToken | None,
        log: TurnLog,
    ) -> None:
        self.pipeline = pipeline
        self.plugins = pipeline.plugins
        self.config: Config = pipeline.config
        self.turn = turn
        self.mode = mode
        self.streaming = streaming
        self.cancel = cancel
        self.log = log
        #: Text released to the caller so far, piece by piece.
        self.released: list[str] = []
        #: Streamed output is held back until checked (set once the input phase is over).
        self.hold = False
        #: Held output is released sentence by sentence as each passes ``post_output``.
        self.sentence_release = False
        #: ``(plugin, reason)`` of the stages that chose each attempt's route.
        self.route_reasons: dict[int, list[tuple[str, str]]] = {}

    # ------------------------------------------------------------------
    # the walk
    # ------------------------------------------------------------------

    async def run(self, input_checked: bool) -> AsyncGenerator[str | TurnResult, None]:
        try:
            async for item in self._walk(input_checked):
                yield item
        except _Stop as stop:
            if self.streaming:
                yield stop.block.message
            yield self._blocked(stop.block, stop.route, stop.response)

    async def _walk(self, input_checked: bool) -> AsyncGenerator[str | TurnResult, None]:
        plugins, log = self.plugins, self.log
        check_turn(self.turn, self.cancel)

        # Phase 1: input (only when the user spoke last: tool rounds skip it).
        deferred: tuple[Deferred, ...] = ()
        if (
            not input_checked
            and self.turn.messages[-1].role is Role.USER
            and plugins.has_impls("pre_input")
        ):
            deferred = await self._pre_input()
        if deferred and not self.mode.is_async:
            for check in deferred:
                block = await run_deferred(check, self.mode)
                if block is not None:
                    raise _Stop(block)
            deferred = ()
        if not deferred:
            # Every input check has passed: a retry of this turn may skip them.
            log.checked_turn = self.turn

        # What the caller may see while the model answers: what the stages declare.
        judged = plugins.has_impls("on_response")
        checked_output = plugins.has_impls("post_output")
        streaming = self.streaming
        self.hold = streaming and (plugins.declares("holds_output") or bool(deferred))
        self.sentence_release = (
            self.hold
            and checked_output
            and not plugins.declares("judges_answers")
            and not deferred
            and self.config.stream_policy == "sentence"
        )

        # Phases 2 and 3: choose a route, call it, judge the answer; again on
        # a retry or an escalation.
        attempt = Attempt()
        last_good: tuple[Route, Response] | None = None
        chosen: tuple[Route, Response] | None = None
        #: The attempt whose answer was accepted (not a fallback on an earlier one).
        accepted: Attempt | None = None
        accepted_reason = ""
        while chosen is None:
            route = await self._select(attempt)
            if route is None:
                if attempt.cause is not None and last_good is not None:
                    log.decisions.append(
                        Accept(reason="no route left to escalate to", plugin="pipeline")
                    )
                    chosen = last_good
                    break
                raise NoRouteError(
                    no_route_message(self.turn, attempt, self.config), turn_id=self.turn.id
                )
            if plugins.has_impls("before_call"):
                route = await self._before_call(route, attempt)

            response, error = None, None
            try:
                async for text in self._call(route, attempt, deferred):
                    if isinstance(text, Response):
                        response = text
                    else:
                        yield text
            except ProviderError as exc:
                error = exc
            deferred = ()  # input checks ran with the first call only

            if response is not None and response.usage.source == "none":
                # The endpoint reported no usage (llama.cpp streams, some proxies):
                # count it here so every stage and the ledger see real figures.
                response = attrs.evolve(response, usage=estimate(self.turn, response.text, route))
            decision: Any = None
            if judged:
                decision = await self._judge(route, response, error, attempt)
            outcome = _outcome_of(decision, error)
            if response is not None and not (error is None and outcome == "ok"):
                await self._record_response(route, attempt, response, outcome, _reason(decision))
                last_good = (route, response)
            if isinstance(decision, Block):
                raise _Stop(decision)
            if isinstance(decision, (Escalate, Retry)):
                if attempt.number >= self.config.max_attempts:
                    log.decisions.append(
                        Accept(
                            reason=f"max_attempts ({self.config.max_attempts}) reached",
                            plugin="pipeline",
                        )
                    )
                    if last_good is not None and (response is not None or error is not None):
                        chosen = last_good
                        break
                    if error is not None:
                        raise error
                attempt = Attempt(
                    number=attempt.number + 1,
                    cause=decision,
                    tried=(*attempt.tried, route.name),
                    previous_route=route,
                )
                continue
            if error is not None:
                raise error
            assert response is not None
            chosen = (route, response)
            accepted = attempt
            accepted_reason = _reason(decision)

        route, response = chosen
        # Phase 4: output.  Every text the caller gets is checked, the text that
        # comes with tool calls included; a response of tool calls alone has none.
        # The accepted call is recorded after it, so that output verdicts and an
        # output block reach its record.
        text = response.text
        if checked_output and (text or not response.tool_calls):
            output = Output(
                text=text, response=response, final=True, released="".join(self.released)
            )
            text, block = await self._post_output(output)
            if block is not None:
                if accepted is not None:
                    await self._record_response(route, accepted, response, "blocked", block.reason)
                raise _Stop(block, route, response)
        if accepted is not None:
            await self._record_response(route, accepted, response, "ok", accepted_reason)
        if self.hold and not self.sentence_release and text:
            yield text
        yield TurnResult(
            turn=self.turn,
            text=text,
            response=response,
            route=route,
            decisions=tuple(log.decisions),
            records=tuple(log.records),
            verdicts=tuple(log.verdicts),
        )

    # ------------------------------------------------------------------
    # the model call and the release policy
    # ------------------------------------------------------------------

    async def _call(
        self, route: Route, attempt: Attempt, deferred: tuple[Deferred, ...]
    ) -> AsyncGenerator[str | Response, None]:
        """One call: release what the policy allows, record every try, end with the Response."""
        streaming, hold = self.streaming, self.hold
        events = call(
            self.turn,
            route,
            self.mode,
            self.cancel,
            streaming=streaming,
            deferred=deferred,
            resend_safe=hold and not self.sentence_release,
            released=self.released,
            max_retry_wait=self.config.max_retry_wait,
        )
        pending = ""  # held text not yet checked (sentence release)
        # The try under way: when it started and what it has streamed.
        started, partial = time.time(), []
        try:
            async for event in events:
                if isinstance(event, str):
                    partial.append(event)
                    if not hold:
                        self.released.append(event)
                        yield event
                    elif self.sentence_release:
                        pending += event
                        pieces = _SENTENCE_END.split(pending)
                        if len(pieces) > 1:
                            cut = len(pending) - len(pieces[-1])
                            segment, pending = pending[:cut], pending[cut:]
                            yield await self._release(segment, route, attempt, started, partial)
                elif isinstance(event, Response):
                    if self.sentence_release and not partial and event.text:
                        pending = event.text  # a route that does not stream
                    if self.sentence_release and pending:
                        yield await self._release(pending, route, attempt, started, partial)
                    if streaming and not hold and not partial and event.text:
                        # A route that does not stream still streams to the caller.
                        self.released.append(event.text)
                        yield event.text
                    yield event
                elif isinstance(event, Tried):
                    await self._record_tried(route, attempt, event)
                    started, partial = time.time(), []
                elif isinstance(event, Aborted):
                    await self._record_aborted(route, attempt, event)
                    if event.block is not None:
                        raise _Stop(event.block)
        finally:
            await events.aclose()

    async def _release(
        self, segment: str, route: Route, attempt: Attempt, started: float, partial: list[str]
    ) -> str:
        """Check one sentence (``post_output`` with ``final=False``) and release it."""
        output = Output(text=segment, final=False, released="".join(self.released))
        text, block = await self._post_output(output)
        if block is not None:
            # The call is cut short: its record says so, then the turn ends.
            aborted = Aborted("blocked", block.reason, started, "".join(partial), block)
            await self._record_aborted(route, attempt, aborted)
            raise _Stop(block)
        self.released.append(text)
        return text

    # ------------------------------------------------------------------
    # phases
    # ------------------------------------------------------------------

    async def _pre_input(self) -> tuple[Deferred, ...]:
        log = self.log
        deferred: list[Deferred] = []
        blocked: list[Block] = []

        def step(plugin: str, result: Any, current: Turn) -> tuple[Turn, bool]:
            if isinstance(result, Turn):
                log.decisions.append(Rewrite(value=result, reason="input rewritten", plugin=plugin))
                return result, False
            if isinstance(result, Rewrite):
                if not isinstance(result.value, Turn):
                    raise NimpipeError(f"plugin {plugin!r}: pre_input Rewrite.value must be a Turn")
                log.decisions.append(stamp(result, plugin))
                return result.value, False
            if isinstance(result, Block):
                blocked.append(self._decide(result, plugin))
                return current, True
            if isinstance(result, Deferred):
                deferred.append(stamp(result, plugin))
                return current, False
            raise NimpipeError(
                f"plugin {plugin!r}: pre_input returned {type(result).__name__}; "
                "expected Turn, Rewrite, Block, Deferred or None"
            )

        self.turn = await self.plugins.chain(
            "pre_input", self.mode.resolve, "turn", self.turn, step, pipeline=self.pipeline
        )
        if blocked:
            raise _Stop(blocked[0])
        return tuple(deferred)

    async def _select(self, attempt: Attempt) -> Route | None:
        turn = self.turn
        candidates = tuple(self.config.routes.values())
        if self.config.offline:
            candidates = tuple(r for r in candidates if is_local(r))
        if isinstance(attempt.cause, Escalate):
            candidates = tuple(r for r in candidates if r.name not in attempt.tried)
        if not candidates:
            return None
        if self.plugins.has_impls("filter_routes"):

            def step(plugin: str, result: Any, current: tuple[Route, ...]) -> tuple[Any, bool]:
                kept = kept_routes(plugin, result)
                return kept, not kept

            candidates = await self.plugins.chain(
                "filter_routes",
                self.mode.resolve,
                "routes",
                candidates,
                step,
                turn=turn,
                pipeline=self.pipeline,
            )
            if not candidates:
                return None
        found = await self.plugins.first(
            "select_provider",
            self.mode.resolve,
            turn=turn,
            routes=candidates,
            attempt=attempt,
            pipeline=self.pipeline,
        )
        if found is None:
            return None
        plugin, choice = found
        route, reason = selected(plugin, choice, self.config)
        self.route_reasons[attempt.number] = [(plugin, reason)]
        return route

    async def _before_call(self, route: Route, attempt: Attempt) -> Route:
        log = self.log
        blocked: list[Block] = []

        reasons = self.route_reasons.setdefault(attempt.number, [])

        def step(plugin: str, result: Any, current: Route) -> tuple[Route, bool]:
            if isinstance(result, RouteChoice):
                reasons.append((plugin, result.reason))
                if result.route == current:
                    return current, False
                result = result.route
            if isinstance(result, Route):
                log.decisions.append(
                    Rewrite(
                        value=result.name,
                        reason=f"route {current.name} -> {result.name}",
                        plugin=plugin,
                    )
                )
                return result, False
            if isinstance(result, Block):
                blocked.append(self._decide(result, plugin))
                return current, True
            raise NimpipeError(
                f"plugin {plugin!r}: before_call returned {type(result).__name__}; "
                "expected Route, RouteChoice, Block or None"
            )

        route = await self.plugins.chain(
            "before_call",
            self.mode.resolve,
            "route",
            route,
            step,
            turn=self.turn,
            attempt=attempt,
            pipeline=self.pipeline,
        )
        if blocked:
            raise _Stop(blocked[0])
        return route

    async def _judge(
        self,
        route: Route,
        response: Response | None,
        error: ProviderError | None,
        attempt: Attempt,
    ) -> Any:
        results = await self.plugins.collect(
            "on_response",
            self.mode.resolve,
            turn=self.turn,
            route=route,
            response=response,
            error=error,
            attempt=attempt,
            pipeline=self.pipeline,
        )
        best: Any = None
        for plugin, result in results:
            strength = _STRENGTH.get(type(result))
            if strength is None:
                raise NimpipeError(
                    f"plugin {plugin!r}: on_response returned {type(result).__name__}; "
                    "expected Accept, Retry, Escalate, Block or None"
                )
            result = stamp(result, plugin)
            self.log.decisions.append(result)
            if best is None or strength > _STRENGTH[type(best)]:
                best = result
        return best

    async def _post_output(self, output: Output) -> tuple[str, Block | None]:
        log = self.log
        blocked: list[Block] = []

        def step(plugin: str, result: Any, current: Output) -> tuple[Output, bool]:
            if isinstance(result, str):
                log.decisions.append(
                    Rewrite(value=result, reason="output rewritten", plugin=plugin)
                )
                return attrs.evolve(current, text=result), False
            if isinstance(result, Rewrite):
                if not isinstance(result.value, str):
                    raise NimpipeError(
                        f"plugin {plugin!r}: post_output Rewrite.value must be a str"
                    )
                log.decisions.append(stamp(result, plugin))
                return attrs.evolve(current, text=result.value), False
            if isinstance(result, Block):
                blocked.append(self._decide(result, plugin))
                return current, True
            raise NimpipeError(
                f"plugin {plugin!r}: post_output returned {type(result).__name__}; "
                "expected str, Rewrite, Block or None"
            )

        final = await self.plugins.chain(
            "post_output",
            self.mode.resolve,
            "output",
            output,
            step,
            turn=self.turn,
            pipeline=self.pipeline,
        )
        return final.text, (blocked[0] if blocked else None)

    def _decide(self, decision: Any, plugin: str) -> Any:
        """Stamp ``decision`` with its plugin, log it, and return it."""
        decision = stamp(decision, plugin)
        self.log.decisions.append(decision)
        return decision

    # ------------------------------------------------------------------
    # records
    # ------------------------------------------------------------------

    async def _record_response(
        self, route: Route, attempt: Attempt, response: Response, outcome: str, reason: str
    ) -> None:
        await self._emit(
            make_record(
                self.turn,
                route,
                attempt,
                usage=response.usage,
                started=time.time() - response.latency,
                latency=response.latency,
                ttft=response.ttft,
                outcome=outcome,
                reason=reason,
                stream=self.streaming,
                error=None,
            )
        )

    async def _record_tried(self, route: Route, attempt: Attempt, tried: Tried) -> None:
        usage = estimate(self.turn, tried.partial, route) if tried.partial else Usage(source="none")
        await self._emit(
            make_record(
                self.turn,
                route,
                attempt,
                usage=usage,
                started=tried.started,
                latency=time.time() - tried.started,
                ttft=None,
                outcome="retried" if tried.retrying else "error",
                reason=str(tried.error),
                stream=self.streaming,
                error=tried.error.kind,
            )
        )

    async def _record_aborted(self, route: Route, attempt: Attempt, aborted: Aborted) -> None:
        # A call cut short still spent the prompt's tokens: estimate them.
        await self._emit(
            make_record(
                self.turn,
                route,
                attempt,
                usage=estimate(self.turn, aborted.partial, route),
                started=aborted.started,
                latency=time.time() - aborted.started,
                ttft=None,
                outcome=aborted.outcome,
                reason=aborted.reason,
                stream=bool(aborted.partial),
                error=None,
            )
        )

    async def _emit(self, record: CallRecord) -> None:
        log = self.log
        why = join_reasons(self.route_reasons.get(record.attempt, []))
        if why:
            record = attrs.evolve(record, routing_reason=why)
        if len(log.verdicts) > log.attached:
            record = attrs.evolve(record, verdicts=tuple(log.verdicts[log.attached :]))
            log.attached = len(log.verdicts)
        log.records.append(record)
        if self.plugins.has_impls("record_cost"):
            await self.plugins.collect(
                "record_cost",
                self.mode.resolve,
                record=record,
                turn=self.turn,
                pipeline=self.pipeline,
            )

    def _blocked(
        self, block: Block, route: Route | None = None, response: Response | None = None
    ) -> TurnResult:
        log = self.log
        return TurnResult(
            turn=self.turn,
            text=block.message,
            response=response,
            route=route,
            blocked=block,
            decisions=tuple(log.decisions),
            records=tuple(log.records),
            verdicts=tuple(log.verdicts),
        )


# --------------------------------------------------------------------------
# records and small decisions
# --------------------------------------------------------------------------


def make_record(
    turn: Turn,
    route: Route,
    attempt: Attempt,
    *,
    usage: Usage,
    started: float,
    latency: float,
    ttft: float | None,
    outcome: str,
    reason: str,
    stream: bool,
    error: str | None,
) -> CallRecord:
    """The record of one model call."""
    price = route.price
    cost = price.cost(usage.prompt_tokens, usage.completion_tokens) if price else 0.0
    return CallRecord(
        time=started,
        turn_id=turn.id,
        agent_id=turn.agent_id,
        agent_type=turn.agent_type,
        route=route.name,
        provider=route.host,
        model=turn.model or route.model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        usage_source=usage.source,
        cost_usd=cost,
        price_source=price.source if price else "none",
        latency=latency,
        ttft=ttft,
        outcome=outcome,
        error=error,
        attempt=attempt.number,
        reason=reason,
        stream=stream,
    )


def estimate(turn: Turn, completion_text: str, route: Route) -> Usage:
    """Token counts counted locally, for calls whose server reported none.

    Loading a vocabulary takes a second or more on a busy machine: a turn with
    a deadline never waits for it (it counts a character quarter and has the
    vocabulary loaded in the background for the turns after it).
    """
    from nimpipe import tokens

    model = turn.model or route.model
    if turn.deadline is not None and not tokens.encoding_ready(model):
        tokens.load_in_background(model)
        chars = sum(len(m.content or "") for m in turn.messages)
        prompt = (chars + 3) // 4 + tokens.TOKENS_PER_MESSAGE * len(turn.messages)
        completion = (len(completion_text) + 3) // 4
        return Usage(prompt_tokens=prompt, completion_tokens=completion, source="estimated")
    prompt = tokens.count_messages(turn.messages, model, turn.tools).count
    completion = tokens.count_tokens(completion_text, model).count if completion_text else 0
    return Usage(prompt_tokens=prompt, completion_tokens=completion, source="estimated")


def _outcome_of(decision: Any, error: ProviderError | None) -> str:
    if isinstance(decision, Escalate):
        return "escalated"
    if isinstance(decision, Retry):
        return "retried"
    if isinstance(decision, Block):
        return "blocked"
    return "error" if error is not None else "ok"


def _reason(decision: Any) -> str:
    if decision is None:
        return ""
    return f"{decision.plugin}: {decision.reason}" if decision.reason else decision.plugin
