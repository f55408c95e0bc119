"""The values that flow through the pipeline.

Every class here is a frozen attrs class: a stage that changes a turn or an
output returns a new value (``attrs.evolve``), it never mutates one in place.
"""

from __future__ import annotations

import enum
import hmac
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal, Union

import attrs

from nimpipe.redaction import register_secret

__all__ = [
    "Accept",
    "Attempt",
    "Block",
    "CallRecord",
    "Decision",
    "Deferred",
    "Escalate",
    "FinishReason",
    "Message",
    "Output",
    "Price",
    "Response",
    "Retry",
    "Rewrite",
    "Role",
    "Route",
    "RouteChoice",
    "Secret",
    "ToolCall",
    "ToolSpec",
    "Turn",
    "TurnResult",
    "Usage",
    "Verdict",
]


class Role(str, enum.Enum):
    """Who wrote a message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(str, enum.Enum):
    """Why the model (or the pipeline) stopped producing output."""

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    #: A nimpipe stage blocked the turn.
    BLOCKED = "blocked"
    ERROR = "error"
    CANCELLED = "cancelled"

    @classmethod
    def parse(cls, value: str | None) -> FinishReason:
        """Map an OpenAI-style ``finish_reason`` string; unknown values become STOP."""
        if value is None:
            return cls.STOP
        if value == "function_call":
            return cls.TOOL_CALLS
        try:
            return cls(value)
        except ValueError:
            return cls.STOP


class Secret:
    """An API key.  Its ``repr`` and ``str`` are masked; ``reveal()`` gives the value.

    Not an attrs class, so ``attrs.asdict`` and ``attrs.astuple`` of a route
    keep the key wrapped (and masked) instead of unwrapping it.  Every value is
    registered with :func:`nimpipe.redaction.register_secret`, so that errors,
    logs, cassettes and records mask it wherever a server echoes it.  Equal
    values compare equal and hash alike (routes are dictionary keys).
    """

    __slots__ = ("_value",)

    _value: str

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, not {type(value).__name__}")
        object.__setattr__(self, "_value", value)
        register_secret(value)

    def reveal(self) -> str:
        """Return the secret itself (only for putting it on the wire)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Secret is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (Secret, (self._value,))

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self


def _secret(value: Secret | str | None) -> Secret | None:
    """A route's key as a :class:`Secret` (a plain string is wrapped, never kept bare)."""
    if value is None or isinstance(value, Secret):
        return value
    return Secret(value)


# --------------------------------------------------------------------------
# Messages and tools
# --------------------------------------------------------------------------


@attrs.frozen
class ToolCall:
    """A tool call the model proposed: ``arguments`` is the raw JSON string."""

    id: str
    name: str
    arguments: str = "{}"


@attrs.frozen
class ToolSpec:
    """A tool offered to the model, with its JSON-schema ``parameters``."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = attrs.field(factory=dict, eq=False, hash=False)

    def to_openai(self) -> dict[str, Any]:
        """The tool in the OpenAI ``tools`` format."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters) or {"type": "object", "properties": {}},
            },
        }


def _tool_calls(value: Iterable[ToolCall]) -> tuple[ToolCall, ...]:
    return tuple(value)


def _messages(value: Iterable[Message]) -> tuple[Message, ...]:
    return tuple(value)


def _tools(value: Iterable[ToolSpec]) -> tuple[ToolSpec, ...]:
    return tuple(value)


def _tags(value: Iterable[str]) -> frozenset[str]:
    return frozenset(value)


def _role(value: Role | str) -> Role:
    return value if isinstance(value, Role) else Role(value)


@attrs.frozen
class Message:
    """One chat message: system, user, assistant (with tool calls) or tool result."""

    role: Role = attrs.field(converter=_role)
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = attrs.field(default=(), converter=_tool_calls)
    #: For a tool result: the id of the call it answers.
    tool_call_id: str | None = None
    #: For a tool result: the tool's name.
    name: str | None = None

    @classmethod
    def system(cls, text: str) -> Message:
        return cls(Role.SYSTEM, text)

    @classmethod
    def user(cls, text: str) -> Message:
        return cls(Role.USER, text)

    @classmethod
    def assistant(cls, text: str | None = None, tool_calls: tuple[ToolCall, ...] = ()) -> Message:
        return cls(Role.ASSISTANT, text, tool_calls)

    @classmethod
    def tool(cls, call_id: str, content: str, name: str | None = None) -> Message:
        return cls(Role.TOOL, content, (), call_id, name)

    def to_openai(self) -> dict[str, Any]:
        """The message in the OpenAI chat format."""
        out: dict[str, Any] = {"role": self.role.value, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in self.tool_calls
            ]
        if self.role is Role.TOOL:
            out["tool_call_id"] = self.tool_call_id
            if self.name:
                out["name"] = self.name
        return out


# --------------------------------------------------------------------------
# Turns and routes
# --------------------------------------------------------------------------

_turn_ids = itertools.count(1)
_PID = os.getpid()


def new_turn_id() -> str:
    """A process-unique turn id (``t-<pid>-<n>``); cheap, no randomness needed."""
    return f"t-{_PID}-{next(_turn_ids)}"


@attrs.frozen(kw_only=True)
class Turn:
    """One model turn: what the agent asks, for whom, and within which limits.

    ``deadline`` is a :func:`time.monotonic` value; :meth:`create` takes a
    ``timeout`` in seconds instead.
    """

    messages: tuple[Message, ...] = attrs.field(converter=_messages)
    id: str = attrs.field(factory=new_turn_id)
    agent_id: str = "main"
    agent_type: str = "main"
    tags: frozenset[str] = attrs.field(factory=frozenset, converter=_tags)
    deadline: float | None = None
    #: A route asked for by name (``None``: let ``select_provider`` decide).
    route: str | None = None
    #: A model asked for (``None``: the route's model).
    model: str | None = None
    tools: tuple[ToolSpec, ...] = attrs.field(default=(), converter=_tools)
    #: Extra request parameters passed to the model (temperature, max_tokens, ...).
    params: Mapping[str, Any] = attrs.field(factory=dict, eq=False, hash=False)
    #: Free-form data for stages; nimpipe itself never reads it.
    metadata: Mapping[str, Any] = attrs.field(factory=dict, eq=False, hash=False)

    @classmethod
    def create(
        cls,
        prompt: str | Message | list[Message] | tuple[Message, ...],
        *,
        system: str | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Turn:
        """Build a turn from a prompt string or messages; ``timeout`` sets the deadline."""
        if isinstance(prompt, str):
            messages: list[Message] = [Message.user(prompt)]
        elif isinstance(prompt, Message):
            messages = [prompt]
        else:
            messages = list(prompt)
        if system is not None:
            messages.insert(0, Message.system(system))
        if timeout is not None:
            kwargs["deadline"] = time.monotonic() + timeout
        return cls(messages=messages, **kwargs)

    @property
    def last_user_text(self) -> str:
        """The text of the last user message, or ``""``."""
        for m in reversed(self.messages):
            if m.role is Role.USER:
                return m.content or ""
        return ""

    def remaining(self) -> float | None:
        """Seconds left before the deadline (may be negative), or ``None``."""
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()


@attrs.frozen(kw_only=True)
class Price:
    """USD per 1,000 tokens; ``source`` says where the figure came from."""

    input_per_1k: float = 0.0
    output_per_1k: float = 0.0
    source: str = "config"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1k + completion_tokens * self.output_per_1k) / 1000


def _netloc(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc.rsplit("@", 1)[-1]


@attrs.frozen(kw_only=True)
class Route:
    """A named way to reach a model: an OpenAI-compatible endpoint plus a model.

    Hosted NIM, self-hosted NIM, llama.cpp, vLLM and Ollama are all routes.
    """

    name: str
    base_url: str
    model: str
    #: Cascade tier: 0 is the cheapest; escalation moves to a higher tier.
    tier: int = 0
    price: Price | None = None
    self_hosted: bool = False
    api_key: Secret | None = attrs.field(default=None, converter=_secret)
    #: Name of the environment variable the key was read from (for messages).
    api_key_env: str | None = None
    timeout: float = 60.0
    connect_timeout: float = 5.0
    max_retries: int = 2
    context_length: int | None = None
    #: Where ``context_length`` came from (server, snapshot, override, config, default).
    context_source: str = "unknown"
    max_output_tokens: int | None = None
    #: Extra fields merged into every request body (``nvext``, ``guardrails``, ...).
    extra_body: Mapping[str, Any] = attrs.field(factory=dict, eq=False, hash=False)
    #: Free-form flags stages may read ("tokenize", "nim", "guardrails", ...).
    flags: frozenset[str] = attrs.field(factory=frozenset, converter=_tags)
    #: Extra HTTP headers (never secrets: those go in ``api_key``).
    headers: Mapping[str, str] = attrs.field(factory=dict, eq=False, hash=False)

    #: ``host:port`` of the endpoint, for messages and records (derived from ``base_url``).
    host: str = attrs.field(
        init=False,
        eq=False,
        default=attrs.Factory(lambda self: _netloc(self.base_url), takes_self=True),
    )


@attrs.frozen
class RouteChoice:
    """A route with the reason a stage chose it.

    ``select_provider`` and ``before_call`` may return one instead of a bare
    :class:`Route`; the reason reaches :attr:`CallRecord.routing_reason` of
    every record of that call as ``"<plugin>: <reason>"``.
    """

    route: Route
    reason: str = ""


# --------------------------------------------------------------------------
# Responses and usage
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Usage:
    """Token counts for one model call.

    ``source`` is ``server`` (as reported), ``estimated`` (counted locally),
    ``clamped`` (the server reported more completion tokens than the request
    allowed; the count is cut to the cap) or ``none`` (nothing known yet).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    source: Literal["server", "estimated", "clamped", "none"] = "server"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def estimated(self) -> bool:
        return self.source != "server"


@attrs.frozen(kw_only=True)
class Response:
    """What one model call produced."""

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = attrs.field(default=(), converter=_tool_calls)
    finish_reason: FinishReason = FinishReason.STOP
    usage: Usage = attrs.field(factory=Usage)
    model: str = ""
    route: str = ""
    #: Seconds from request to complete response.
    latency: float = 0.0
    #: Seconds from request to first non-empty token (streamed calls; else ``None``).
    ttft: float | None = None
    id: str | None = None
    #: Per-token log probabilities where the server returned them.
    logprobs: tuple[float, ...] | None = None
    #: Top-level reply fields beyond the OpenAI ones (e.g. NeMo Guardrails' ``guardrails``).
    extra: Mapping[str, Any] = attrs.field(factory=dict, eq=False, hash=False)


@attrs.frozen(kw_only=True)
class Output:
    """Output offered to ``post_output`` stages.

    ``text`` is the text to judge.  With the sentence release policy it is one
    segment (``final`` false) and ``released`` is what was already released;
    the last call has ``final`` true and ``text`` is the whole answer.
    """

    text: str
    response: Response | None = None
    final: bool = True
    released: str = ""


# --------------------------------------------------------------------------
# Decisions: what stages return
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Block:
    """Stop the turn.  ``message`` is what the user sees instead of the output."""

    reason: str
    plugin: str = ""
    #: The rule, rail or category that fired.
    rule: str | None = None
    message: str = "I'm sorry, I can't respond to that."


@attrs.frozen(kw_only=True)
class Rewrite:
    """A stage changed the input or output (the new value travels on ``value``)."""

    value: Any
    reason: str = ""
    plugin: str = ""


@attrs.frozen(kw_only=True)
class Accept:
    """Keep the response (``on_response``)."""

    reason: str = ""
    plugin: str = ""


@attrs.frozen(kw_only=True)
class Retry:
    """Call the same route again (``on_response``)."""

    reason: str
    plugin: str = ""


@attrs.frozen(kw_only=True)
class Escalate:
    """Dispatch the turn again on another route (``on_response``).

    ``route`` names the target; ``None`` means the cheapest route of a higher
    tier than the one that answered.
    """

    reason: str
    route: str | None = None
    plugin: str = ""
    #: A quality score the deciding stage computed, for the record.
    score: float | None = None


@attrs.frozen(kw_only=True)
class Deferred:
    """A check that runs alongside the model call (``pre_input``).

    ``check`` is called with no arguments and returns an awaitable that
    resolves to a :class:`Block` or ``None``.  In :meth:`Pipeline.arun` it runs
    concurrently with the model call and a block cancels the call; in
    :meth:`Pipeline.run` it runs before the call.
    """

    check: Callable[[], Awaitable[Block | None]] = attrs.field(eq=False)
    name: str = ""
    plugin: str = ""


Decision = Union[Accept, Retry, Escalate, Block, Rewrite]  # noqa: UP007 - runtime alias on 3.10


@attrs.frozen(kw_only=True)
class Verdict:
    """One check's outcome, for the ledger and the trace."""

    rule: str
    decision: Literal["pass", "block", "rewrite", "error", "unchecked"]
    plugin: str = ""
    backend: str = ""
    latency: float = 0.0
    detail: str = ""


@attrs.frozen(kw_only=True)
class Attempt:
    """Where the pipeline is in a turn's escalation loop (for ``select_provider``)."""

    #: 1 for the first model call of the turn.
    number: int = 1
    #: The decision that caused this attempt (``None`` for the first).
    cause: Escalate | Retry | None = None
    #: Routes tried so far, in order.
    tried: tuple[str, ...] = ()
    #: The route that answered last (``None`` for the first attempt).
    previous_route: Route | None = None


@attrs.frozen(kw_only=True)
class CallRecord:
    """One model call, for ``record_cost``: every call, failed and escalated ones too."""

    time: float
    turn_id: str
    agent_id: str
    agent_type: str
    route: str
    provider: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: ``server`` (reported by the endpoint) or ``estimated``.
    usage_source: str = "server"
    cost_usd: float = 0.0
    price_source: str = "none"
    latency: float = 0.0
    ttft: float | None = None
    #: ``ok``, ``error``, ``cancelled``, ``escalated``, ``retried`` or ``blocked``.
    outcome: str = "ok"
    error: str | None = None
    attempt: int = 1
    reason: str = ""
    stream: bool = False
    verdicts: tuple[Verdict, ...] = ()
    #: Why the call went to its route: ``"<plugin>: <reason>"`` of every stage that
    #: answered ``select_provider`` or ``before_call`` with a :class:`RouteChoice`,
    #: joined with ``"; "`` (``""`` if none gave a reason).
    routing_reason: str = ""


@attrs.frozen(kw_only=True)
class TurnResult:
    """The outcome of a turn: the final response, or the block that stopped it."""

    turn: Turn
    text: str
    response: Response | None = None
    route: Route | None = None
    blocked: Block | None = None
    #: Every decision stages made, in order.
    decisions: tuple[Any, ...] = ()
    #: One record per model call.
    records: tuple[CallRecord, ...] = ()
    verdicts: tuple[Verdict, ...] = ()

    @property
    def ok(self) -> bool:
        return self.blocked is None

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.response.tool_calls if self.response is not None else ()

    @property
    def finish_reason(self) -> FinishReason:
        if self.blocked is not None:
            return FinishReason.BLOCKED
        return self.response.finish_reason if self.response else FinishReason.STOP

    @property
    def cost_usd(self) -> float:
        return sum(r.cost_usd for r in self.records)
