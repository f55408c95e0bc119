"""The cascade's answer scorers: cheap local checks, each giving 0 (bad) to 1 (fine).

``empty``       no text and no tool call (0.0);
``refused``     the answer opens with a refusal ("I'm sorry, but I can't ...") (0.1);
``truncated``   the model hit ``max_tokens`` (``finish_reason = "length"``) (0.2);
``too_short``   fewer words than the question asks for: ``min_answer_words``,
                or ``detailed_min_words`` for questions that ask to explain,
                describe, compare, list ... (words / expected);
``tool_loop``   the model proposes a tool call it already made
                ``tool_repeat_limit`` times with the same arguments (0.1);
``logprobs``    the mean token log-probability, where the server returns
                them, is below ``min_mean_logprob`` (0.3).

Each scorer reads its limits from the cascade's settings
(:class:`~nimpipe_contrib.routing.cascade.CascadeSettings`).  The
``self_assessment`` scorer is a model call the cascade stage makes itself;
:func:`parse_rating` reads its answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs

from nimpipe.types import FinishReason, Response, Role, Turn

if TYPE_CHECKING:
    from nimpipe_contrib.routing.cascade import CascadeSettings

__all__ = [
    "DEFAULT_SCORERS",
    "REFUSALS",
    "SCORERS",
    "Score",
    "Scorer",
    "parse_rating",
    "score_response",
]

#: The scorers used unless ``scorers`` says otherwise.
DEFAULT_SCORERS = ("empty", "refused", "truncated", "too_short", "tool_loop", "logprobs")

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

#: The refusal patterns ``refused`` looks for (``refusal_patterns`` adds more).
REFUSALS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE | re.DOTALL) for p in _REFUSALS
)


@attrs.frozen
class Score:
    """One scorer's verdict on an answer: ``value`` 0 (bad) to 1 (fine) and why."""

    scorer: str
    value: float
    detail: str


#: A scorer: ``None`` when it finds nothing wrong with the answer.
Scorer = Callable[[Turn, Response, "CascadeSettings"], "Score | None"]


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
    """Every enabled local scorer's verdict that found a problem (``[]``: none did).

    ``settings`` defaults to the cascade's defaults.
    """
    if settings is None:
        from nimpipe_contrib.routing.cascade import CascadeSettings

        settings = CascadeSettings()
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
