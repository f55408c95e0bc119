"""Every exception nimpipe raises.

Each exception carries the object it is about (the route, the plugin, the file)
so that callers can act on it without parsing messages.  None of them ever
holds an API key: routes keep keys in :class:`nimpipe.types.Secret`, whose
``repr`` is masked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nimpipe.redaction import scrub

if TYPE_CHECKING:
    from nimpipe.types import Block, Route, Turn

__all__ = [
    "AuthenticationError",
    "BlockedError",
    "CancelledError",
    "ConfigError",
    "ContextOverflowError",
    "DeadlineExceededError",
    "HookError",
    "MalformedReplyError",
    "NimpipeError",
    "NoRouteError",
    "OfflineError",
    "PluginLoadError",
    "ProviderError",
    "RateLimitError",
    "TimeoutError",
    "UnavailableError",
]


class NimpipeError(Exception):
    """Base class of every error nimpipe raises."""


class ConfigError(NimpipeError):
    """The configuration is invalid; names the file, the key and the problem."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        where = []
        if path:
            where.append(str(path))
        if key:
            where.append(f"key {key!r}")
        prefix = f"{': '.join(where)}: " if where else ""
        super().__init__(f"{prefix}{message}")


class PluginLoadError(NimpipeError):
    """A plugin could not be loaded or registered; carries the plugin name."""

    def __init__(self, message: str, *, plugin: str) -> None:
        self.plugin = plugin
        super().__init__(message)


class HookError(NimpipeError):
    """A hook implementation raised; names the plugin and the hook, chained to the cause."""

    def __init__(self, *, plugin: str, hook: str, cause: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        super().__init__(
            f"plugin {plugin!r} failed in hook {hook!r}: {type(cause).__name__}: {cause}"
        )


class NoRouteError(NimpipeError):
    """No route is configured or none is left to try for a turn."""

    def __init__(self, message: str, *, turn_id: str | None = None) -> None:
        self.turn_id = turn_id
        super().__init__(message)


class BlockedError(NimpipeError):
    """A stage blocked the turn; carries the :class:`~nimpipe.types.Block` decision."""

    def __init__(self, block: Block) -> None:
        self.block = block
        super().__init__(f"blocked by {block.plugin or 'a stage'}: {block.reason}")


class DeadlineExceededError(NimpipeError):
    """The turn ran past its deadline."""

    def __init__(self, message: str, *, turn_id: str | None = None) -> None:
        self.turn_id = turn_id
        super().__init__(message)


class CancelledError(NimpipeError):
    """The turn was cancelled through its cancel token."""

    def __init__(self, message: str = "turn cancelled", *, turn_id: str | None = None) -> None:
        self.turn_id = turn_id
        super().__init__(message)


class OfflineError(NimpipeError):
    """Offline mode refused a connection to a host that is not local."""

    def __init__(self, message: str, *, host: str | None = None) -> None:
        self.host = host
        super().__init__(message)


class ProviderError(NimpipeError):
    """A model call failed; carries the route and, when known, the HTTP status.

    ``transient`` says whether trying again may succeed (the pipeline retries
    transient errors with backoff, within the turn's deadline).
    """

    transient: bool = False
    #: The turn as it passed the input checks before the call failed (its
    #: rewritten input included), or ``None``: retry it with
    #: ``pipeline.run(error.checked_turn, input_checked=True)``.
    checked_turn: Turn | None = None

    def __init__(
        self,
        message: str,
        *,
        route: Route | None = None,
        status_code: int | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        self.route = route
        self.status_code = status_code
        self.retry_after = retry_after
        self.body = body
        # A server may echo the key it refused: never carry it in the message.
        message = scrub(message, [route.api_key.reveal()] if route and route.api_key else [])
        #: The message without the route prefix.
        self.message = message
        where = f"route {route.name!r}: " if route is not None else ""
        super().__init__(f"{where}{message}")

    @property
    def kind(self) -> str:
        """Short stable name of the error kind, used in ledger records."""
        return _KINDS.get(type(self), "provider_error")


class AuthenticationError(ProviderError):
    """The endpoint refused the API key (HTTP 401 or 403)."""


class RateLimitError(ProviderError):
    """The endpoint answered HTTP 429; ``retry_after`` holds its Retry-After, in seconds."""

    transient = True


class ContextOverflowError(ProviderError):
    """The prompt does not fit the model's context window."""


class UnavailableError(ProviderError):
    """The endpoint is down, refused the connection, answered 5xx or cut the reply short."""

    transient = True


class MalformedReplyError(ProviderError):
    """The endpoint answered with something that is not a valid completion."""

    transient = True


class TimeoutError(ProviderError):
    """The endpoint did not answer within the route's timeout or the turn's deadline."""

    transient = True


_KINDS: dict[type, str] = {
    ProviderError: "provider_error",
    AuthenticationError: "authentication",
    RateLimitError: "rate_limit",
    ContextOverflowError: "context_overflow",
    UnavailableError: "unavailable",
    MalformedReplyError: "malformed_reply",
    TimeoutError: "timeout",
}
