"""Every exception nimpipe raises.

Each exception carries the object it is about (the route, the plugin, the file)
so that callers can act on it without parsing messages.  None of them ever
shows an API key, even one a server echoed: see :class:`NimpipeError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nimpipe.redaction import contains_secret, scrub, scrub_data, scrub_fields

if TYPE_CHECKING:
    from nimpipe.types import Block, Route, Turn

__all__ = [
    "AuthenticationError",
    "BackendUnavailable",
    "BlockedError",
    "CancelledError",
    "ConfigError",
    "ContextOverflowError",
    "DeadlineExceededError",
    "HookError",
    "InvalidRequestError",
    "MalformedReplyError",
    "NimpipeError",
    "NoRouteError",
    "OfflineError",
    "PluginLoadError",
    "PrometheusParseError",
    "ProviderError",
    "RateLimitError",
    "RedactedError",
    "TimeoutError",
    "UnavailableError",
    "redacted",
]


#: The exception links as :class:`BaseException` stores them.
_CAUSE: Any = BaseException.__dict__["__cause__"]
_CONTEXT: Any = BaseException.__dict__["__context__"]
#: How many chained exceptions are examined (chains can be cycles).
_MAX_CHAIN = 64


class NimpipeError(Exception):
    """Base class of every error nimpipe raises.

    It never shows a secret (a registered key or anything key-shaped, see
    :mod:`nimpipe.redaction`): its arguments and attributes are scrubbed when
    they are set, its ``str`` and ``repr`` are scrubbed, and an exception of
    another library that it is chained to and whose text would show a secret
    reads, through ``__cause__`` and ``__context__`` (what :mod:`traceback`,
    :mod:`logging` and pytest print), as a :class:`RedactedError` with the
    scrubbed text.  Chained exceptions that show no secret are kept as they are.
    """

    # The stand-ins given out for chained exceptions, by the id of the exception they
    # stand in for (kept beside it, so that the id stays valid); a slot, not in vars().
    __slots__ = ("_nimpipe_links",)
    _nimpipe_links: dict[int, tuple[BaseException, BaseException]]

    def __init__(self, *args: Any) -> None:
        super().__init__(*(scrub_data(arg) for arg in args))

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name.startswith("__") and name.endswith("__")):
            value = _scrubbed_attribute(value)
        super().__setattr__(name, value)

    def __str__(self) -> str:
        return scrub(super().__str__())

    def __repr__(self) -> str:
        return scrub(super().__repr__())

    @property
    def __cause__(self) -> BaseException | None:
        return self._safe_link(_CAUSE.__get__(self))

    @__cause__.setter
    def __cause__(self, value: BaseException | None) -> None:
        _CAUSE.__set__(self, value)

    @property
    def __context__(self) -> BaseException | None:
        return self._safe_link(_CONTEXT.__get__(self))

    @__context__.setter
    def __context__(self, value: BaseException | None) -> None:
        _CONTEXT.__set__(self, value)

    def _safe_link(self, link: BaseException | None) -> BaseException | None:
        if link is None or isinstance(link, NimpipeError):
            return link
        try:
            memo = self._nimpipe_links
        except AttributeError:
            memo = {}
            object.__setattr__(self, "_nimpipe_links", memo)
        return redacted(link, memo)


class RedactedError(NimpipeError):
    """Stands in for another library's exception whose text would show a secret.

    Carries the original's type (``original_type``, a dotted name), its
    scrubbed message and its traceback, and is chained as the original was
    (to stand-ins, where those would show a secret too).
    """

    def __init__(self, original: BaseException) -> None:
        kind = type(original)
        module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
        #: The dotted name of the exception type this stands in for.
        self.original_type = f"{module}{kind.__qualname__}"
        text = _text(str, original)
        super().__init__(f"{self.original_type}: {text}" if text else self.original_type)
        self.__traceback__ = original.__traceback__


def redacted(
    exc: BaseException | None, memo: dict[int, tuple[BaseException, BaseException]] | None = None
) -> BaseException | None:
    """``exc``, or a :class:`RedactedError` standing in for it when it would show a secret.

    For chaining an exception of another library that may quote a server:
    ``raise UnavailableError(...) from redacted(exc)``.  ``exc`` is returned
    itself when neither it nor anything it is chained to shows a secret in
    its text, its arguments or its string attributes; nimpipe errors are
    always returned themselves (they scrub themselves).
    """
    if exc is None or isinstance(exc, NimpipeError):
        return exc
    memo = {} if memo is None else memo
    return _redacted(exc, memo, 0)


def _redacted(
    exc: BaseException | None, memo: dict[int, tuple[BaseException, BaseException]], depth: int
) -> BaseException | None:
    if exc is None or isinstance(exc, NimpipeError):
        return exc
    seen = memo.get(id(exc))
    if seen is not None and seen[0] is exc:
        return seen[1]
    if not _shows_secret(exc, set(), 0):
        memo[id(exc)] = (exc, exc)
        return exc
    stand_in = RedactedError(exc)
    memo[id(exc)] = (exc, stand_in)
    if depth < _MAX_CHAIN:
        _CAUSE.__set__(stand_in, _redacted(_CAUSE.__get__(exc), memo, depth + 1))
        _CONTEXT.__set__(stand_in, _redacted(_CONTEXT.__get__(exc), memo, depth + 1))
    stand_in.__suppress_context__ = exc.__suppress_context__
    return stand_in


def _text(show: Any, value: Any) -> str:
    try:
        return str(show(value))
    except Exception:
        return ""


def _shows_secret(exc: BaseException | None, seen: set[int], depth: int) -> bool:
    """Whether ``exc`` or an exception it is chained to would show a secret."""
    if exc is None or isinstance(exc, NimpipeError) or id(exc) in seen or depth > _MAX_CHAIN:
        return False
    seen.add(id(exc))
    texts = [_text(str, exc), _text(repr, exc)]
    texts += [_text(str, note) for note in getattr(exc, "__notes__", None) or ()]
    if any(contains_secret(text) for text in texts):
        return True
    for value in getattr(exc, "__dict__", {}).values():
        if isinstance(value, (str, bytes, Mapping, list, tuple)) and scrub_data(value) is not value:
            return True
    return _shows_secret(_CAUSE.__get__(exc), seen, depth + 1) or _shows_secret(
        _CONTEXT.__get__(exc), seen, depth + 1
    )


def _scrubbed_attribute(value: Any) -> Any:
    """An attribute value of an error with every secret masked (the value itself if none)."""
    if isinstance(value, (str, bytes, Mapping, list, tuple)):
        return scrub_data(value)
    from nimpipe.types import Block, Verdict

    if isinstance(value, (Block, Verdict)):
        return scrub_fields(value)
    return value


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


class PrometheusParseError(NimpipeError, ValueError):
    """A Prometheus text exposition is malformed; carries the line number and the line."""

    def __init__(self, message: str, *, line_number: int, line: str) -> None:
        self.line_number = line_number
        self.line = line
        shown = line if len(line) <= 80 else line[:77] + "..."
        super().__init__(f"line {line_number}: {message}: {shown!r}")


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


class BackendUnavailable(NimpipeError):
    """A guardrails check backend could not judge (down, too slow, or no verdict); names it.

    ``reason`` is scrubbed of secrets (it may quote what the service answered).
    """

    def __init__(self, backend: str, reason: str) -> None:
        #: The backend's short name (``microservice``, ``content_safety``...).
        self.backend = backend
        self.reason = scrub(reason)
        super().__init__(f"{backend}: {self.reason}")


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


class InvalidRequestError(ProviderError):
    """The request cannot be sent as it is (invalid text, nesting too deep); never retried."""


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
    InvalidRequestError: "invalid_request",
    AuthenticationError: "authentication",
    RateLimitError: "rate_limit",
    ContextOverflowError: "context_overflow",
    UnavailableError: "unavailable",
    MalformedReplyError: "malformed_reply",
    TimeoutError: "timeout",
}
