"""What ``select_provider`` and ``before_call`` may answer, read once.

Both hooks name a route: a :class:`~nimpipe.types.Route`, the name of a
configured one (``select_provider`` only) or a :class:`~nimpipe.types.RouteChoice`
that carries the stage's reason with it.  The turn runner keeps the reasons of
every stage that gave one and writes them, joined, on each record of that call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nimpipe.errors import NimpipeError
from nimpipe.types import Attempt, Route, RouteChoice, Turn

if TYPE_CHECKING:
    from nimpipe.config import Config

__all__ = ["is_local", "join_reasons", "kept_routes", "no_route_message", "selected"]


def selected(plugin: str, result: Any, config: Config) -> tuple[Route, str]:
    """The route and reason of a ``select_provider`` answer (``""`` when it gave none)."""
    reason = ""
    if isinstance(result, RouteChoice):
        result, reason = result.route, result.reason
    if isinstance(result, str):
        result = config.route(result)
    if not isinstance(result, Route):
        raise NimpipeError(f"plugin {plugin!r}: select_provider returned {type(result).__name__}")
    return result, reason


def kept_routes(plugin: str, result: Any) -> tuple[Route, ...]:
    """The routes a ``filter_routes`` answer keeps."""
    kept = tuple(result)
    if not all(isinstance(r, Route) for r in kept):
        raise NimpipeError(f"plugin {plugin!r}: filter_routes must return routes")
    return kept


def join_reasons(reasons: list[tuple[str, str]]) -> str:
    """``"<plugin>: <reason>"`` for each reason given, joined with ``"; "``."""
    return "; ".join(f"{plugin}: {reason}" for plugin, reason in reasons if reason)


def is_local(route: Route) -> bool:
    """Whether ``route`` is self-hosted or on loopback (the routes offline mode may use)."""
    from nimpipe.hosts import host_of, is_loopback

    return route.self_hosted or is_loopback(host_of(route.base_url))


def no_route_message(turn: Turn, attempt: Attempt, config: Config) -> str:
    """Why no route is left for ``turn``: the error message of :class:`NoRouteError`."""
    if not config.routes:
        return (
            "no route is configured: add [routes.NAME] to nimpipe.toml, or set "
            "NIMPIPE_BASE_URL and NIMPIPE_MODEL (or jaato's JAATO_NIM_BASE_URL and JAATO_NIM_MODEL)"
        )
    if config.offline and not any(is_local(r) for r in config.routes.values()):
        return (
            "offline mode: no route is local or self-hosted (mark one with "
            "self_hosted = true, or turn offline mode off)"
        )
    if turn.route is not None and attempt.number == 1:
        return (
            f"turn {turn.id} asks for route {turn.route!r}, which is not available "
            f"(routes: {', '.join(config.routes)})"
        )
    return f"no route left for turn {turn.id} (tried: {', '.join(attempt.tried) or 'none'})"
