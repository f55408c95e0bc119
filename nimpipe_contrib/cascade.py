"""Stage ``cascade``: answer on the cheap tier first, judge the answer, escalate while it is poor.

Routing that only looks at a prompt guesses; the cascade looks at the answer.
The first call of a turn goes to the cheapest route of the lowest tier (a
self-hosted NIM, usually), unless the turn names a route or the ``router``
stage (which goes first) chose one.  ``on_response`` then scores the answer with
cheap local scorers, each giving 0 (bad) to 1 (fine):

``empty``       no text and no tool call (0.0);
``refused``     the answer opens with a refusal ("I'm sorry, but I can't ...") (0.1);
``truncated``   the model hit ``max_tokens`` (``finish_reason = "length"``) (0.2);
``too_short``   fewer words than the question asks for: ``min_answer_words``,
                or ``detailed_min_words`` for questions that ask to explain,
                describe, compare, list ... (words / expected);
``tool_loop``   the model proposes a tool call it already made
                ``tool_repeat_limit`` times with the same arguments (0.1);
``logprobs``    the mean token log-probability, where the server returns
                them, is below ``min_mean_logprob`` (0.3);
``self_assessment`` (off by default) a second call on the same route rates the
                answer 0-10 (rating / 10); it is a model call of its own,
                recorded like any other.

The turn's score is the lowest.  Below ``threshold`` the cascade returns
``Escalate`` with the failing scorer's reason and the score, and its
``select_provider`` sends the next call to the cheapest route of the next
higher tier; the loop repeats while the score stays low and a higher tier is
left (``max_attempts`` bounds it).  With no higher tier the answer is
accepted, and the acceptance says why.  A failed call (error or timeout,
after the transport retries) fails over to an untried route of the same or a
higher tier.  Every decision carries its reason; the ledger records it.

Settings (``[stages.cascade]``)::

    threshold = 0.5
    scorers = ["empty", "refused", "truncated", "too_short", "tool_loop", "logprobs"]
    start_low = true             # first call on the cheapest lowest-tier route
    failover = true              # escalate on errors and timeouts
    min_answer_words = 2
    detailed_min_words = 25
    tool_repeat_limit = 2
    min_mean_logprob = -1.5
    refusal_patterns = []        # extra regular expressions for refusals
    assess_prompt = "..."        # the self_assessment instruction
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe._markers import hookimpl
from nimpipe.types import (
    Accept,
    Attempt,
    Escalate,
    FinishReason,
    Message,
    Response,
    Role,
    Route,
    Turn,
)
from nimpipe_contrib import pricing
from nimpipe_contrib._settings import StageSettings
from nimpipe_contrib.route_reasons import reasons_for

if TYPE_CHECKING:
    from nimpipe.errors import ProviderError
    from nimpipe.pipeline import Pipeline
    from nimpipe_contrib.route_reasons import RouteReasons

__all__ = [
    "DEFAULT_SCORERS",
    "JUDGE_TAG",
    "SCORERS",
    "CascadeSettings",
    "CascadeStage",
    "Score",
    "create_plugin",
    "score_response",
]

STAGE = "cascade"
#: Tag of the self-assessment turns the cascade makes (never judged themselves).
JUDGE_TAG = "nimpipe:cascade-judge"
#: The scorers used unless ``scorers`` says otherwise.
DEFAULT_SCORERS = ("empty", "refused", "truncated", "too_short", "tool_loop", "logprobs")

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
_REFUSALS = (
    r"^\W*(?:i'?m|i am)\s+(?:very\s+|so\s+)?sorry\b.{0,80}?\b(?:can(?:no|')t|cannot|unable|"
    r"not able|won'?t)\b",
    r"^\W*sorry\b.{0,40}?\b(?:can(?:no|')t|cannot|unable|not able|won'?t)\b",
    r"^\W*i\s+(?:can(?:no|')t|cannot|won'?t|am unable to|am not able to|'m unable to|"
    r"'m not able to)\s+(?:help|assist|answer|provide|comply|do that|respond)",
    r"^\W*as an ai\b",
)
_DETAILED = re.compile(
    r"\b(explain|describe|why|how (?:do|does|did|can|would|should|to)|compare|list|write|"
    r"summari[sz]e|steps?|walk me through|in detail|elaborate|outline|discuss|analy[sz]e)\b",
    re.IGNORECASE,
)
_RATING = re.compile(r"\b(10|[0-9])(?:\s*/\s*10)?\b")


@attrs.frozen
class Score:
    """One scorer's verdict on an answer: ``value`` 0 (bad) to 1 (fine) and why."""

    scorer: str
    value: float
    detail: str


@attrs.frozen(kw_only=True)
class CascadeSettings:
    """What the scorers need (see the module docstring for each setting)."""

    threshold: float = 0.5
    scorers: tuple[str, ...] = DEFAULT_SCORERS
    start_low: bool = True
    failover: bool = True
    min_answer_words: int = 2
    detailed_min_words: int = 25
    tool_repeat_limit: int = 2
    min_mean_logprob: float = -1.5
    refusals: tuple[re.Pattern[str], ...] = tuple(
        re.compile(p, re.IGNORECASE | re.DOTALL) for p in _REFUSALS
    )
    assess_prompt: str = DEFAULT_ASSESS_PROMPT

    @property
    def self_assessment(self) -> bool:
        return "self_assessment" in self.scorers

    @classmethod
    def from_settings(cls, settings: StageSettings) -> CascadeSettings:
        """Read a ``[stages.cascade]`` table (raises ``ConfigError`` naming the key)."""
        settings.only(_KNOWN)
        scorers = settings.strings("scorers", DEFAULT_SCORERS)
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
            threshold=settings.number("threshold", 0.5, maximum=1.0),
            scorers=scorers,
            start_low=settings.boolean("start_low", True),
            failover=settings.boolean("failover", True),
            min_answer_words=settings.integer("min_answer_words", 2),
            detailed_min_words=settings.integer("detailed_min_words", 25),
            tool_repeat_limit=settings.integer("tool_repeat_limit", 2, minimum=1),
            min_mean_logprob=settings.number("min_mean_logprob", -1.5, minimum=None, maximum=0.0),
            refusals=cls().refusals + tuple(extra),
            assess_prompt=settings.string("assess_prompt", DEFAULT_ASSESS_PROMPT),
        )


# --------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------

Scorer = Callable[[Turn, Response, CascadeSettings], "Score | None"]


def score_empty(turn: Turn, response: Response, settings: CascadeSettings) -> Score | None:
    """No text and no tool call."""
    if response.text.strip() or response.tool_calls:
        return None
    return Score("empty", 0.0, "empty answer")


def score_refused(turn: Turn, response: Response, settings: CascadeSettings) -> Score | None:
    """The answer opens with a refusal."""
    head = response.text.strip()[:300]
    if not head:
        return None
    for pattern in settings.refusals:
        if pattern.search(head):
            shown = head[:60] + ("..." if len(head) > 60 else "")
            return Score("refused", 0.1, f"the answer opens with {shown!r}")
    return None


def score_truncated(turn: Turn, response: Response, settings: CascadeSettings) -> Score | None:
    """The model stopped at ``max_tokens``."""
    if response.finish_reason is FinishReason.LENGTH:
        return Score("truncated", 0.2, "cut off at max_tokens (finish_reason=length)")
    return None


def score_too_short(turn: Turn, response: Response, settings: CascadeSettings) -> Score | None:
    """Fewer words than the question asks for (final answers to a user message only)."""
    if response.tool_calls or not turn.messages or turn.messages[-1].role is not Role.USER:
        return None
    if not response.text.strip():
        return None  # the "empty" scorer's case
    question = turn.last_user_text
    expected = settings.min_answer_words
    if _DETAILED.search(question):
        expected = max(expected, settings.detailed_min_words)
    words = len(response.text.split())
    if expected <= 0 or words >= expected:
        return None
    return Score(
        "too_short",
        round(words / expected, 3),
        f"{words} words for a question that asks for at least {expected}",
    )


def _call_key(name: str, arguments: str) -> tuple[str, str]:
    try:
        canonical = json.dumps(json.loads(arguments), sort_keys=True, separators=(",", ":"))
    except ValueError:
        canonical = arguments.strip()
    return name, canonical


def score_tool_loop(turn: Turn, response: Response, settings: CascadeSettings) -> Score | None:
    """A proposed tool call already made ``tool_repeat_limit`` times with the same arguments."""
    if not response.tool_calls:
        return None
    made: dict[tuple[str, str], int] = {}
    for message in turn.messages:
        for call in message.tool_calls:
            key = _call_key(call.name, call.arguments)
            made[key] = made.get(key, 0) + 1
    for call in response.tool_calls:
        count = made.get(_call_key(call.name, call.arguments), 0)
        if count >= settings.tool_repeat_limit:
            return Score(
                "tool_loop",
                0.1,
                f"tool call {call.name} proposed a {count + 1}th time with the same arguments",
            )
    return None


def score_logprobs(turn: Turn, response: Response, settings: CascadeSettings) -> Score | None:
    """Mean token log-probability below ``min_mean_logprob`` (when the server returns them)."""
    if not response.logprobs:
        return None
    mean = sum(response.logprobs) / len(response.logprobs)
    if mean >= settings.min_mean_logprob:
        return None
    return Score(
        "logprobs", 0.3, f"mean token logprob {mean:.2f} < {settings.min_mean_logprob:.2f}"
    )


#: The local scorers by name (``self_assessment`` is the cascade's own call).
SCORERS: Mapping[str, Scorer] = {
    "empty": score_empty,
    "refused": score_refused,
    "truncated": score_truncated,
    "too_short": score_too_short,
    "tool_loop": score_tool_loop,
    "logprobs": score_logprobs,
}


def score_response(
    turn: Turn, response: Response, settings: CascadeSettings | None = None
) -> list[Score]:
    """Every enabled local scorer's verdict that found a problem (``[]``: none did)."""
    settings = settings or CascadeSettings()
    found = []
    for name in settings.scorers:
        scorer = SCORERS.get(name)
        if scorer is not None:
            score = scorer(turn, response, settings)
            if score is not None:
                found.append(score)
    return found


def parse_rating(text: str) -> int | None:
    """The 0-10 rating in a self-assessment reply, or ``None``."""
    match = _RATING.search(text)
    return int(match.group(1)) if match else None


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
