"""Guarded generation (``approach = "generation"``): the model call made through the NeMo server.

The route is rewritten to the server's ``/v1`` (:func:`generation_route`), and
the server's reply carries the log of the rails it ran, which becomes
verdicts (:func:`generation_verdicts`) that :func:`judge_generation`
records and enforces.  The ``guardrails.generation`` companion plugin calls
both, through the stage.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe.stage import NO_STREAM, scrub
from nimpipe.types import Retry, Secret, Verdict
from nimpipe_contrib.guardrails.backends.base import INPUT_RAILS, NEMO_REFUSAL, OUTPUT_RAILS
from nimpipe_contrib.guardrails.judge import Judge, ready
from nimpipe_contrib.guardrails.settings import STAGE, GuardrailsSettings
from nimpipe_contrib.guardrails.verdicts import GENERATION_BACKEND

if TYPE_CHECKING:
    from nimpipe.errors import ProviderError
    from nimpipe.pipeline import Pipeline
    from nimpipe.types import Attempt, Block, Response, Route, Turn

__all__ = [
    "FAIL_OPEN_RETRY",
    "generation_log",
    "generation_route",
    "generation_verdicts",
    "is_generation_route",
    "judge_generation",
    "streamed_block_rail",
]

#: Reason prefix of the retry that calls a route directly when the guardrails server is down.
FAIL_OPEN_RETRY = "guardrails server unavailable, fail_open"

#: How NeMo Guardrails 0.24 words the error chunk that ends a stream its output rail blocked.
_STREAM_BLOCK = re.compile(r"Blocked by (?P<rail>[^.]+?) rails\.")


def generation_route(settings: GuardrailsSettings, route: Route, attempt: Attempt) -> Route | None:
    """``route`` sent through the NeMo Guardrails server, or ``None`` to call it directly.

    Same name, model, price and limits, so records and the ledger stay
    attributed to the route; the base URL is the server's ``/v1``, the
    request carries ``guardrails.config_id`` and asks for the rails' log,
    and the route's own key is replaced by the server's (``api_key_env``):
    a model key never goes to another host.  After a fail-open retry the
    route is called directly.
    """
    if is_generation_route(route):
        return None
    cause = attempt.cause
    if (
        isinstance(cause, Retry)
        and cause.plugin == STAGE
        and cause.reason.startswith(FAIL_OPEN_RETRY)
    ):
        return None
    key = settings.api_key(settings.api_key_env, "api_key_env")
    return attrs.evolve(
        route,
        base_url=settings.generation_url,
        api_key=Secret(key) if key else None,
        api_key_env=settings.api_key_env,
        extra_body={**route.extra_body, **settings.generation_body()},
        # Only a non-streamed reply carries the server's rails log.
        flags=route.flags | {NO_STREAM},
    )


def streamed_block_rail(message: str) -> str | None:
    """The rail that cut a streamed guarded generation, from the error it ended with."""
    found = _STREAM_BLOCK.search(message)
    return found["rail"] if found else None


def is_generation_route(route: Route) -> bool:
    """Whether ``route`` is already the guarded-generation rewrite of a route."""
    return isinstance(route.extra_body.get("guardrails"), Mapping)


def generation_log(response: Response) -> Mapping[str, Any] | None:
    """The ``guardrails`` object of a guarded generation's reply, if it has one."""
    data = response.extra.get("guardrails")
    return data if isinstance(data, Mapping) else None


def _rail_latency(rail: Mapping[str, Any]) -> float:
    duration = rail.get("duration")
    if isinstance(duration, (int, float)):
        return float(duration)
    total = 0.0
    for action in rail.get("executed_actions") or ():
        if isinstance(action, Mapping) and isinstance(action.get("duration"), (int, float)):
            total += float(action["duration"])
    return total


def generation_verdicts(guardrails: Mapping[str, Any]) -> tuple[list[Verdict], list[Verdict]]:
    """Input and output verdicts from a guarded generation's ``guardrails`` object.

    One verdict per activated input or output rail (``block`` when it
    stopped the turn); a rail named by ``output_data.triggered_input_rail`` /
    ``triggered_output_rail`` but missing from the log blocks too.
    """
    kinds: dict[str, list[Verdict]] = {"input": [], "output": []}
    log = guardrails.get("log")
    rails = log.get("activated_rails") if isinstance(log, Mapping) else None
    for rail in rails or ():
        if not isinstance(rail, Mapping) or rail.get("type") not in kinds:
            continue
        kind = str(rail["type"])
        stopped = bool(rail.get("stop"))
        kinds[kind].append(
            Verdict(
                rule=str(rail.get("name") or (INPUT_RAILS if kind == "input" else OUTPUT_RAILS)),
                decision="block" if stopped else "pass",
                plugin=STAGE,
                backend=GENERATION_BACKEND,
                latency=_rail_latency(rail),
                detail=f"{kind} blocked" if stopped else "",
            )
        )
    data = guardrails.get("output_data")
    for kind in ("input", "output"):
        triggered = data.get(f"triggered_{kind}_rail") if isinstance(data, Mapping) else None
        if not triggered:
            continue
        verdicts = kinds[kind]
        if any(v.rule == triggered and v.decision == "block" for v in verdicts):
            continue
        verdicts.append(
            Verdict(
                rule=str(triggered),
                decision="block",
                plugin=STAGE,
                backend=GENERATION_BACKEND,
                detail=f"{kind} blocked",
            )
        )
    return kinds["input"], kinds["output"]


async def judge_generation(
    judge: Judge,
    turn: Turn,
    route: Route,
    response: Response | None,
    error: ProviderError | None,
    pipeline: Pipeline,
) -> Block | Retry | None:
    """Record the rails a guarded generation ran; block when one of them stopped the turn.

    A server that cannot be reached, fails or times out counts as
    unavailable: fail-closed blocks, ``fail_open`` records ``unchecked``
    and calls the route directly once.
    """
    if not is_generation_route(route):
        return None
    started = time.perf_counter()
    if response is None:
        rail = streamed_block_rail(error.message) if error is not None else None
        if rail is not None:
            verdict = Verdict(
                rule=rail,
                decision="block",
                plugin=STAGE,
                backend=GENERATION_BACKEND,
                latency=time.perf_counter() - started,
                detail="the server cut the stream: output blocked",
            )
            return (await judge.decide(turn, "output", "", pipeline, ready([verdict]))).block
        if error is None or not error.transient:
            return None  # not the guardrails' doing (a refused key, a bad request)
        verdict = judge.unavailable(GENERATION_BACKEND, error.message, started)
        outcome = await judge.decide(turn, "input", "", pipeline, ready([verdict]))
        if outcome.block is not None:
            return outcome.block
        return Retry(reason=scrub(f"{FAIL_OPEN_RETRY}: {error.message}"), plugin=STAGE)
    log = generation_log(response)
    if log is None:
        if response.ttft is None:
            reason = (
                f"the reply of {route.host} carries no guardrails log "
                "(not a NeMo Guardrails server, or the config_id is unknown)"
            )
            verdict = judge.unavailable(GENERATION_BACKEND, reason, started)
            return (await judge.decide(turn, "output", "", pipeline, ready([verdict]))).block
        if response.text.strip() != NEMO_REFUSAL:
            return None  # streamed: post_output judges the held-back text
        verdict = Verdict(
            rule=INPUT_RAILS,
            decision="block",
            plugin=STAGE,
            backend=GENERATION_BACKEND,
            detail="the server streamed its refusal (a streamed reply carries no rails log)",
        )
        return (await judge.decide(turn, "input", "", pipeline, ready([verdict]))).block
    inputs, outputs = generation_verdicts(log)
    outcome = await judge.decide(turn, "input", "", pipeline, ready(inputs))
    if outcome.block is not None:
        return outcome.block
    return (await judge.decide(turn, "output", "", pipeline, ready(outputs))).block
