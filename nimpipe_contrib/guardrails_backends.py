"""Check backends of the ``guardrails`` stage: one interface, one verdict type.

Every backend answers three questions about a turn, each with a
:class:`~nimpipe.types.Verdict` (or ``None`` when it has nothing to check
there), and raises :class:`BackendUnavailable` when it cannot answer: the
service is down, too slow, or answered something that is not a verdict.

- :class:`MicroserviceBackend`: a NeMo Guardrails server.  Rails-only checks
  (``POST /v1/checks``) by default; :meth:`MicroserviceBackend.guarded_completion`
  runs a guarded generation (``POST /v1/chat/completions`` with
  ``guardrails.config_id``).
- :class:`InProcessBackend`: NeMo Guardrails' ``LLMRails`` in this process,
  on a private event-loop thread (one loop owns it); the same rails-only
  semantics as the microservice (``LLMRails.check_async``).
- :class:`ContentSafetyBackend`: NemoGuard content safety (a chat model that
  answers ``{"User Safety": ..., "Response Safety": ..., "Safety Categories": ...}``).
- :class:`TopicControlBackend`: NemoGuard topic control (``on-topic`` / ``off-topic``).
- :class:`JailbreakBackend`: NemoGuard jailbreak detection (``POST /v1/classify``).

Backends are coroutines driven by one event loop, the stage's
:class:`LoopThread`; none of them is imported, connected or loaded at import
time.  ``nemoguardrails`` is imported only by :class:`InProcessBackend`.

Every text that comes from a service (an error message, a rail name, a
category, a rewrite, a reply quoted in :class:`BackendUnavailable`) is
scrubbed of secrets (:func:`nimpipe.redaction.scrub`) before it reaches a
verdict or a reason: a service may echo the key it was sent.  Backend keys are
registered as secrets (:func:`nimpipe.redaction.register_secret`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import threading
import time
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import attrs

from nimpipe.redaction import register_secret, scrub, scrub_fields
from nimpipe.types import ToolCall, Verdict

__all__ = [
    "CONTENT_SAFETY_PROMPT",
    "Backend",
    "BackendUnavailable",
    "ContentSafetyBackend",
    "GuardedCompletion",
    "InProcessBackend",
    "JailbreakBackend",
    "LoopThread",
    "MicroserviceBackend",
    "TopicControlBackend",
    "excerpt",
    "render_tool_call",
]

T = TypeVar("T")

#: Rail names used in verdicts when the service names none.
INPUT_RAILS = "input rails"
OUTPUT_RAILS = "output rails"

#: What NeMo Guardrails answers when a rail blocks.
NEMO_REFUSAL = "I'm sorry, I can't respond to that."


class BackendUnavailable(Exception):
    """A backend could not give a verdict: down, too slow, or an answer that is no verdict.

    ``reason`` is scrubbed of secrets (it may quote what the service answered).
    """

    def __init__(self, backend: str, reason: str) -> None:
        self.backend = backend
        self.reason = scrub(reason)
        super().__init__(f"{backend}: {self.reason}")


def excerpt(value: Any, limit: int = 200) -> str:
    """At most ``limit`` characters of ``value`` (its ``repr`` unless a string), scrubbed.

    Scrubbed before it is cut, so that a cut never leaves part of a key behind.
    """
    text = value if isinstance(value, str) else _safe_repr(value)
    return scrub(text)[:limit]


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except RecursionError:
        return f"<{type(value).__name__} nested too deep>"


class Backend(Protocol):
    """What the ``guardrails`` stage needs from a check backend.

    Each method returns a :class:`Verdict` (decision ``pass``, ``block`` or
    ``rewrite`` with the new text in ``detail``), or ``None`` when the backend
    does not check that kind of text; it raises :class:`BackendUnavailable`
    when it cannot judge.  The methods run on the stage's event loop.
    """

    #: Short name recorded as the verdict's ``backend``.
    name: str

    async def check_input(self, text: str, model: str) -> Verdict | None: ...

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None: ...

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


def render_tool_call(call: ToolCall) -> str:
    """A proposed tool call as the text an output rail judges."""
    return f"[tool call] {call.name}({call.arguments})"


def _elapsed(started: float) -> float:
    return time.perf_counter() - started


# --------------------------------------------------------------------------
# The event loop the backends run on
# --------------------------------------------------------------------------


class LoopThread:
    """An asyncio event loop on a daemon thread, started on first use.

    Coroutines submitted from any thread or event loop run here, so that
    connections and stateful clients (``LLMRails``) stay on one loop.
    Cancelling the awaiting caller cancels the submitted coroutine.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name=self.name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop; returns a thread-safe future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._ensure())

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and await its result from the caller's loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def close(self, cleanup: Sequence[Awaitable[Any]] = (), timeout: float = 5.0) -> None:
        """Run ``cleanup`` on the loop, then stop it and join the thread (idempotent)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            for awaitable in cleanup:
                if asyncio.iscoroutine(awaitable):
                    awaitable.close()
            return

        async def finish() -> None:
            for awaitable in cleanup:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(awaitable, timeout)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)
            await loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(finish(), loop).result(timeout * 2)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()


# --------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------


@attrs.define
class _Http:
    """An ``httpx.AsyncClient`` made on first use (on the backend loop)."""

    backend: str
    timeout: float
    api_key: str | None = attrs.field(default=None, repr=False)
    _client: Any = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.api_key:
            register_secret(self.api_key)

    def client(self) -> Any:
        if self._client is None:
            import httpx

            headers = {"accept": "application/json"}
            if self.api_key:
                headers["authorization"] = f"Bearer {self.api_key}"
            self._client = httpx.AsyncClient(timeout=self.timeout, headers=headers, trust_env=False)
        return self._client

    async def post_json(self, url: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        """POST ``body``; returns the status and the parsed JSON (``None`` if not JSON)."""
        import httpx

        try:
            response = await self.client().post(url, json=body)
        except httpx.TimeoutException as exc:
            raise BackendUnavailable(self.backend, f"timed out: {url}") from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable(self.backend, f"{type(exc).__name__}: {url}: {exc}") from exc
        try:
            data = response.json()
        except ValueError:
            data = None
        return response.status_code, data

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def _error_text(data: Any) -> str:
    if isinstance(data, Mapping):
        error = data.get("error", data.get("detail"))
        if isinstance(error, Mapping):
            return excerpt(str(error.get("message", error)), 500)
        if error is not None:
            return excerpt(str(error), 500)
    return excerpt(data)


def _chat_reply(backend: str, status: int, data: Any) -> str:
    """The assistant text of a chat completion, or :class:`BackendUnavailable`."""
    if status != 200:
        raise BackendUnavailable(backend, f"HTTP {status}: {_error_text(data)}")
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise BackendUnavailable(backend, f"not a chat completion: {excerpt(data)}") from None
    if not isinstance(content, str):
        raise BackendUnavailable(backend, "the reply has no text")
    return content


# --------------------------------------------------------------------------
# NeMo Guardrails: microservice
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class GuardedCompletion:
    """What a guarded generation returned: the text and the rails' verdicts."""

    text: str
    blocked: bool
    verdicts: tuple[Verdict, ...]
    latency: float
    #: The server's ``usage`` object, when it sent one.
    usage: Mapping[str, Any] | None = None


def _rails_verdict(
    backend: str,
    kind: Literal["input", "output", "tool call"],
    status: Any,
    rail: Any,
    content: Any,
    original: str,
    latency: float,
) -> Verdict:
    """A verdict from a NeMo ``/v1/checks`` (or ``check_async``) result."""
    status = scrub(str(getattr(status, "value", status)))
    default_rule = INPUT_RAILS if kind == "input" else OUTPUT_RAILS
    rule = scrub(str(rail)) if rail else default_rule
    if status == "blocked":
        return Verdict(
            rule=rule, decision="block", backend=backend, latency=latency, detail=f"{kind} blocked"
        )
    if status == "passed":
        return Verdict(rule=rule, decision="pass", backend=backend, latency=latency)
    if status == "modified":
        if isinstance(content, str) and content != original:
            return Verdict(
                rule=rule,
                decision="rewrite",
                backend=backend,
                latency=latency,
                detail=scrub(content),
            )
        return Verdict(rule=rule, decision="pass", backend=backend, latency=latency)
    raise BackendUnavailable(backend, f"unknown rails status {status!r}")


@attrs.define(kw_only=True)
class MicroserviceBackend:
    """A NeMo Guardrails server (``nemoguardrails server``, or the NIM microservice).

    :param url: the server root, e.g. ``http://127.0.0.1:8000``.
    :param config_id: the rails configuration to use; ``None`` for the
        server's default.
    :param timeout: seconds for one HTTP request.
    :param api_key: bearer token, when the server wants one.
    """

    url: str
    config_id: str | None = None
    timeout: float = 10.0
    api_key: str | None = attrs.field(default=None, repr=False)
    name: str = "microservice"
    _http: _Http = attrs.field(init=False)
    #: Rail kinds the server has no rails for (learnt from its 422 answers).
    _missing: set[str] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self._http = _Http(self.name, self.timeout, self.api_key)

    def _guardrails(self, **extra: Any) -> dict[str, Any]:
        data: dict[str, Any] = dict(extra)
        if self.config_id:
            data["config_id"] = self.config_id
        return data

    async def start(self) -> None:
        """Nothing to load: the server holds the rails."""

    async def _check(
        self,
        kind: Literal["input", "output", "tool call"],
        messages: list[dict[str, str]],
        original: str,
        model: str,
    ) -> Verdict | None:
        rail_type = "input" if kind == "input" else "output"
        if rail_type in self._missing:
            return None
        body = {
            "model": model,
            "messages": messages,
            "guardrails": self._guardrails(rail_types=[rail_type]),
        }
        started = time.perf_counter()
        status, data = await self._http.post_json(f"{self.url}/v1/checks", body)
        latency = _elapsed(started)
        if status == 422 and "no configured rails" in _error_text(data):
            self._missing.add(rail_type)
            return None
        if status != 200 or not isinstance(data, Mapping) or "status" not in data:
            raise BackendUnavailable(self.name, f"HTTP {status}: {_error_text(data)}")
        return _rails_verdict(
            self.name,
            kind,
            data["status"],
            data.get("rail"),
            data.get("content"),
            original,
            latency,
        )

    async def check_input(self, text: str, model: str) -> Verdict | None:
        """Run the configuration's input rails on ``text`` (``/v1/checks``)."""
        return await self._check("input", [{"role": "user", "content": text}], text, model)

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None:
        """Run the output rails on the answer ``text`` to ``prompt``."""
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        return await self._check("output", messages, text, model)

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None:
        """Run the output rails on a proposed tool call (rendered as text)."""
        text = render_tool_call(call)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        return await self._check("tool call", messages, text, model)

    async def guarded_completion(
        self, messages: Sequence[Mapping[str, Any]], model: str
    ) -> GuardedCompletion:
        """One guarded generation: the server runs the input rails, the model and the output rails.

        Costs a whole model call on the server's side; the verdicts come from
        the ``guardrails.log.activated_rails`` of the answer.
        """
        body = {
            "model": model,
            "messages": [dict(m) for m in messages],
            "guardrails": self._guardrails(
                options={
                    "log": {"activated_rails": True},
                    "output_vars": ["triggered_input_rail", "triggered_output_rail"],
                }
            ),
        }
        started = time.perf_counter()
        status, data = await self._http.post_json(f"{self.url}/v1/chat/completions", body)
        latency = _elapsed(started)
        text = scrub(_chat_reply(self.name, status, data))
        guardrails = data.get("guardrails") if isinstance(data, Mapping) else None
        verdicts: list[Verdict] = []
        blocked = False
        log = guardrails.get("log") if isinstance(guardrails, Mapping) else None
        for rail in (log or {}).get("activated_rails") or ():
            if not isinstance(rail, Mapping) or rail.get("type") not in ("input", "output"):
                continue
            stopped = bool(rail.get("stop"))
            blocked = blocked or stopped
            verdicts.append(
                scrub_fields(
                    Verdict(
                        rule=str(rail.get("name") or rail.get("type")),
                        decision="block" if stopped else "pass",
                        backend=f"{self.name}:guarded",
                        latency=float(rail.get("duration") or 0.0),
                        detail=f"{rail.get('type')} rail",
                    )
                )
            )
        usage = data.get("usage") if isinstance(data, Mapping) else None
        return GuardedCompletion(
            text=text,
            blocked=blocked,
            verdicts=tuple(verdicts),
            latency=latency,
            usage=usage if isinstance(usage, Mapping) else None,
        )

    async def aclose(self) -> None:
        await self._http.aclose()


# --------------------------------------------------------------------------
# NeMo Guardrails: in process
# --------------------------------------------------------------------------


def missing_nemoguardrails_message() -> str:
    """What to tell a user whose environment lacks ``nemoguardrails``."""
    return (
        'the in-process guardrails backend needs NeMo Guardrails: pip install "nimpipe[guardrails]"'
    )


def nemoguardrails_available() -> bool:
    """Whether ``nemoguardrails`` can be imported (checked without importing it)."""
    import importlib.util
    import sys

    if "nemoguardrails" in sys.modules:
        return sys.modules["nemoguardrails"] is not None
    return importlib.util.find_spec("nemoguardrails") is not None


class _SharedRailsLoop:
    """The one event loop every ``LLMRails`` of this process runs on.

    NeMo Guardrails pools its HTTP clients process-wide, so rails on two
    event loops would share connections bound to one of them.  The loop
    starts with the first in-process backend and stops, after NeMo's client
    pool is closed, with the last.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: LoopThread | None = None
        self._users = 0

    def acquire(self) -> LoopThread:
        with self._lock:
            if self._loop is None:
                self._loop = LoopThread("nimpipe-guardrails-rails")
            self._users += 1
            return self._loop

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._loop is None:
                return
            loop, self._loop = self._loop, None
        loop.close([_close_nemo_clients()])


async def _close_nemo_clients() -> None:
    import sys

    if "nemoguardrails" not in sys.modules:
        return
    from nemoguardrails.llm.frameworks.registry import get_default_framework, get_framework

    close = getattr(get_framework(get_default_framework()), "aclose", None)
    if close is not None:
        await close()


_RAILS_LOOP = _SharedRailsLoop()


@attrs.define(kw_only=True)
class InProcessBackend:
    """NeMo Guardrails' ``LLMRails`` in this process, on the rails event-loop thread.

    ``nemoguardrails`` is imported (about 2 s) and the configuration loaded
    by :meth:`begin_loading` (the stage calls it at ``configure``), on that
    thread, so the first check waits only for what is left of it.  Every
    in-process backend of the process shares that one loop (NeMo pools its
    HTTP clients process-wide).  The checks are ``LLMRails.check_async``
    with explicit rail types: the same rails-only semantics as ``/v1/checks``.

    :param config_path: a rails configuration directory (``config.yml``,
        ``prompts.yml``...).
    """

    config_path: Path = attrs.field(converter=Path)
    name: str = "inprocess"
    _thread: LoopThread | None = attrs.field(default=None, init=False)
    _loading: concurrent.futures.Future[Any] | None = attrs.field(default=None, init=False)
    _missing: set[str] = attrs.field(factory=set, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def _loop(self) -> LoopThread:
        with self._lock:
            if self._thread is None:
                self._thread = _RAILS_LOOP.acquire()
            return self._thread

    def begin_loading(self) -> concurrent.futures.Future[Any]:
        """Start importing NeMo Guardrails and loading the rails (once); returns the future."""
        loop = self._loop()
        with self._lock:
            if self._loading is None:
                self._loading = loop.submit(self._load())
            return self._loading

    async def _load(self) -> Any:
        os.environ.setdefault("NEMO_GUARDRAILS_NO_USAGE_STATS", "1")
        try:
            from nemoguardrails import LLMRails, RailsConfig
        except ImportError as exc:
            raise BackendUnavailable(self.name, missing_nemoguardrails_message()) from exc
        config = RailsConfig.from_path(str(self.config_path))
        # Built inside the running loop that will drive it: LLMRails must stay on one loop.
        return LLMRails(config)

    async def start(self) -> None:
        """Wait until the rails are loaded (starting the load if needed)."""
        await asyncio.wrap_future(self.begin_loading())

    async def _check(
        self, kind: Literal["input", "output", "tool call"], messages: list[dict[str, str]]
    ) -> Verdict | None:
        rail_type = "input" if kind == "input" else "output"
        if rail_type in self._missing:
            return None
        original = messages[-1]["content"]

        async def on_rails_loop() -> Verdict | None:
            loading = self.begin_loading()
            try:
                rails = await asyncio.wrap_future(loading)
            except BackendUnavailable:
                raise
            except Exception as exc:
                raise BackendUnavailable(
                    self.name, f"cannot load the rails in {self.config_path}: {exc}"
                ) from exc
            from nemoguardrails.exceptions import RailTypeNotConfiguredError
            from nemoguardrails.rails.llm.options import RailType

            started = time.perf_counter()
            try:
                result = await rails.check_async(messages, rail_types=[RailType(rail_type)])
            except RailTypeNotConfiguredError:
                self._missing.add(rail_type)
                return None
            except Exception as exc:
                raise BackendUnavailable(self.name, f"{type(exc).__name__}: {exc}") from exc
            return _rails_verdict(
                self.name,
                kind,
                result.status,
                result.rail,
                result.content,
                original,
                _elapsed(started),
            )

        return await self._loop().run(on_rails_loop())

    async def check_input(self, text: str, model: str) -> Verdict | None:
        """Run the input rails on ``text``."""
        return await self._check("input", [{"role": "user", "content": text}])

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None:
        """Run the output rails on the answer ``text`` to ``prompt``."""
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        return await self._check("output", messages)

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None:
        """Run the output rails on a proposed tool call (rendered as text)."""
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": render_tool_call(call)},
        ]
        return await self._check("tool call", messages)

    async def aclose(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            loading = self._loading
            if loading is not None and not loading.done():
                loading.cancel()
            _RAILS_LOOP.release()


# --------------------------------------------------------------------------
# NIM safety microservices (NemoGuard)
# --------------------------------------------------------------------------

#: The NemoGuard content-safety prompt; ``{conversation}`` is replaced by the
#: ``user: ...`` (and ``response: agent: ...``) lines.
CONTENT_SAFETY_PROMPT = """\
Task: Check if there is unsafe content in the user or agent messages in the below \
conversation in accordance with our safety policy with the below categories. Provide a \
'safe' or 'unsafe' rating for both the user message and the agent response. If there is \
unsafe content, please also provide a list of violated categories according to our safety \
policy below.

<BEGIN UNSAFE CONTENT CATEGORIES>
S1: Violence.
S2: Sexual.
S3: Criminal Planning/Confessions.
S4: Guns and Illegal Weapons.
S5: Controlled/Regulated Substances.
S6: Suicide and Self Harm.
S7: Sexual (minor).
S8: Hate/Identity Hate.
S9: PII/Privacy.
S10: Harassment.
S11: Threat.
S12: Profanity.
S13: Needs Caution.
S14: Other.
S15: Manipulation.
S16: Fraud/Deception.
S17: Malware.
S18: High Risk Gov Decision Making.
S19: Political/Misinformation/Conspiracy.
S20: Copyright/Trademark/Plagiarism.
S21: Unauthorized Advice.
S22: Illegal Activity.
S23: Immoral/Unethical.
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

{conversation}

<END CONVERSATION>

Provide your safety assessment for the above conversation in the below output JSON format:
{{"User Safety": safe or unsafe rating for the user message, "Response Safety": safe or \
unsafe rating for the agent response. Omit if no agent response present. "Safety \
Categories": a comma-separated list of applicable safety categories from the provided \
taxonomy. Omit if all safe.}}

Do not include anything other than the output JSON in your response.
Output JSON: """


def _json_object(backend: str, text: str) -> Mapping[str, Any]:
    """The first JSON object in a model's reply (models wrap it in prose or fences)."""
    start = text.find("{")
    if start >= 0:
        try:
            value, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            value = None
        if isinstance(value, Mapping):
            return value
    raise BackendUnavailable(backend, f"the reply is not a JSON verdict: {excerpt(text, 120)!r}")


@attrs.define(kw_only=True)
class _ChatBackend:
    """A NemoGuard model behind an OpenAI-compatible chat endpoint."""

    base_url: str
    model: str
    timeout: float = 10.0
    api_key: str | None = attrs.field(default=None, repr=False)
    name: str = "chat"
    _http: _Http = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self._http = _Http(self.name, self.timeout, self.api_key)

    async def start(self) -> None:
        """Nothing to load."""

    async def _ask(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, float]:
        body = {"model": self.model, "messages": messages, "temperature": 0.0}
        body["max_tokens"] = max_tokens
        started = time.perf_counter()
        status, data = await self._http.post_json(f"{self.base_url}/chat/completions", body)
        return _chat_reply(self.name, status, data), _elapsed(started)

    async def aclose(self) -> None:
        await self._http.aclose()


@attrs.define(kw_only=True)
class ContentSafetyBackend(_ChatBackend):
    """NemoGuard content safety (``llama-3.1-nemoguard-8b-content-safety``).

    Input: judged on ``"User Safety"``; output and tool calls: on
    ``"Response Safety"``.  The violated categories go in the verdict's
    ``detail``.  A reply without a JSON verdict is :class:`BackendUnavailable`.
    """

    name: str = "content_safety"
    #: The prompt template (``{conversation}`` placeholder).
    prompt: str = CONTENT_SAFETY_PROMPT
    rule: str = "content safety"

    async def _judge(self, conversation: str, key: str) -> Verdict:
        content = self.prompt.format(conversation=conversation)
        reply, latency = await self._ask([{"role": "user", "content": content}], 64)
        verdict = _json_object(self.name, reply)
        rating = verdict.get(key)
        if not isinstance(rating, str) or rating.strip().lower() not in ("safe", "unsafe"):
            raise BackendUnavailable(self.name, f"no {key!r} rating in {excerpt(reply, 120)!r}")
        categories = scrub(str(verdict.get("Safety Categories") or ""))
        if rating.strip().lower() == "unsafe":
            return Verdict(
                rule=self.rule,
                decision="block",
                backend=self.name,
                latency=latency,
                detail=categories or key,
            )
        return Verdict(rule=self.rule, decision="pass", backend=self.name, latency=latency)

    async def check_input(self, text: str, model: str) -> Verdict | None:
        """Judge the user message."""
        return await self._judge(f"user: {text}", "User Safety")

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None:
        """Judge the agent's answer to ``prompt``."""
        return await self._judge(f"user: {prompt}\n\nresponse: agent: {text}", "Response Safety")

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None:
        """Judge a proposed tool call as the agent's response."""
        return await self.check_output(prompt, render_tool_call(call), model)


@attrs.define(kw_only=True)
class TopicControlBackend(_ChatBackend):
    """NemoGuard topic control (``llama-3.1-nemoguard-8b-topic-control``): input only.

    The system prompt states what the assistant may talk about; the model
    answers ``on-topic`` or ``off-topic``.  Anything else is
    :class:`BackendUnavailable`.
    """

    name: str = "topic_control"
    #: The allowed-topics instructions (the system prompt).
    system_prompt: str = ""
    rule: str = "topic control"

    async def check_input(self, text: str, model: str) -> Verdict | None:
        """Judge whether the user message stays on the allowed topics."""
        system = self.system_prompt.strip()
        system += (
            '\n\nIf any of the above conditions are violated, please respond with "off-topic". '
            'Otherwise, respond with "on-topic". '
            'You must respond with "on-topic" or "off-topic".'
        )
        messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        reply, latency = await self._ask(messages, 8)
        answer = reply.strip().strip(".\"'").lower()
        if answer == "off-topic":
            return Verdict(
                rule=self.rule, decision="block", backend=self.name, latency=latency, detail=answer
            )
        if answer == "on-topic":
            return Verdict(rule=self.rule, decision="pass", backend=self.name, latency=latency)
        raise BackendUnavailable(
            self.name, f"expected on-topic or off-topic, got {excerpt(reply, 80)!r}"
        )

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None:
        """Topic control judges input only."""
        return None

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None:
        """Topic control judges input only."""
        return None


@attrs.define(kw_only=True)
class JailbreakBackend:
    """NemoGuard jailbreak detection: ``POST {url}/v1/classify {"input": text}``; input only.

    :param url: the service root (``/v1/classify`` is appended unless the URL
        already ends with ``/classify``).
    :param threshold: when set, block on ``score >= threshold`` instead of the
        service's ``jailbreak`` flag.
    """

    url: str
    timeout: float = 10.0
    api_key: str | None = attrs.field(default=None, repr=False)
    threshold: float | None = None
    name: str = "jailbreak"
    rule: str = "jailbreak detection"
    _http: _Http = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        url = self.url.rstrip("/")
        if not url.endswith("/classify"):
            url = f"{url[:-3] if url.endswith('/v1') else url}/v1/classify"
        self.url = url
        self._http = _Http(self.name, self.timeout, self.api_key)

    async def start(self) -> None:
        """Nothing to load."""

    async def check_input(self, text: str, model: str) -> Verdict | None:
        """Classify the user message."""
        started = time.perf_counter()
        status, data = await self._http.post_json(self.url, {"input": text})
        latency = _elapsed(started)
        if status != 200 or not isinstance(data, Mapping):
            raise BackendUnavailable(self.name, f"HTTP {status}: {_error_text(data)}")
        flag = data.get("jailbreak")
        score = data.get("score")
        if not isinstance(flag, bool):
            raise BackendUnavailable(self.name, f"no boolean 'jailbreak' in {excerpt(data, 120)}")
        numeric = isinstance(score, (int, float)) and not isinstance(score, bool)
        value = float(score) if numeric else None  # type: ignore[arg-type]
        if self.threshold is not None and value is not None:
            flag = value >= self.threshold
        detail = f"score {value:.3f}" if value is not None else ""
        return Verdict(
            rule=self.rule,
            decision="block" if flag else "pass",
            backend=self.name,
            latency=latency,
            detail=detail,
        )

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None:
        """Jailbreak detection judges input only."""
        return None

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None:
        """Jailbreak detection judges input only."""
        return None

    async def aclose(self) -> None:
        await self._http.aclose()
