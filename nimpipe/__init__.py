"""nimpipe: a pluggy middleware pipeline around every model call of NIM agents.

``import nimpipe`` is cheap: it loads pluggy and the exceptions only; the
value types, the pipeline and the config load on first use.  The openai SDK,
tiktoken and every optional dependency are imported the first time they are
used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nimpipe._markers import hookimpl, hookspec
from nimpipe.errors import (
    AuthenticationError,
    BlockedError,
    CancelledError,
    ConfigError,
    ContextOverflowError,
    DeadlineExceededError,
    HookError,
    InvalidRequestError,
    MalformedReplyError,
    NimpipeError,
    NoRouteError,
    OfflineError,
    PluginLoadError,
    ProviderError,
    RateLimitError,
    TimeoutError,
    UnavailableError,
)

if TYPE_CHECKING:
    from nimpipe.config import Config
    from nimpipe.pipeline import CancelToken, Pipeline
    from nimpipe.types import (
        Accept,
        Attempt,
        Block,
        CallRecord,
        Deferred,
        Escalate,
        FinishReason,
        Message,
        Output,
        Price,
        Response,
        Retry,
        Rewrite,
        Role,
        Route,
        RouteChoice,
        Secret,
        ToolCall,
        ToolSpec,
        Turn,
        TurnResult,
        Usage,
        Verdict,
    )

__version__ = "0.1.0"

__all__ = [
    "Accept",
    "Attempt",
    "AuthenticationError",
    "Block",
    "BlockedError",
    "CallRecord",
    "CancelToken",
    "CancelledError",
    "Config",
    "ConfigError",
    "ContextOverflowError",
    "DeadlineExceededError",
    "Deferred",
    "Escalate",
    "FinishReason",
    "HookError",
    "InvalidRequestError",
    "MalformedReplyError",
    "Message",
    "NimpipeError",
    "NoRouteError",
    "OfflineError",
    "Output",
    "Pipeline",
    "PluginLoadError",
    "Price",
    "ProviderError",
    "RateLimitError",
    "Response",
    "Retry",
    "Rewrite",
    "Role",
    "Route",
    "RouteChoice",
    "Secret",
    "TimeoutError",
    "ToolCall",
    "ToolSpec",
    "Turn",
    "TurnResult",
    "UnavailableError",
    "Usage",
    "Verdict",
    "__version__",
    "hookimpl",
    "hookspec",
]

# Public names loaded on first use, so that ``import nimpipe`` stays cheap.  Every
# other name of ``__all__`` not defined above is a value type of ``nimpipe.types``.
_LAZY = {
    "Pipeline": "nimpipe.pipeline",
    "CancelToken": "nimpipe.pipeline",
    "Config": "nimpipe.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name) or ("nimpipe.types" if name in __all__ else None)
    if module is None:
        raise AttributeError(f"module 'nimpipe' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
