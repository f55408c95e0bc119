"""Built-in stage ``default_route``: the route choice every other policy overrides.

Registered ``trylast`` so that any routing plugin answers first.  Its order:

1. a ``Retry`` goes back to the route that answered;
2. an ``Escalate`` naming a route goes there; one naming none goes to the
   cheapest route (lowest tier, then configuration order) of a higher tier
   than the one that answered;
3. ``turn.route`` if the caller named one;
4. a route whose model is ``turn.model``;
5. the configured ``default_route``;
6. the first candidate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nimpipe._markers import hookimpl
from nimpipe.types import Attempt, Escalate, Retry, Route, Turn

if TYPE_CHECKING:
    from nimpipe.pipeline import Pipeline


@hookimpl(trylast=True)
def select_provider(
    turn: Turn, routes: tuple[Route, ...], attempt: Attempt, pipeline: Pipeline
) -> Route | None:
    by_name = {r.name: r for r in routes}
    cause = attempt.cause
    previous = attempt.previous_route
    if isinstance(cause, Retry) and previous is not None:
        return by_name.get(previous.name)
    if isinstance(cause, Escalate):
        if cause.route is not None:
            return by_name.get(cause.route)
        floor = previous.tier if previous is not None else -1
        higher = [r for r in routes if r.tier > floor and r.name not in attempt.tried]
        return min(higher, key=lambda r: r.tier) if higher else None
    if turn.route is not None:
        return by_name.get(turn.route)
    if turn.model is not None:
        for route in routes:
            if route.model == turn.model:
                return route
    default = pipeline.config.default_route
    if default is not None and default in by_name:
        return by_name[default]
    return routes[0] if routes else None
