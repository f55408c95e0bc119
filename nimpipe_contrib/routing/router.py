"""Stage ``router``: choose each turn's route from what the turn looks like.

Two hooks:

``filter_routes`` (every attempt)
    drops routes whose context window cannot hold the prompt plus room for
    the answer (``route.context_length``, from the config or a catalog
    stage), and routes that failed ``unhealthy_after`` times in a row (for
    ``cooldown`` seconds).  It never drops every route: when none fits, the
    list is left alone and the call's error decides.
``select_provider`` (``tryfirst``; the first call of a turn that names no
route or model)
    the first matching rule wins; else, with ``mode = "cost"``, the cost
    optimiser picks the cheapest healthy route of an adequate tier; else it
    leaves the choice to the next stage (the cascade, then ``default_route``).
    Escalations and retries are left to those stages too.

Every choice is noted with its reason (see :mod:`nimpipe_contrib.routing.reasons`):
the ledger stores it with the call's record, and the ``nimpipe.routing``
logger prints it at DEBUG level.

Settings (``[stages.router]``): each setting is a field of
:class:`RouterStage`, with its default; ``docs/routing-cost.md`` explains
them.  Rules, for example::

    [stages.router]
    mode = "cost"                # rules first, then the cost optimiser

    [[stages.router.rules]]      # subagent specialisation: orchestrator on the frontier
    match = { agent_type = "orchestrator" }
    route = "frontier"

    [[stages.router.rules]]      # tool-heavy subagents on the self-hosted NIM
    match = { tools_min = 3 }
    route = "local"

    [[stages.router.rules]]
    match = { tags = ["code"] }
    route = "coder"

    [[stages.router.rules]]      # long contexts: the cheapest tier-1 route that fits
    match = { tokens_min = 30000 }
    tier = 1

A rule's ``match`` may hold ``tools_min``, ``tools_max``, ``tokens_min``,
``tokens_max`` (estimated prompt tokens), ``tags`` (all of them),
``any_tags`` (one of them), ``agent_type``, ``agent_name`` (jaato's agent
name, else the agent id) and ``agent_id`` (each a name or a list of names).
A rule sends the turn to ``route`` (a route name) or to the cheapest route
of ``tier``; ``name`` labels it in reasons.  A rule whose route is not
available for the turn (filtered out, too small) is skipped.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe.stage import StageSettings, hookimpl
from nimpipe.types import Attempt, CallRecord, Route, Turn
from nimpipe_contrib.cost import prices as pricing
from nimpipe_contrib.routing.reasons import reasons_for

if TYPE_CHECKING:
    from nimpipe.pipeline import Pipeline
    from nimpipe_contrib.routing.reasons import RouteReasons

__all__ = ["Complexity", "Match", "RouterStage", "Rule", "create_plugin", "estimate_complexity"]

STAGE = "router"
_KNOWN = (
    "mode",
    "rules",
    "thresholds",
    "completion_tokens",
    "context_margin",
    "infer_tags",
    "unhealthy_after",
    "cooldown",
    "prices",
)
_MATCH_KEYS = (
    "tools_min",
    "tools_max",
    "tokens_min",
    "tokens_max",
    "tags",
    "any_tags",
    "agent_type",
    "agent_name",
    "agent_id",
)
#: Error kinds that count against a route's health.
_HEALTH_ERRORS = frozenset({"unavailable", "timeout", "rate_limit", "malformed_reply"})

_CODE = re.compile(r"```|^\s*(?:def|class|import|from \S+ import|#include|fn|func) ", re.MULTILINE)
_HARD = re.compile(
    r"\b(prove|proof|derive|analy[sz]e|optimi[sz]e|architect\w*|design|refactor|debug|"
    r"step[- ]by[- ]step|reason(?:ing)?|trade-?offs?|compare|evaluate|plan|explain why)\b",
    re.IGNORECASE,
)


def _agent_name(turn: Turn) -> str | None:
    jaato = turn.metadata.get("jaato")
    if isinstance(jaato, dict) and isinstance(jaato.get("agent_name"), str):
        return str(jaato["agent_name"])
    name = turn.metadata.get("agent_name")
    return name if isinstance(name, str) else None


def infer_tags(turn: Turn) -> frozenset[str]:
    """``turn.tags`` plus ``code`` when the last user message holds code."""
    if "code" not in turn.tags and _CODE.search(turn.last_user_text):
        return turn.tags | {"code"}
    return turn.tags


# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Match:
    """What a turn must look like for a rule to apply (every given condition must hold)."""

    tools_min: int | None = None
    tools_max: int | None = None
    tokens_min: int | None = None
    tokens_max: int | None = None
    tags: frozenset[str] = frozenset()
    any_tags: frozenset[str] = frozenset()
    agent_type: frozenset[str] = frozenset()
    agent_name: frozenset[str] = frozenset()
    agent_id: frozenset[str] = frozenset()

    @property
    def needs_tokens(self) -> bool:
        return self.tokens_min is not None or self.tokens_max is not None

    def explain(self, turn: Turn, tags: frozenset[str], tokens: int | None) -> str | None:
        """Why the turn matches (``None`` if it does not)."""
        why = []
        tools = len(turn.tools)
        if self.tools_min is not None:
            if tools < self.tools_min:
                return None
            why.append(f"{tools} tools >= {self.tools_min}")
        if self.tools_max is not None:
            if tools > self.tools_max:
                return None
            why.append(f"{tools} tools <= {self.tools_max}")
        if self.needs_tokens:
            assert tokens is not None
            if self.tokens_min is not None:
                if tokens < self.tokens_min:
                    return None
                why.append(f"~{tokens} prompt tokens >= {self.tokens_min}")
            if self.tokens_max is not None:
                if tokens > self.tokens_max:
                    return None
                why.append(f"~{tokens} prompt tokens <= {self.tokens_max}")
        if self.tags:
            if not self.tags <= tags:
                return None
            why.append(f"tags {sorted(self.tags)}")
        if self.any_tags:
            hit = self.any_tags & tags
            if not hit:
                return None
            why.append(f"tag {sorted(hit)[0]}")
        if self.agent_type:
            if turn.agent_type not in self.agent_type:
                return None
            why.append(f"agent type {turn.agent_type}")
        if self.agent_name:
            name = _agent_name(turn) or turn.agent_id
            if name not in self.agent_name:
                return None
            why.append(f"agent {name}")
        if self.agent_id:
            if turn.agent_id not in self.agent_id:
                return None
            why.append(f"agent id {turn.agent_id}")
        return ", ".join(why) or "always"


@attrs.frozen(kw_only=True)
class Rule:
    """Send turns that ``match`` to ``route``, or to the cheapest route of ``tier``."""

    match: Match
    route: str | None = None
    tier: int | None = None
    name: str = ""


def _names(table: StageSettings, key: str) -> frozenset[str]:
    return frozenset(table.strings(key, ()))


def _parse_rule(item: StageSettings, index: int, routes: Sequence[str]) -> Rule:
    item.only(("match", "route", "tier", "name"))
    match = item.sub("match")
    match.only(_MATCH_KEYS)
    route = item.string("route", None)
    tier = item.integer("tier", None)
    if (route is None) == (tier is None):
        raise item.fail("route", "a rule needs a route or a tier (one of them)")
    if route is not None and route not in routes:
        raise item.fail(
            "route", f"names no configured route: {route!r} (routes: {', '.join(routes) or 'none'})"
        )
    return Rule(
        match=Match(
            tools_min=match.integer("tools_min", None),
            tools_max=match.integer("tools_max", None),
            tokens_min=match.integer("tokens_min", None),
            tokens_max=match.integer("tokens_max", None),
            tags=_names(match, "tags"),
            any_tags=_names(match, "any_tags"),
            agent_type=_names(match, "agent_type"),
            agent_name=_names(match, "agent_name"),
            agent_id=_names(match, "agent_id"),
        ),
        route=route,
        tier=tier,
        name=item.string("name", f"rule {index + 1}"),
    )


# --------------------------------------------------------------------------
# The cost optimiser
# --------------------------------------------------------------------------


@attrs.frozen
class Complexity:
    """How demanding a turn looks, 0 (trivial) to 1 (hard), and what made it so."""

    score: float
    why: tuple[str, ...]


def estimate_complexity(turn: Turn, prompt_tokens: int, tags: frozenset[str]) -> Complexity:
    """A cheap heuristic: prompt length, tools, demanding words, code, ``hard``/``easy`` tags.

    Length adds up to 0.35 (at 8,000 prompt tokens), tools up to 0.15 (at 8),
    words such as *prove*, *analyse*, *refactor*, *step by step* up to 0.3
    (at 3 of them), code 0.1; the tag ``hard`` adds 0.3, ``easy`` caps the
    score at 0.1.
    """
    parts = []
    score = 0.0
    length = min(1.0, prompt_tokens / 8000) * 0.35
    if length >= 0.01:
        parts.append(f"length {length:.2f}")
    score += length
    if turn.tools:
        tools = min(1.0, len(turn.tools) / 8) * 0.15
        score += tools
        parts.append(f"{len(turn.tools)} tools {tools:.2f}")
    words = len(_HARD.findall(turn.last_user_text))
    if words:
        demanding = min(1.0, words / 3) * 0.3
        score += demanding
        parts.append(f"demanding words {demanding:.2f}")
    if "code" in tags:
        score += 0.1
        parts.append("code 0.10")
    if "hard" in tags:
        score += 0.3
        parts.append("tag hard 0.30")
    score = min(1.0, score)
    if "easy" in tags and score > 0.1:
        score = 0.1
        parts.append("tag easy caps at 0.10")
    return Complexity(round(score, 3), tuple(parts))


# --------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------


@attrs.define
class RouterStage:
    """The ``router`` stage of one pipeline; its fields are the ``[stages.router]`` settings."""

    #: ``[[stages.router.rules]]``, in order: the first that matches wins.
    rules: tuple[Rule, ...] = ()
    #: ``rules``, or ``cost``: when no rule matches, the cost optimiser picks.
    mode: str = "rules"
    #: Complexity from which tier 1, tier 2, ... is needed (increasing, 0 to 1).
    thresholds: tuple[float, ...] = (0.3, 0.6)
    #: Expected answer length in tokens, for costs and context fit.
    completion_tokens: int = 512
    #: Local token counts are estimates: the prompt is counted this much larger.
    context_margin: float = 1.1
    #: Tag a turn ``code`` when its last user message holds code.
    infer_tags: bool = True
    #: Consecutive failed calls that take a route out of rotation.
    unhealthy_after: int = 3
    #: Seconds a route stays out.
    cooldown: float = 30.0
    _failures: dict[str, int] = attrs.field(factory=dict, init=False)
    _down_until: dict[str, float] = attrs.field(factory=dict, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _reasons: RouteReasons | None = attrs.field(default=None, init=False)
    _book: pricing.PriceBook | None = attrs.field(default=None, init=False)

    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        self.apply_settings(StageSettings.of(pipeline, STAGE), tuple(pipeline.config.routes))
        pricing.price_routes(pipeline)
        self._book = pricing.price_book_for(pipeline)
        self._reasons = reasons_for(pipeline)

    def apply_settings(self, settings: StageSettings, routes: Sequence[str]) -> None:
        """Read a ``[stages.router]`` table (raises ``ConfigError`` naming the key)."""
        settings.only(_KNOWN)
        default = {field.name: field.default for field in attrs.fields(RouterStage)}
        self.mode = settings.choice("mode", ("rules", "cost"), default["mode"])
        self.rules = tuple(
            _parse_rule(item, i, routes) for i, item in enumerate(settings.tables("rules"))
        )
        thresholds = settings.numbers("thresholds", default["thresholds"])
        if list(thresholds) != sorted(thresholds) or any(not 0 <= t <= 1 for t in thresholds):
            raise settings.fail("thresholds", "must be increasing numbers between 0 and 1")
        self.thresholds = thresholds
        self.completion_tokens = settings.integer(
            "completion_tokens", default["completion_tokens"], minimum=1
        )
        self.context_margin = settings.number(
            "context_margin", default["context_margin"], minimum=1.0
        )
        self.infer_tags = settings.boolean("infer_tags", default["infer_tags"])
        self.unhealthy_after = settings.integer(
            "unhealthy_after", default["unhealthy_after"], minimum=1
        )
        self.cooldown = settings.number("cooldown", default["cooldown"], minimum=0.0)

    # -- helpers ----------------------------------------------------------

    def _note(self, turn: Turn, attempt: int, reason: str) -> None:
        if self._reasons is not None:
            self._reasons.note(turn.id, attempt, STAGE, reason)

    def _tokens(self, turn: Turn, routes: Sequence[Route]) -> int:
        model = turn.model or (routes[0].model if routes else "")
        return pricing.estimate_prompt_tokens(turn, model)

    def _needed(self, turn: Turn, route: Route, tokens: int) -> int:
        answer = pricing.completion_limit(turn, route) or self.completion_tokens
        return math.ceil(tokens * self.context_margin) + answer

    def _fits_everywhere(self, turn: Turn, routes: Sequence[Route], window: int) -> bool:
        # The byte bound is cheap; the tokenizer runs only when the bound is too close.
        answer = max(pricing.completion_limit(turn, r) or self.completion_tokens for r in routes)
        return pricing.prompt_token_bound(turn) + answer <= window

    def _healthy(self, route: Route, now: float) -> bool:
        until = self._down_until.get(route.name)
        return until is None or until <= now

    def _cost(self, turn: Turn, route: Route) -> float:
        price = self._book.price_for(route) if self._book is not None else route.price
        if price is None:
            return math.inf
        return pricing.estimate_call(
            turn, route, price=price, default_completion=self.completion_tokens
        ).usd

    def _cheapest(self, turn: Turn, routes: Sequence[Route]) -> tuple[Route, float]:
        ranked = sorted(
            ((self._cost(turn, r), r.tier, i, r) for i, r in enumerate(routes)),
            key=lambda c: c[:3],
        )
        return ranked[0][3], ranked[0][0]

    # -- hooks ------------------------------------------------------------

    @hookimpl
    def filter_routes(self, turn: Turn, routes: tuple[Route, ...]) -> tuple[Route, ...] | None:
        now = time.monotonic()
        kept = routes
        if self._down_until:
            healthy = tuple(r for r in kept if self._healthy(r, now))
            if healthy:
                kept = healthy
        windows = [r.context_length for r in kept if r.context_length]
        if windows and not self._fits_everywhere(turn, kept, min(windows)):
            tokens = self._tokens(turn, kept)
            fitting = tuple(
                r
                for r in kept
                if r.context_length is None or self._needed(turn, r, tokens) <= r.context_length
            )
            if fitting:
                kept = fitting
        return kept if len(kept) != len(routes) else None

    @hookimpl(tryfirst=True)
    def select_provider(
        self, turn: Turn, routes: tuple[Route, ...], attempt: Attempt
    ) -> Route | None:
        if attempt.cause is not None or turn.route is not None or turn.model is not None:
            return None
        if not routes:
            return None
        tags = infer_tags(turn) if self.infer_tags else turn.tags
        tokens: int | None = None
        if any(rule.match.needs_tokens for rule in self.rules) or self.mode == "cost":
            tokens = self._tokens(turn, routes)
        by_name = {r.name: r for r in routes}
        for rule in self.rules:
            why = rule.match.explain(turn, tags, tokens)
            if why is None:
                continue
            if rule.route is not None:
                route = by_name.get(rule.route)
                if route is None:
                    self._note(
                        turn, attempt.number, f"{rule.name} ({why}): {rule.route} unavailable"
                    )
                    continue
                self._note(turn, attempt.number, f"{rule.name} ({why}) -> {route.name}")
                return route
            tiered = [r for r in routes if r.tier == rule.tier]
            if not tiered:
                self._note(turn, attempt.number, f"{rule.name} ({why}): no tier-{rule.tier} route")
                continue
            route, usd = self._cheapest(turn, tiered)
            self._note(
                turn,
                attempt.number,
                f"{rule.name} ({why}) -> {route.name}, the cheapest tier-{rule.tier} route "
                f"(~${usd:.6f})",
            )
            return route
        if self.mode == "cost":
            assert tokens is not None
            return self._optimise(turn, routes, tokens, tags, attempt)
        return None

    def _optimise(
        self,
        turn: Turn,
        routes: Sequence[Route],
        tokens: int,
        tags: frozenset[str],
        attempt: Attempt,
    ) -> Route:
        complexity = estimate_complexity(turn, tokens, tags)
        needed = sum(1 for t in self.thresholds if complexity.score >= t)
        top = max(r.tier for r in routes)
        tier = min(needed, top)
        adequate = [r for r in routes if r.tier >= tier]
        route, usd = self._cheapest(turn, adequate)
        why = ", ".join(complexity.why) or "short and plain"
        self._note(
            turn,
            attempt.number,
            f"cost optimiser: complexity {complexity.score:.2f} ({why}) needs tier >= {tier}; "
            f"cheapest is {route.name} (~${usd:.6f})",
        )
        return route

    @hookimpl
    def record_cost(self, record: CallRecord) -> None:
        if record.outcome == "ok":
            if record.route in self._failures:
                with self._lock:
                    self._failures.pop(record.route, None)
                    self._down_until.pop(record.route, None)
            return
        if record.error not in _HEALTH_ERRORS:
            return
        with self._lock:
            count = self._failures.get(record.route, 0) + 1
            self._failures[record.route] = count
            if count >= self.unhealthy_after:
                self._down_until[record.route] = time.monotonic() + self.cooldown

    def health(self) -> dict[str, Any]:
        """Routes currently out of rotation: name -> seconds left."""
        now = time.monotonic()
        return {
            name: round(until - now, 1) for name, until in self._down_until.items() if until > now
        }


def create_plugin() -> RouterStage:
    """A fresh ``router`` stage for one pipeline."""
    return RouterStage()
