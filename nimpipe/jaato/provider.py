"""jaato's model provider ``nimpipe``: the nimpipe pipeline around every jaato model call.

jaato finds it through the entry point ``nimpipe`` of the group
``jaato.model_providers`` and calls :func:`create_provider` with no
arguments.  Select it with ``JAATO_PROVIDER=nimpipe``; jaato's own
``JAATO_NIM_*`` settings keep working (see :mod:`nimpipe.jaato._pipelines`
for where settings come from).

One jaato ``complete()`` call is one pipeline turn:

- ``pre_input`` runs when the last message is the user's (not on tool rounds);
- ``post_output`` runs on the final answer of a jaato turn (a response without
  tool calls);
- ``record_cost`` runs on every model call, attributed to the agent jaato set
  with :meth:`NimpipeProvider.set_agent_context`;
- a block comes back as a response with ``FinishReason.SAFETY`` whose text says
  it was blocked, and no model is called for a blocked input.

Retries, one policy: within a ``complete()`` call nimpipe retries transient
failures of a route itself (``max_retries`` per route, short backoff, never
past ``turn_timeout`` when one is set), so that every attempt is recorded.
When those are spent it raises the typed transient error
(:class:`~nimpipe.errors.RateLimitError`, ``UnavailableError``,
``TimeoutError``, ``MalformedReplyError``) and jaato's ``with_retry`` decides
whether to try the whole call again, with its slower backoff;
:meth:`~NimpipeProvider.classify_error` and
:meth:`~NimpipeProvider.get_retry_after` answer for the route that failed.
Errors that a retry cannot fix (authentication, context overflow, no route,
a broken stage) are returned as jaato expects, in a ``TurnResult`` built
with ``TurnResult.from_exception``.

jaato's types come from ``jaato_sdk`` and are imported when a method runs:
importing this module loads neither jaato nor the pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from nimpipe.jaato._pipelines import Settings, SharedPipeline
    from nimpipe.pipeline import CancelToken
    from nimpipe.types import Message, Route, Turn, TurnResult

__all__ = ["PROVIDER_NAME", "NimpipeProvider", "create_provider"]

#: The provider's name in jaato (``JAATO_PROVIDER=nimpipe``).
PROVIDER_NAME = "nimpipe"


#: Chat-completions fields forwarded from ``plugin_configs.nimpipe.api_params``.
FORWARDED_API_PARAMS = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "tool_choice",
        "parallel_tool_calls",
        "frequency_penalty",
        "presence_penalty",
        "seed",
        "stop",
    }
)

_TAGS = frozenset({"jaato"})
_subagent_numbers = itertools.count(1)

T = TypeVar("T")


def _outside_event_loop(fn: Callable[[], T]) -> T:
    """Call ``fn`` here, or on a helper thread if this thread runs an event loop.

    The pipeline's blocking entry points refuse to run inside a running loop.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=target, name="nimpipe-jaato-call")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _bridge_cancel(token: Any) -> CancelToken | None:
    """A nimpipe cancel token that follows jaato's ``CancelToken``."""
    if token is None:
        return None
    from nimpipe.pipeline import CancelToken

    cancel = CancelToken()
    if token.is_cancelled:
        cancel.cancel()
    else:
        token.on_cancel(cancel.cancel)
    return cancel


class NimpipeProvider:
    """jaato model provider that runs every model call through a nimpipe pipeline.

    jaato makes one instance per session and one per subagent.  Instances
    with the same configuration share one pipeline (see
    :func:`nimpipe.jaato.shared_pipeline`); an instance's own state (model,
    agent, last usage) belongs to the session thread that uses it.
    """

    def __init__(self) -> None:
        from nimpipe.jaato._pipelines import Settings

        self._settings: Settings = Settings()
        self._shared: SharedPipeline | None = None
        self._model: str | None = None
        #: Route pinned for jaato's model, and the model to ask the route for.
        self._route_name: str | None = None
        self._model_override: str | None = None
        self._last_route: Route | None = None
        self._last_usage: Any = None
        #: After a transient failure: the messages asked and the turn as it passed the input checks.
        self._retry: tuple[tuple[Message, ...], Turn] | None = None
        self._api_params: dict[str, Any] = {}
        self._turn_timeout: float | None = None
        self._agent_type = "main"
        self._agent_name: str | None = None
        self._agent_id = "main"
        self._fallback_agent_id: str | None = None

    # ------------------------------------------------------------------
    # identity and lifecycle
    # ------------------------------------------------------------------

    @property
    def name(self) -> str:
        """``"nimpipe"``."""
        return PROVIDER_NAME

    def initialize(self, config: Any = None) -> None:
        """Read jaato's ``ProviderConfig``; the pipeline is built at :meth:`connect`.

        ``config.extra`` carries ``plugin_configs["nimpipe"]`` (``base_url``,
        ``model``, ``route``, ``context_length``, ``max_output_tokens``,
        ``turn_timeout``, ``api_params``) and ``workspace_path``;
        ``config.api_key`` the profile's key.
        """
        from nimpipe.jaato._pipelines import Settings

        self._settings = Settings.from_provider_config(config)
        extra: Mapping[str, Any] = (getattr(config, "extra", None) or {}) if config else {}
        params = extra.get("api_params") or {}
        if not isinstance(params, Mapping):
            from nimpipe.errors import ConfigError

            raise ConfigError(
                f"must be a table of chat-completions fields, got {type(params).__name__}",
                key="plugin_configs.nimpipe.api_params",
            )
        self._api_params = {k: v for k, v in params.items() if k in FORWARDED_API_PARAMS}
        timeout = extra.get("turn_timeout")
        self._turn_timeout = float(timeout) if timeout else None

    def verify_auth(
        self,
        allow_interactive: bool = False,
        on_message: Callable[[str], None] | None = None,
        config: Any = None,
        **_: Any,
    ) -> bool:
        """Check that some route can be called: it has a key, or is self-hosted.

        Works before :meth:`initialize` and makes no network request.  Raises
        :class:`~nimpipe.errors.AuthenticationError` when no route can be
        called and ``allow_interactive`` is false (nimpipe has no interactive
        login), and :class:`~nimpipe.errors.ConfigError` for a broken config.
        """
        import attrs

        from nimpipe.errors import AuthenticationError
        from nimpipe.jaato._pipelines import Settings, build_config

        settings = Settings.from_provider_config(config) if config is not None else self._settings
        if settings.workspace is None and self._settings.workspace is not None:
            settings = attrs.evolve(settings, workspace=self._settings.workspace)
        # The model is not known yet; any name lets the hosted default route be checked.
        routes = tuple(build_config(settings, settings.model or "unknown").routes.values())
        usable = [r for r in routes if r.api_key or r.self_hosted]
        if usable:
            if on_message is not None:
                names = ", ".join(r.name for r in usable)
                on_message(f"nimpipe: routes ready to call: {names}")
            return True
        if allow_interactive:
            if on_message is not None:
                on_message("nimpipe: no route has an API key; set JAATO_NIM_API_KEY")
            return False
        names = ", ".join(r.name for r in routes) or "none"
        raise AuthenticationError(
            f"no API key for any route ({names}): set JAATO_NIM_API_KEY, "
            "plugin_configs.nimpipe.api_key, or api_key_env on a route in nimpipe.toml",
            route=routes[0] if routes else None,
        )

    def shutdown(self) -> None:
        """Let go of the shared pipeline (it stays open for other instances)."""
        self._shared = None

    def get_auth_info(self) -> str:
        """Where the key of the route in use came from, for jaato's "Connected to" line."""
        route = self._route_in_use()
        if route is None:
            return "nimpipe"
        if route.api_key_env:
            return f"nimpipe route {route.name!r}: API key from ${route.api_key_env}"
        if route.api_key:
            return f"nimpipe route {route.name!r}: API key from jaato's settings"
        return f"nimpipe route {route.name!r}: no API key ({route.host})"

    # ------------------------------------------------------------------
    # connection
    # ------------------------------------------------------------------

    def connect(self, model: str, *, skip_model_test: bool = False, **_: Any) -> None:
        """Use ``model``: a route name, a model some route serves, or a model to ask for.

        Builds (or joins) the shared pipeline.  Makes no network request.
        """
        from nimpipe.jaato._pipelines import shared_pipeline

        self._shared = shared_pipeline(self._settings, model)
        self._model = model
        self._route_name, self._model_override = self._resolve_model(model)

    def _resolve_model(self, model: str | None) -> tuple[str | None, str | None]:
        assert self._shared is not None
        config = self._shared.pipeline.config
        if not model:
            return None, None
        if model in config.routes:
            return model, None
        serving = [r.name for r in config.routes.values() if r.model == model]
        if serving:
            preferred = config.default_route
            return (preferred if preferred in serving else serving[0]), None
        return None, model

    @property
    def is_connected(self) -> bool:
        """Whether :meth:`connect` has run."""
        return self._shared is not None and self._model is not None

    @property
    def model_name(self) -> str | None:
        """The model jaato connected with."""
        return self._model

    def list_models(self, prefix: str | None = None) -> list[str]:
        """The NIM catalog (when a catalog stage is enabled) plus the configured route names."""
        from nimpipe.jaato import _reports

        shared = self._shared or self._any_shared()
        names: list[str] = []
        if shared is not None:
            catalog = _reports.ask(
                shared.pipeline, _reports.CATALOG_HOOK, search=None, capabilities=False
            )
            names.extend(str(row["id"]) for row in catalog or () if "id" in row)
            names.extend(shared.pipeline.config.routes)
        unique = list(dict.fromkeys(names))
        if prefix:
            unique = [n for n in unique if n.startswith(prefix)]
        return sorted(unique)

    def _any_shared(self) -> SharedPipeline | None:
        from nimpipe.errors import NimpipeError
        from nimpipe.jaato._pipelines import shared_pipeline

        try:
            return shared_pipeline(self._settings, self._model)
        except NimpipeError:  # no usable configuration: nothing to list
            return None

    # ------------------------------------------------------------------
    # the model call
    # ------------------------------------------------------------------

    def _turn(
        self,
        messages: Any,
        system_instruction: str | None,
        tools: Any,
        response_schema: Any,
        tool_choice: Any,
    ) -> Turn:
        from nimpipe.jaato._convert import messages_from_jaato, tools_from_jaato
        from nimpipe.types import Turn

        specs = tools_from_jaato(tools)
        params = dict(self._api_params)
        if tool_choice is not None:
            params["tool_choice"] = tool_choice
        if not specs:
            params.pop("tool_choice", None)
        if response_schema:
            params["response_format"] = {"type": "json_object"}
        return Turn(
            messages=messages_from_jaato(messages, system_instruction),
            agent_id=self._attributed_agent_id(),
            agent_type=self._agent_type,
            tags=_TAGS,
            deadline=time.monotonic() + self._turn_timeout if self._turn_timeout else None,
            route=self._route_name,
            model=self._model_override,
            tools=specs,
            params=params,
            metadata={"jaato": {"agent_name": self._agent_name, "model": self._model}},
        )

    def complete(
        self,
        messages: list[Any],
        system_instruction: str | None = None,
        tools: list[Any] | None = None,
        *,
        response_schema: dict[str, Any] | None = None,
        cancel_token: Any = None,
        on_chunk: Callable[[Any], None] | None = None,
        on_usage_update: Callable[[Any], None] | None = None,
        on_function_call: Callable[[Any], None] | None = None,
        on_thinking: Callable[[str], None] | None = None,
        tool_choice: dict[str, Any] | None = None,
        **_: Any,
    ) -> Any:
        """Run one model call of a jaato turn through the pipeline.

        ``on_chunk`` set means stream: text reaches ``on_chunk`` as the
        pipeline releases it (held back while output stages check it).
        Returns jaato's ``TurnResult``; raises transient provider errors for
        jaato's ``with_retry`` (see the module docstring).
        """
        from jaato_sdk.plugins.model_provider.types import TurnResult as JaatoTurnResult

        from nimpipe.errors import (
            CancelledError,
            DeadlineExceededError,
            NimpipeError,
            ProviderError,
        )
        from nimpipe.jaato._convert import provider_response

        if self._shared is None:
            raise RuntimeError("nimpipe provider is not connected: call initialize() and connect()")
        import attrs

        pipeline = self._shared.pipeline
        turn = self._turn(messages, system_instruction, tools, response_schema, tool_choice)
        asked = turn.messages
        # jaato retries a transiently failed call with the same messages: run the
        # input as it passed the checks then, instead of checking it again.
        retry, self._retry = self._retry, None
        checked = retry is not None and retry[0] == asked
        if checked:
            assert retry is not None
            turn = attrs.evolve(retry[1], id=turn.id, deadline=turn.deadline)
        cancel = _bridge_cancel(cancel_token)
        released: list[str] = []

        def run() -> TurnResult:
            if on_chunk is None:
                return pipeline.run(turn, cancel=cancel, input_checked=checked)
            stream = pipeline.stream(turn, cancel=cancel, input_checked=checked)
            try:
                for chunk in stream:
                    released.append(chunk)
                    on_chunk(chunk)
            finally:
                stream.close()
            assert stream.result is not None
            return stream.result

        try:
            result = _outside_event_loop(run)
        except CancelledError:
            return self._cancelled("".join(released))
        except DeadlineExceededError:
            raise
        except ProviderError as exc:
            if exc.transient:
                if exc.checked_turn is not None:
                    self._retry = (asked, exc.checked_turn)
                raise
            return JaatoTurnResult.from_exception(exc)
        except NimpipeError as exc:
            return JaatoTurnResult.from_exception(exc)

        if result.route is not None:
            self._last_route = result.route
        response = provider_response(result)
        if response_schema and result.blocked is None and result.text:
            with contextlib.suppress(ValueError):
                response.structured_output = json.loads(result.text)
        self._last_usage = response.usage
        if on_chunk is not None and on_usage_update is not None and response.usage.total_tokens:
            on_usage_update(response.usage)
        return JaatoTurnResult.from_provider_response(response)

    def _cancelled(self, text: str) -> Any:
        from jaato_sdk.plugins.model_provider.types import (
            FinishReason,
            Part,
            ProviderResponse,
            TurnResult,
        )

        parts = [Part(text=text)] if text else []
        response = ProviderResponse(parts=parts, finish_reason=FinishReason.CANCELLED)
        return TurnResult.from_provider_response(response)

    # ------------------------------------------------------------------
    # tokens and limits
    # ------------------------------------------------------------------

    def _route_in_use(self) -> Route | None:
        if self._last_route is not None:
            return self._last_route
        if self._shared is None:
            return None
        config = self._shared.pipeline.config
        name = self._route_name or config.default_route
        if name is not None and name in config.routes:
            return config.routes[name]
        return next(iter(config.routes.values()), None)

    def count_tokens(self, content: str) -> int:
        """Tokens in ``content``, counted with tiktoken (offline), for the model in use."""
        from nimpipe.tokens import count_tokens

        route = self._route_in_use()
        model = self._model_override or (route.model if route else self._model)
        return count_tokens(content, model).count

    def get_context_limit(self) -> int:
        """Context window of the route in use (the last that answered, else the chosen one)."""
        route = self._route_in_use()
        if route is not None and route.context_length:
            return route.context_length
        from nimpipe.config import DEFAULT_CONTEXT_LENGTH

        return self._settings.context_length or DEFAULT_CONTEXT_LENGTH

    def get_max_output_tokens(self) -> int | None:
        """The output cap of the route in use, or ``None``."""
        route = self._route_in_use()
        return route.max_output_tokens if route is not None else None

    def get_token_usage(self) -> Any:
        """jaato ``TokenUsage`` of the last call (zeros before the first)."""
        if self._last_usage is None:
            from jaato_sdk.plugins.model_provider.types import TokenUsage

            return TokenUsage()
        return self._last_usage

    # ------------------------------------------------------------------
    # history
    # ------------------------------------------------------------------

    def serialize_history(self, history: list[Any]) -> str:
        """History as JSON, in jaato's session format."""
        from shared.plugins.session.serializer import serialize_history

        return json.dumps(serialize_history(history))

    def deserialize_history(self, data: str) -> list[Any]:
        """History from :meth:`serialize_history`'s JSON."""
        from shared.plugins.session.serializer import deserialize_history

        return list(deserialize_history(json.loads(data)))

    # ------------------------------------------------------------------
    # capabilities
    # ------------------------------------------------------------------

    def supports_streaming(self) -> bool:
        """Yes: ``on_chunk`` streams."""
        return True

    def supports_stop(self) -> bool:
        """Yes: jaato's cancel token stops a streamed call at the next chunk."""
        return True

    def supports_structured_output(self) -> bool:
        """Yes: ``response_schema`` asks for a JSON object."""
        return True

    def supports_thinking(self) -> bool:
        """No: reasoning content is not carried."""
        return False

    def set_thinking_config(self, config: Any) -> None:
        """Accepted and ignored (see :meth:`supports_thinking`)."""

    def modalities(self, model: str | None = None) -> set[str]:
        """Input modalities: text (nimpipe messages are text)."""
        return {"text"}

    def supports_modality(self, kind: str, model: str | None = None) -> bool:
        """Whether ``kind`` is an input modality (only ``"text"``)."""
        return kind.strip().lower() in self.modalities(model)

    # ------------------------------------------------------------------
    # agents
    # ------------------------------------------------------------------

    def set_agent_context(
        self, agent_type: str = "main", agent_name: str | None = None, agent_id: str = "main"
    ) -> None:
        """Attribute this instance's model calls (cost records) to an agent.

        jaato gives subagents started without UI hooks the id ``"main"``;
        such a subagent is attributed to its ``agent_name``, or to a
        process-unique ``subagent-N``.
        """
        self._agent_type = agent_type or "main"
        self._agent_name = agent_name
        self._agent_id = agent_id or "main"

    def _attributed_agent_id(self) -> str:
        if self._agent_type == "main" or self._agent_id != "main":
            return self._agent_id
        if self._agent_name:
            return self._agent_name
        if self._fallback_agent_id is None:
            self._fallback_agent_id = f"subagent-{next(_subagent_numbers)}"
        return self._fallback_agent_id

    # ------------------------------------------------------------------
    # retry classification for jaato's with_retry
    # ------------------------------------------------------------------

    def classify_error(self, exc: Exception) -> dict[str, bool] | None:
        """jaato's retry classification of a nimpipe error; ``None`` for others.

        Rate limits are ``rate_limit``; other transient errors (endpoint
        down, 5xx, cut stream, timeout, turn deadline) are ``infra``.
        """
        from nimpipe.errors import DeadlineExceededError, ProviderError, RateLimitError

        if isinstance(exc, RateLimitError):
            return {"transient": True, "rate_limit": True, "infra": False}
        if isinstance(exc, DeadlineExceededError):
            return {"transient": True, "rate_limit": False, "infra": True}
        if isinstance(exc, ProviderError):
            return {"transient": exc.transient, "rate_limit": False, "infra": exc.transient}
        return None

    def get_retry_after(self, exc: Exception) -> float | None:
        """The ``Retry-After`` the failing route sent, in seconds, or ``None``."""
        from nimpipe.errors import ProviderError

        if isinstance(exc, ProviderError) and exc.retry_after is not None:
            return float(exc.retry_after)
        return None


def create_provider() -> NimpipeProvider:
    """Entry-point factory of the ``jaato.model_providers`` group."""
    return NimpipeProvider()
