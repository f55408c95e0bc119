"""Stage ``cascade``: answer on the cheap tier first, judge the answer, escalate while it is poor.

Routing that only looks at a prompt guesses; the cascade looks at the answer.
The first call of a turn goes to the cheapest route of the lowest tier (a
self-hosted NIM, usually), unless the turn names a route or the ``router``
stage (which goes first) chose one.  ``on_response`` then scores the answer
with the cheap local scorers of :mod:`nimpipe_contrib.routing.scorers`, each
giving 0 (bad) to 1 (fine); ``self_assessment`` (off by default) adds a
second call on the same route that rates the answer 0-10 (rating / 10), a
model call of its own, recorded like any other.

The turn's score is the lowest.  Below ``threshold`` the cascade returns
``Escalate`` with the failing scorer's reason and the score, and its
``select_provider`` sends the next call to the cheapest route of the next
higher tier; the loop repeats while the score stays low and a higher tier is
left (``max_attempts`` bounds it).  With no higher tier the answer is
accepted, and the acceptance says why.  A failed call (error or timeout,
after the transport retries) fails over to an untried route of the same or a
higher tier.  Every decision carries its reason; the ledger records it.

Settings (``[stages.cascade]``): each setting is a field of
:class:`CascadeSettings`, with its default; ``docs/routing-cost.md``
explains them.
"""

from __future__ import annotations

import re
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe.stage import StageSettings, hookimpl
from nimpipe.types import Accept, Attempt, Escalate, Message, Response, Route, Turn
from nimpipe_contrib.cost import prices as pricing
from nimpipe_contrib.routing.reasons import reasons_for
from nimpipe_contrib.routing.scorers import (
    DEFAULT_SCORERS,
    REFUSALS,
    SCORERS,
    parse_rating,
    score_response,
)

if TYPE_CHECKING:
    from nimpipe.errors import ProviderError
    from nimpipe.pipeline import Pipeline
    from nimpipe_contrib.routing.reasons import RouteReasons

__all__ = ["JUDGE_TAG", "CascadeSettings", "CascadeStage", "create_plugin"]

STAGE = "cascade"
#: Tag of the self-assessment turns the cascade makes (never judged themselves).
JUDGE_TAG = "nimpipe:cascade-judge"

DEFAULT_ASSESS_PROMPT = (
    "You grade answers. Rate how well the answer addresses the question, from 0 "
    "(useless or wrong) to 10 (complete and correct). Reply with the number only."
)

_KNOWN = (
    "threshold",
    "scorers",
    "start_low",
    "failover",
    "min_answer_words",
    "detailed_min_words",
    "tool_repeat_limit",
    "min_mean_logprob",
    "refusal_patterns",
    "assess_prompt",
    "prices",
)


@attrs.frozen(kw_only=True)
class CascadeSettings:
    """The ``[stages.cascade]`` table: what the stage and its scorers need."""

    #: Escalate while the lowest score is below it.
    threshold: float = 0.5
    #: Which scorers run (:data:`~nimpipe_contrib.routing.scorers.SCORERS`, ``self_assessment``).
    scorers: tuple[str, ...] = DEFAULT_SCORERS
    #: A turn's first call goes to the cheapest route of the lowest tier.
    start_low: bool = True
    #: On an error or timeout, escalate to an untried route of the same or a higher tier.
    failover: bool = True
    #: ``too_short``: the fewest words an answer may have.
    min_answer_words: int = 2
    #: ``too_short``: the fewest words for a question that asks to explain, describe, list ...
    detailed_min_words: int = 25
    #: ``tool_loop``: how often the same tool call may have been made already.
    tool_repeat_limit: int = 2
    #: ``logprobs``: the lowest acceptable mean token log-probability.
    min_mean_logprob: float = -1.5
    #: ``refused``: the refusal patterns (``refusal_patterns`` adds to them).
    refusals: tuple[re.Pattern[str], ...] = REFUSALS
    #: ``self_assessment``: the instruction of the rating call.
    assess_prompt: str = DEFAULT_ASSESS_PROMPT

    @property
    def self_assessment(self) -> bool:
        """Whether the ``self_assessment`` scorer is on."""
        return "self_assessment" in self.scorers

    @classmethod
    def from_settings(cls, settings: StageSettings) -> CascadeSettings:
        """Read a ``[stages.cascade]`` table (raises ``ConfigError`` naming the key)."""
        settings.only(_KNOWN)
        default = cls()
        scorers = settings.strings("scorers", default.scorers)
        known = (*SCORERS, "self_assessment")
        for name in scorers:
            if name not in known:
                raise settings.fail(
                    "scorers", f"unknown scorer {name!r} (known: {', '.join(known)})"
                )
        extra = []
        for pattern in settings.strings("refusal_patterns", ()):
            try:
                extra.append(re.compile(pattern, re.IGNORECASE | re.DOTALL))
            except re.error as exc:
                raise settings.fail("refusal_patterns", f"bad pattern {pattern!r}: {exc}") from None
        return cls(
            threshold=settings.number("threshold", default.threshold, maximum=1.0),
            scorers=scorers,
            start_low=settings.boolean("start_low", default.start_low),
            failover=settings.boolean("failover", default.failover),
            min_answer_words=settings.integer("min_answer_words", default.min_answer_words),
            detailed_min_words=settings.integer("detailed_min_words", default.detailed_min_words),
            tool_repeat_limit=settings.integer(
                "tool_repeat_limit", default.tool_repeat_limit, minimum=1
            ),
            min_mean_logprob=settings.number(
                "min_mean_logprob", default.min_mean_logprob, minimum=None, maximum=0.0
            ),
            refusals=default.refusals + tuple(extra),
            assess_prompt=settings.string("assess_prompt", default.assess_prompt),
        )


# --------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------


@attrs.define
class CascadeStage:
    """The ``cascade`` stage of one pipeline."""

    settings: CascadeSettings = attrs.field(factory=CascadeSettings)
    _reasons: RouteReasons | None = attrs.field(default=None, init=False)
    _book: pricing.PriceBook | None = attrs.field(default=None, init=False)

    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        self.settings = CascadeSettings.from_settings(StageSettings.of(pipeline, STAGE))
        pricing.price_routes(pipeline)
        self._book = pricing.price_book_for(pipeline)
        self._reasons = reasons_for(pipeline)

    # -- choosing the route ------------------------------------------------

    def _note(self, turn: Turn, attempt: int, reason: str) -> None:
        if self._reasons is not None:
            self._reasons.note(turn.id, attempt, STAGE, reason)

    def _cheapest(self, turn: Turn, routes: list[Route]) -> Route:
        def cost(route: Route) -> float:
            price = self._book.price_for(route) if self._book is not None else route.price
            if price is None:
                return float("inf")
            return price.input_per_1k + price.output_per_1k

        lowest = min(r.tier for r in routes)
        return min((r for r in routes if r.tier == lowest), key=cost)

    @hookimpl
    def select_provider(
        self, turn: Turn, routes: tuple[Route, ...], attempt: Attempt
    ) -> Route | None:
        if not routes or JUDGE_TAG in turn.tags:
            return None
        cause = attempt.cause
        previous = attempt.previous_route
        if isinstance(cause, Escalate) and cause.plugin == STAGE and cause.route is None:
            floor = previous.tier if previous is not None else -1
            # A failover (no score) may stay on the same tier; a quality escalation may not.
            failover = cause.score is None
            candidates = [r for r in routes if r.tier > floor or (failover and r.tier == floor)]
            if not candidates:
                return None
            route = self._cheapest(turn, candidates)
            self._note(
                turn,
                attempt.number,
                f"{'failover' if failover else 'escalation'} to "
                f"{route.name} (tier {route.tier}): {cause.reason}",
            )
            return route
        if cause is None and self.settings.start_low and turn.route is None and turn.model is None:
            route = self._cheapest(turn, list(routes))
            self._note(
                turn, attempt.number, f"start on the cheapest lowest-tier route {route.name}"
            )
            return route
        return None

    # -- judging the answer ------------------------------------------------

    @staticmethod
    def _untried(pipeline: Pipeline, route: Route, attempt: Attempt) -> list[Route]:
        tried = {*attempt.tried, route.name}
        return [r for r in pipeline.routes if r.name not in tried]

    @hookimpl
    def on_response(
        self,
        turn: Turn,
        route: Route,
        response: Response | None,
        error: ProviderError | None,
        attempt: Attempt,
        pipeline: Pipeline,
    ) -> Escalate | Accept | Coroutine[Any, Any, Escalate | Accept] | None:
        if JUDGE_TAG in turn.tags:
            return None
        untried = self._untried(pipeline, route, attempt)
        if error is not None:
            if not self.settings.failover:
                return None
            if not any(r.tier >= route.tier for r in untried):
                return None
            return Escalate(reason=f"failover: {error.kind} on {route.name}: {error.message[:160]}")
        if response is None:
            return None
        higher = any(r.tier > route.tier for r in untried)
        threshold = self.settings.threshold
        scores = score_response(turn, response, self.settings)
        if scores:
            worst = min(scores, key=lambda s: s.value)
            if worst.value < threshold:
                why = f"{worst.scorer}: {worst.detail} (score {worst.value:.2f} < {threshold:.2f})"
                if higher:
                    return Escalate(reason=why, score=worst.value)
                return Accept(reason=f"{why}, but no higher tier is left")
        if self.settings.self_assessment and higher and response.text and not response.tool_calls:
            return self._assess(turn, route, response, pipeline)
        if scores:
            worst = min(scores, key=lambda s: s.value)
            return Accept(
                reason=f"lowest score {worst.scorer} {worst.value:.2f} >= {threshold:.2f}"
            )
        return Accept(reason=f"passed {len(self.settings.scorers)} scorers on {route.name}")

    async def _assess(
        self, turn: Turn, route: Route, response: Response, pipeline: Pipeline
    ) -> Escalate | Accept:
        judge = Turn.create(
            [
                Message.system(self.settings.assess_prompt),
                Message.user(
                    f"Question:\n{turn.last_user_text}\n\nAnswer:\n{response.text}\n\n"
                    "Rating (0-10):"
                ),
            ],
            route=route.name,
            agent_id=turn.agent_id,
            agent_type=turn.agent_type,
            tags={JUDGE_TAG},
            params={"max_tokens": 8, "temperature": 0},
            deadline=turn.deadline,
        )
        result = await pipeline.arun(judge)
        rating = parse_rating(result.text)
        if rating is None:
            return Accept(reason=f"self_assessment: unreadable rating {result.text[:40]!r}")
        value = rating / 10
        threshold = self.settings.threshold
        why = f"self_assessment: rated {rating}/10 (score {value:.2f}"
        if value < threshold:
            return Escalate(reason=f"{why} < {threshold:.2f})", score=value)
        return Accept(reason=f"{why} >= {threshold:.2f})")


def create_plugin() -> CascadeStage:
    """A fresh ``cascade`` stage for one pipeline."""
    return CascadeStage()
