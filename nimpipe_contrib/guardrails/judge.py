"""How the ``guardrails`` stage reaches a decision on one text: verdicts in, block or rewrite out.

:class:`Judge` runs the backends (on the stage's event loop, bounded by
``timeout`` and the turn's deadline) and the providers' checker hooks, turns
every failure into an ``error`` (fail-closed) or ``unchecked`` (``fail_open``)
verdict, records every verdict (:func:`~nimpipe_contrib.guardrails.verdicts.publish_verdict`)
and decides: the first ``block`` wins, then the first ``error``, then the
last ``rewrite``; in ``report`` mode nothing is decided.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs

from nimpipe.errors import BackendUnavailable, NimpipeError
from nimpipe.stage import scrub, scrub_fields
from nimpipe.types import Block, Turn, Verdict
from nimpipe_contrib.guardrails.backends.base import Backend
from nimpipe_contrib.guardrails.backends.loop import LoopThread
from nimpipe_contrib.guardrails.settings import STAGE, GuardrailsSettings
from nimpipe_contrib.guardrails.verdicts import UNAVAILABLE_RULE, VerdictLog, publish_verdict

if TYPE_CHECKING:
    from nimpipe.pipeline import Pipeline

__all__ = ["Judge", "Kind", "Outcome", "ready"]

#: What a check judges.
Kind = Literal["input", "output", "tool call"]


@attrs.frozen
class Outcome:
    """What a judgement decided: a block, a rewrite, or neither (let through)."""

    block: Block | None = None
    #: The rewritten text, when a verdict rewrote it.
    text: str | None = None
    #: The verdict that rewrote it.
    rewrite: Verdict | None = None


async def ready(verdicts: list[Verdict]) -> list[Verdict]:
    """``verdicts`` as the pending verdicts :meth:`Judge.decide` awaits."""
    return verdicts


async def _await(value: Any) -> Any:
    return await value


@attrs.define
class Judge:
    """Gets the verdicts of the backends and the providers, records them, and decides."""

    settings: GuardrailsSettings
    #: The configured backends.
    backends: tuple[Backend, ...]
    #: The event loop the backends run on.
    loop: LoopThread
    #: Where every verdict is kept per turn.
    log: VerdictLog

    async def run_backends(
        self,
        turn: Turn,
        check: Callable[[Backend], Coroutine[Any, Any, Verdict | None]],
        backends: Sequence[Backend] | None = None,
    ) -> list[Verdict]:
        """Run ``check`` on each backend (default: all) at once; failures become verdicts."""
        timeout = self.settings.timeout
        remaining = turn.remaining()
        if remaining is not None:
            timeout = max(0.001, min(timeout, remaining))

        async def one(backend: Backend) -> Verdict | None:
            started = time.perf_counter()
            try:
                verdict = await self.loop.run(asyncio.wait_for(check(backend), timeout))
            except BackendUnavailable as exc:
                return self.unavailable(backend.name, exc.reason, started)
            except (asyncio.TimeoutError, TimeoutError):
                return self.unavailable(backend.name, f"no verdict within {timeout:g} s", started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return self.unavailable(backend.name, f"{type(exc).__name__}: {exc}", started)
            if verdict is None:
                return None
            return attrs.evolve(verdict, plugin=STAGE)

        chosen = self.backends if backends is None else backends
        results = await asyncio.gather(*(one(b) for b in chosen))
        return [v for v in results if v is not None]

    async def provider_verdicts(
        self, pipeline: Pipeline, hook: str, **kwargs: Any
    ) -> list[Verdict]:
        """The verdicts of every implementation of checker hook ``hook`` (collected)."""
        if not pipeline.plugins.has_impls(hook):
            return []
        started = time.perf_counter()
        try:
            results = await pipeline.plugins.collect(hook, _await, pipeline=pipeline, **kwargs)
        except NimpipeError as exc:
            plugin = getattr(exc, "plugin", "?")
            return [self.unavailable(f"hook:{plugin}", str(exc), started)]
        verdicts = []
        for plugin, result in results:
            if not isinstance(result, Verdict):
                reason = f"{hook} returned {type(result).__name__}, not a Verdict"
                verdicts.append(self.unavailable(f"hook:{plugin}", reason, started))
                continue
            latency = result.latency or (time.perf_counter() - started)
            verdicts.append(
                attrs.evolve(
                    result,
                    plugin=result.plugin or plugin,
                    backend=result.backend or f"hook:{plugin}",
                    latency=latency,
                )
            )
        return verdicts

    def unavailable(self, backend: str, reason: str, started: float) -> Verdict:
        """The verdict of a backend that could not judge: ``error``, or fail-open ``unchecked``."""
        return Verdict(
            rule=UNAVAILABLE_RULE,
            decision="unchecked" if self.settings.fail_open else "error",
            plugin=STAGE,
            backend=scrub(backend),
            latency=time.perf_counter() - started,
            detail=scrub(reason),
        )

    def block(self, verdict: Verdict, reason: str) -> Block:
        """The block ``verdict`` causes; the user sees ``message``."""
        return Block(
            reason=scrub(reason),
            plugin=STAGE,
            rule=verdict.rule,
            message=self.settings.message,
        )

    async def decide(
        self,
        turn: Turn,
        kind: Kind,
        text: str,
        pipeline: Pipeline,
        pending: Coroutine[Any, Any, list[Verdict]],
    ) -> Outcome:
        """Await the verdicts, record them, and decide (nothing is decided in report mode)."""
        verdicts = [scrub_fields(verdict) for verdict in await pending]
        settings = self.settings
        report = settings.mode == "report"
        for verdict in verdicts:
            recorded = verdict
            if verdict.decision == "rewrite":
                recorded = attrs.evolve(
                    verdict, detail=f"{kind} rewritten ({len(text)} -> {len(verdict.detail)} chars)"
                )
            if report and verdict.decision in ("block", "rewrite", "error"):
                recorded = attrs.evolve(recorded, detail=f"report only: {recorded.detail}".strip())
            publish_verdict(pipeline, turn, recorded, self.log)
        if report:
            return Outcome()
        for verdict in verdicts:
            if verdict.decision == "block" or (
                kind == "tool call" and verdict.decision == "rewrite"
            ):
                reason = f"{kind} blocked by {verdict.rule} ({verdict.backend})"
                if verdict.detail and verdict.decision == "block":
                    reason += f": {verdict.detail}"
                return Outcome(block=self.block(verdict, reason))
        for verdict in verdicts:
            if verdict.decision == "error":
                reason = f"guardrails unavailable ({verdict.backend}): {verdict.detail}"
                return Outcome(block=self.block(verdict, reason))
        rewrite = None
        for verdict in verdicts:
            if verdict.decision == "rewrite":
                rewrite = verdict
        if rewrite is not None:
            return Outcome(text=rewrite.detail, rewrite=rewrite)
        return Outcome()
