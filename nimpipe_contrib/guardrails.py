"""The ``guardrails`` stage: input, output and tool-call checks around every turn.

Enable it with a ``[stages.guardrails]`` table (every setting is in
``docs/guardrails.md``)::

    [stages.guardrails]
    backends = ["microservice"]    # also: inprocess, content_safety, topic_control, jailbreak
    url = "http://127.0.0.1:8000"  # NeMo Guardrails server (JAATO_NIM_GUARDRAILS_URL)
    config_id = "default"          # its rails configuration (JAATO_NIM_GUARDRAILS_CONFIG)
    input_mode = "concurrent"      # or "sequential": no input reaches the model unchecked
    mode = "enforce"               # or "report": check and record, never block
    approach = "checks"            # or "generation": model calls go through the NeMo server
    fail_open = false              # true: let turns through when a backend cannot judge
    timeout = 10.0                 # seconds for one check

What it does on every turn:

- **input**: the checker hooks of guardrails providers run first (they may
  rewrite, e.g. redact); then the backends judge the input.  With
  ``input_mode = "concurrent"`` that check runs alongside the model call and
  a block cancels the call (a turn costs about max(check, model), the
  cancelled call is recorded ``cancelled`` with the tokens it spent, and none
  of its text is shown); with ``"sequential"`` the check comes first and a
  blocked input never reaches the model.
- **output**: the answer is judged before it is released; while this stage is
  enabled streamed output is held back (``buffer`` policy) or released
  sentence by sentence as each sentence passes (``sentence`` policy).
- **tool calls**: every tool call the model proposes is judged before the
  turn returns it to the agent.
- **failures**: a backend that is down, slower than ``timeout`` or answers
  something that is no verdict blocks the turn with rule
  ``guardrails:unavailable`` (fail-closed), unless ``fail_open = true``, which
  lets the turn through and records an ``unchecked`` verdict.
- **guarded generation** (``approach = "generation"``): every model call is
  sent through the NeMo Guardrails server's ``/v1/chat/completions`` with
  ``guardrails.config_id``; the server runs its input rails, the model and its
  output rails, and the stage turns the rails' log into verdicts and a typed
  block instead of running its own rails-only checks.
- **verdicts**: every check gives a :class:`~nimpipe.types.Verdict` (rail,
  decision, backend, latency) recorded per turn (:meth:`GuardrailsStage.verdicts`)
  and logged on ``nimpipe.guardrails``; a block names the rail in ``Block.rule``.
- **secrets**: whatever a backend or a provider says (rail names, details,
  error messages) is scrubbed of keys (:func:`nimpipe.redaction.scrub`)
  before it reaches a verdict, a block's reason or a log line; the keys of
  the backends are registered as secrets.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from nimpipe import hookimpl
from nimpipe.errors import ConfigError, NimpipeError
from nimpipe.redaction import register_secret, scrub, scrub_fields
from nimpipe.stage import NO_STREAM
from nimpipe.types import (
    Block,
    Deferred,
    Message,
    Output,
    Retry,
    Role,
    Secret,
    ToolCall,
    Turn,
    Verdict,
)
from nimpipe_contrib.guardrails_backends import (
    INPUT_RAILS,
    NEMO_REFUSAL,
    OUTPUT_RAILS,
    Backend,
    BackendUnavailable,
    ContentSafetyBackend,
    InProcessBackend,
    JailbreakBackend,
    LoopThread,
    MicroserviceBackend,
    TopicControlBackend,
    missing_nemoguardrails_message,
    nemoguardrails_available,
)
from nimpipe_contrib.guardrails_hooks import VerdictLog, declare_hooks, publish_verdict

if TYPE_CHECKING:
    import pluggy

    from nimpipe.config import Config
    from nimpipe.errors import ProviderError
    from nimpipe.pipeline import Pipeline
    from nimpipe.types import Attempt, Response, Route

__all__ = [
    "APPROACHES",
    "BACKEND_NAMES",
    "GENERATION_BACKEND",
    "STAGE",
    "UNAVAILABLE_RULE",
    "GuardrailsSettings",
    "GuardrailsStage",
    "create_plugin",
    "demo_guardrails",
]

#: The stage's name (``[stages.guardrails]``, ``Block.plugin``, ``Verdict.plugin``).
STAGE = "guardrails"

#: The rule of a block caused by a backend that could not judge (fail-closed).
UNAVAILABLE_RULE = "guardrails:unavailable"

#: The rule of a block caused by ``denied_tools``.
DENIED_TOOL_RULE = "guardrails:denied-tool"

#: The ``Verdict.backend`` of the rails a guarded generation ran on the NeMo server.
GENERATION_BACKEND = "microservice:generation"

#: Values of ``approach``: rails-only checks around the call, or the call made through the server.
APPROACHES = ("checks", "generation")

#: Backend names accepted in ``backends``.
BACKEND_NAMES = ("microservice", "inprocess", "content_safety", "topic_control", "jailbreak")

_KEYS = frozenset(
    {
        "backends",
        "url",
        "config_id",
        "model",
        "api_key_env",
        "config_path",
        "mode",
        "approach",
        "input_mode",
        "fail_open",
        "timeout",
        "check_input",
        "check_output",
        "check_tool_calls",
        "denied_tools",
        "message",
        *BACKEND_NAMES[2:],
    }
)
_SERVICE_KEYS: Mapping[str, frozenset[str]] = {
    "content_safety": frozenset({"base_url", "model", "api_key_env", "prompt"}),
    "topic_control": frozenset({"base_url", "model", "api_key_env", "system_prompt"}),
    "jailbreak": frozenset({"url", "api_key_env", "threshold"}),
}

Kind = Literal["input", "output", "tool call"]


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class GuardrailsSettings:
    """The ``[stages.guardrails]`` table, validated."""

    #: Check backends, in the order their verdicts are recorded.
    backends: tuple[str, ...] = ("microservice",)
    #: NeMo Guardrails server root (``JAATO_NIM_GUARDRAILS_URL``).
    url: str | None = None
    #: Its rails configuration (``JAATO_NIM_GUARDRAILS_CONFIG``); ``None``: the server's default.
    config_id: str | None = None
    #: Model name sent with checks (the server's main model); default: the turn's model.
    model: str | None = None
    #: Environment variable holding the guardrails server's bearer token.
    api_key_env: str | None = None
    #: Rails configuration directory of the ``inprocess`` backend.
    config_path: str | None = None
    #: ``enforce`` blocks; ``report`` only checks and records.
    mode: Literal["enforce", "report"] = "enforce"
    #: ``checks``: rails-only checks around the model call; ``generation``: the model call
    #: goes through the NeMo Guardrails server, whose rails judge it.
    approach: Literal["checks", "generation"] = "checks"
    #: ``concurrent``: the input check runs alongside the model call; ``sequential``: before it.
    input_mode: Literal["concurrent", "sequential"] = "concurrent"
    #: Let turns through when a backend cannot judge (recorded ``unchecked``).
    fail_open: bool = False
    #: Seconds one check may take before it counts as unavailable.
    timeout: float = 10.0
    check_input: bool = True
    check_output: bool = True
    check_tool_calls: bool = True
    #: Tool names whose calls are always blocked.
    denied_tools: frozenset[str] = frozenset()
    #: What the user sees instead of a blocked turn.
    message: str = NEMO_REFUSAL
    #: ``[stages.guardrails.content_safety]``, ``.topic_control``, ``.jailbreak`` tables.
    services: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)

    @classmethod
    def from_config(
        cls, config: Config, environ: Mapping[str, str] | None = None
    ) -> GuardrailsSettings:
        """Validate ``config.stage("guardrails")``; raises :class:`ConfigError` naming the key."""
        return cls.from_table(config.stage(STAGE), environ=environ, source=config.source)

    @classmethod
    def from_table(
        cls,
        table: Mapping[str, Any],
        *,
        environ: Mapping[str, str] | None = None,
        source: str | None = None,
    ) -> GuardrailsSettings:
        """Validate a settings table (``environ`` supplies the jaato variables)."""
        env = os.environ if environ is None else environ
        reader = _Reader(source)
        unknown = sorted(set(table) - _KEYS)
        if unknown:
            raise reader.fail(unknown[0], f"unknown setting (known: {', '.join(sorted(_KEYS))})")
        kwargs: dict[str, Any] = {}
        for key in ("url", "config_id", "model", "api_key_env", "config_path", "message"):
            if key in table:
                kwargs[key] = reader.text(key, table[key])
        if "url" not in kwargs and env.get("JAATO_NIM_GUARDRAILS_URL"):
            kwargs["url"] = env["JAATO_NIM_GUARDRAILS_URL"]
        if "config_id" not in kwargs and env.get("JAATO_NIM_GUARDRAILS_CONFIG"):
            kwargs["config_id"] = env["JAATO_NIM_GUARDRAILS_CONFIG"]
        if "url" in kwargs and not kwargs["url"].startswith(("http://", "https://")):
            raise reader.fail("url", f"must be an http(s) URL, got {kwargs['url']!r}")
        if "backends" in table:
            backends = reader.names("backends", table["backends"])
            for name in backends:
                if name not in BACKEND_NAMES:
                    raise reader.fail(
                        "backends", f"unknown backend {name!r} (known: {', '.join(BACKEND_NAMES)})"
                    )
            if len(set(backends)) != len(backends):
                raise reader.fail("backends", "names a backend twice")
        elif "config_path" in kwargs and "url" not in kwargs:
            backends = ("inprocess",)
        else:
            backends = ("microservice",)
        kwargs["backends"] = backends
        for key, choices in (
            ("mode", ("enforce", "report")),
            ("approach", APPROACHES),
            ("input_mode", _INPUT_MODES),
        ):
            if key in table:
                value = reader.text(key, table[key])
                if value not in choices:
                    raise reader.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
                kwargs[key] = value
        for key in ("fail_open", "check_input", "check_output", "check_tool_calls"):
            if key in table:
                kwargs[key] = reader.boolean(key, table[key])
        if "timeout" in table:
            kwargs["timeout"] = reader.positive("timeout", table["timeout"])
        if "denied_tools" in table:
            kwargs["denied_tools"] = frozenset(reader.names("denied_tools", table["denied_tools"]))
        services: dict[str, Mapping[str, Any]] = {}
        for name, allowed in _SERVICE_KEYS.items():
            if name not in table:
                continue
            sub = table[name]
            if not isinstance(sub, Mapping):
                raise reader.fail(name, "must be a table")
            extra = sorted(set(sub) - allowed)
            if extra:
                raise reader.fail(
                    f"{name}.{extra[0]}", f"unknown setting (known: {', '.join(sorted(allowed))})"
                )
            services[name] = dict(sub)
        kwargs["services"] = services
        settings = cls(**kwargs)
        settings._check_backends(reader)
        return settings

    def _check_backends(self, reader: _Reader) -> None:
        if self.approach == "generation" and "microservice" not in self.backends:
            raise reader.fail("approach", '"generation" needs the microservice backend and its url')
        for name in self.backends:
            if name == "microservice" and not self.url:
                raise reader.fail("url", "is required by the microservice backend "
                                  "(or set JAATO_NIM_GUARDRAILS_URL)")  # fmt: skip
            if name == "inprocess":
                if not self.config_path:
                    raise reader.fail("config_path", "is required by the inprocess backend")
                if not Path(self.config_path).expanduser().is_dir():
                    raise reader.fail("config_path", f"is not a directory: {self.config_path}")
                if not nemoguardrails_available():
                    raise reader.fail("backends", missing_nemoguardrails_message())
            if name in ("content_safety", "topic_control"):
                table = self.services.get(name, {})
                for key in ("base_url", "model"):
                    if not isinstance(table.get(key), str) or not table[key]:
                        raise reader.fail(f"{name}.{key}", f"is required by the {name} backend")
            if name == "topic_control" and not self.services["topic_control"].get("system_prompt"):
                raise reader.fail("topic_control.system_prompt", "is required (the allowed topics)")
            if name == "jailbreak":
                url = self.services.get(name, {}).get("url")
                if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                    raise reader.fail("jailbreak.url", "is required: the service's http(s) URL")

    def api_key(self, env_var: str | None, key: str) -> str | None:
        """The secret named by ``env_var`` (``None`` when no variable is named)."""
        if not env_var:
            return None
        value = os.environ.get(env_var)
        if not value:
            raise ConfigError(
                f"the environment variable {env_var} is not set", key=f"stages.{STAGE}.{key}"
            )
        register_secret(value)
        return value

    @property
    def generation_url(self) -> str:
        """The guardrails server's OpenAI-compatible base URL (``<url>/v1``)."""
        assert self.url is not None
        root = self.url.rstrip("/")
        return root if root.endswith("/v1") else f"{root}/v1"

    def generation_body(self) -> dict[str, Any]:
        """The ``guardrails`` request field of a guarded generation."""
        guardrails: dict[str, Any] = {
            "options": {
                "log": {"activated_rails": True},
                "output_vars": ["triggered_input_rail", "triggered_output_rail"],
            }
        }
        if self.config_id:
            guardrails["config_id"] = self.config_id
        return {"guardrails": guardrails}

    def build_backends(self) -> tuple[Backend, ...]:
        """One backend object per name in :attr:`backends`."""
        built: list[Backend] = []
        for name in self.backends:
            if name == "microservice":
                assert self.url is not None
                built.append(
                    MicroserviceBackend(
                        url=self.url,
                        config_id=self.config_id,
                        timeout=self.timeout,
                        api_key=self.api_key(self.api_key_env, "api_key_env"),
                    )
                )
            elif name == "inprocess":
                assert self.config_path is not None
                built.append(InProcessBackend(config_path=Path(self.config_path).expanduser()))
            elif name == "jailbreak":
                table = self.services[name]
                built.append(
                    JailbreakBackend(
                        url=table["url"],
                        timeout=self.timeout,
                        api_key=self.api_key(table.get("api_key_env"), f"{name}.api_key_env"),
                        threshold=table.get("threshold"),
                    )
                )
            else:
                table = self.services[name]
                common = {
                    "base_url": table["base_url"],
                    "model": table["model"],
                    "timeout": self.timeout,
                    "api_key": self.api_key(table.get("api_key_env"), f"{name}.api_key_env"),
                }
                if name == "content_safety":
                    extra = {"prompt": table["prompt"]} if table.get("prompt") else {}
                    built.append(ContentSafetyBackend(**common, **extra))
                else:
                    built.append(
                        TopicControlBackend(**common, system_prompt=table["system_prompt"])
                    )
        return tuple(built)


_INPUT_MODES = ("concurrent", "sequential")


@attrs.frozen
class _Reader:
    source: str | None

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, path=self.source, key=f"stages.{STAGE}.{key}")

    def text(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value

    def positive(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.fail(key, f"must be a positive number of seconds, got {value!r}")
        return float(value)

    def names(self, key: str, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"must be a list of names, got {value!r}")
        return tuple(value)


# --------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------


@attrs.frozen
class _Outcome:
    block: Block | None = None
    #: The rewritten text, when a verdict rewrote it.
    text: str | None = None
    #: The verdict that rewrote it.
    rewrite: Verdict | None = None


async def _await(value: Any) -> Any:
    return await value


def _with_last_user_text(turn: Turn, text: str) -> Turn:
    messages = list(turn.messages)
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role is Role.USER:
            messages[index] = attrs.evolve(messages[index], content=text)
            break
    return attrs.evolve(turn, messages=messages)


@attrs.define
class GuardrailsStage:
    """The ``guardrails`` stage (one per pipeline; see the module docstring).

    :param settings: the settings; ``None`` reads ``[stages.guardrails]`` at
        ``configure``.
    """

    settings: GuardrailsSettings | None = None
    #: Every verdict of the most recent turns.
    verdict_log: VerdictLog = attrs.field(factory=VerdictLog)
    _backends: tuple[Backend, ...] = attrs.field(default=(), init=False)
    _loop: LoopThread = attrs.field(factory=lambda: LoopThread("nimpipe-guardrails"), init=False)
    _companions: list[str] = attrs.field(factory=list, init=False)

    # -- lifecycle --------------------------------------------------------------

    @hookimpl
    def addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
        declare_hooks(pluginmanager)

    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        if self.settings is None:
            self.settings = GuardrailsSettings.from_config(pipeline.config)
        settings = self.settings
        self._backends = settings.build_backends()
        for backend in self._backends:
            if isinstance(backend, InProcessBackend):
                backend.begin_loading()  # in the background; the first check waits for it
        from nimpipe import __version__

        plugins = pipeline.plugins
        companions: list[tuple[object, str]] = []
        if settings.check_input and plugins.has_impls("guardrails_check_input"):
            companions.append((_InputCheckers(self), f"{STAGE}.checkers"))
        if settings.check_tool_calls:
            companions.append((_ToolCallGuard(self), f"{STAGE}.tool_calls"))
        if settings.approach == "generation":
            companions.append((_GenerationGuard(self), f"{STAGE}.generation"))
        for companion, name in companions:
            self._companions.append(
                plugins.register(companion, name, kind="contrib", version=__version__)
            )

    @hookimpl
    def unconfigure(self, pipeline: Pipeline) -> None:
        for name in self._companions:
            pipeline.plugins.unregister(name)
        self._companions.clear()
        self._loop.close([backend.aclose() for backend in self._backends])

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every backend is loaded (in-process rails); raises on failure."""
        for backend in self._backends:
            self._loop.submit(backend.start()).result(timeout)

    def verdicts(self, turn_id: str) -> tuple[Verdict, ...]:
        """The verdicts recorded for one turn, in the order they were given."""
        return self.verdict_log.get(turn_id)

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The configured backends (after ``configure``)."""
        return self._backends

    def _checking_backends(self, response: Response | None = None) -> tuple[Backend, ...]:
        """The backends that judge input (``response`` ``None``) or the output of ``response``.

        With guarded generation the NeMo server's own rails judge the input
        and, when its reply carries the rails' log, the output: the
        microservice backend's rails-only checks would only repeat them.
        """
        if self._settings.approach != "generation":
            return self._backends
        if response is not None and _generation_log(response) is None:
            return self._backends
        return tuple(b for b in self._backends if not isinstance(b, MicroserviceBackend))

    # -- input --------------------------------------------------------------------

    @hookimpl(trylast=True)
    async def pre_input(self, turn: Turn, pipeline: Pipeline) -> Turn | Block | Deferred | None:
        settings = self._settings
        if not settings.check_input or not self._checking_backends():
            return None
        text = turn.last_user_text
        if settings.input_mode == "concurrent":
            check = functools.partial(self._judge_input_concurrently, turn, text, pipeline)
            return Deferred(check=check, name="guardrails input", plugin=STAGE)
        outcome = await self._judge(
            turn, "input", text, pipeline, self._backend_verdicts(turn, pipeline, "input", text)
        )
        if outcome.block is not None:
            return outcome.block
        if outcome.text is not None:
            return _with_last_user_text(turn, outcome.text)
        return None

    async def _judge_input_concurrently(
        self, turn: Turn, text: str, pipeline: Pipeline
    ) -> Block | None:
        outcome = await self._judge(
            turn, "input", text, pipeline, self._backend_verdicts(turn, pipeline, "input", text)
        )
        if outcome.block is None and outcome.rewrite is not None:
            # The model is already reading the original input: a rewrite cannot apply.
            return self._block(
                outcome.rewrite,
                f"{outcome.rewrite.rule} rewrote the input, which the concurrent input "
                'check cannot apply (set input_mode = "sequential")',
            )
        return outcome.block

    async def check_input_with_providers(
        self, turn: Turn, pipeline: Pipeline
    ) -> Turn | Block | None:
        """Run the providers' ``guardrails_check_input`` hooks (before the backends)."""
        text = turn.last_user_text
        verdicts = await self._provider_verdicts(
            pipeline, "guardrails_check_input", turn=turn, text=text
        )
        outcome = await self._judge(turn, "input", text, pipeline, _ready(verdicts))
        if outcome.block is not None:
            return outcome.block
        if outcome.text is not None:
            return _with_last_user_text(turn, outcome.text)
        return None

    # -- output -------------------------------------------------------------------

    @hookimpl(trylast=True)
    async def post_output(
        self, turn: Turn, output: Output, pipeline: Pipeline
    ) -> str | Block | None:
        settings = self._settings
        if not settings.check_output:
            return None
        if output.final and output.released and output.released == output.text:
            # Sentence by sentence, every prefix of this answer was judged as it was released.
            return None
        segment = output.text
        verdicts = await self._provider_verdicts(
            pipeline, "guardrails_check_output", turn=turn, text=segment
        )
        outcome = await self._judge(turn, "output", segment, pipeline, _ready(verdicts))
        if outcome.block is not None:
            return outcome.block
        rewritten = outcome.text
        if rewritten is not None:
            segment = rewritten
        backends = self._checking_backends(output.response)
        if backends:
            judged = segment if output.final else output.released + segment
            outcome = await self._judge(
                turn,
                "output",
                judged,
                pipeline,
                self._backend_verdicts(turn, pipeline, "output", judged, backends),
            )
            if outcome.block is not None:
                return outcome.block
            if outcome.text is not None:
                if output.final:
                    return outcome.text
                if outcome.text.startswith(output.released):
                    return outcome.text[len(output.released) :]
                assert outcome.rewrite is not None
                return self._block(outcome.rewrite, "a rail rewrote text already released")
        return rewritten

    # -- tool calls -----------------------------------------------------------------

    async def check_tool_calls(
        self, turn: Turn, calls: Sequence[ToolCall], pipeline: Pipeline
    ) -> Block | None:
        """Judge the tool calls of a response (denied tools, providers, backends at once)."""
        settings = self._settings
        prompt = turn.last_user_text
        model = self._check_model(turn, pipeline)
        jobs: list[Coroutine[Any, Any, list[Verdict]]] = []
        denied = [
            Verdict(
                rule=DENIED_TOOL_RULE,
                decision="block",
                plugin=STAGE,
                backend="denied_tools",
                detail=f"tool {call.name!r} is denied",
            )
            for call in calls
            if call.name in settings.denied_tools
        ]
        for call in calls:
            jobs.append(
                self._provider_verdicts(
                    pipeline, "guardrails_check_tool_call", turn=turn, call=call
                )
            )
            jobs.append(
                self._run_backends(
                    turn,
                    functools.partial(_tool_call_check, prompt=prompt, call=call, model=model),
                )
            )
        gathered = await asyncio.gather(*jobs)
        verdicts = denied + [v for group in gathered for v in group]
        outcome = await self._judge(turn, "tool call", prompt, pipeline, _ready(verdicts))
        return outcome.block

    # -- guarded generation -------------------------------------------------------------

    def generation_route(self, route: Route, attempt: Attempt) -> Route | None:
        """``route`` sent through the NeMo Guardrails server, or ``None`` to call it directly.

        Same name, model, price and limits, so records and the ledger stay
        attributed to the route; the base URL is the server's ``/v1``, the
        request carries ``guardrails.config_id`` and asks for the rails' log,
        and the route's own key is replaced by the server's (``api_key_env``):
        a model key never goes to another host.  After a fail-open retry the
        route is called directly.
        """
        settings = self._settings
        if _is_generation_route(route):
            return None
        cause = attempt.cause
        if (
            isinstance(cause, Retry)
            and cause.plugin == STAGE
            and cause.reason.startswith(_FAIL_OPEN_RETRY)
        ):
            return None
        key = settings.api_key(settings.api_key_env, "api_key_env")
        return attrs.evolve(
            route,
            base_url=settings.generation_url,
            api_key=Secret(key) if key else None,
            api_key_env=settings.api_key_env,
            extra_body={**route.extra_body, **settings.generation_body()},
            # Only a non-streamed reply carries the server's rails log.
            flags=route.flags | {NO_STREAM},
        )

    async def judge_generation(
        self,
        turn: Turn,
        route: Route,
        response: Response | None,
        error: ProviderError | None,
        pipeline: Pipeline,
    ) -> Block | Retry | None:
        """Record the rails a guarded generation ran; block when one of them stopped the turn.

        A server that cannot be reached, fails or times out counts as
        unavailable: fail-closed blocks, ``fail_open`` records ``unchecked``
        and calls the route directly once.
        """
        if not _is_generation_route(route):
            return None
        started = time.perf_counter()
        if response is None:
            rail = _streamed_block_rail(error.message) if error is not None else None
            if rail is not None:
                verdict = Verdict(
                    rule=rail,
                    decision="block",
                    plugin=STAGE,
                    backend=GENERATION_BACKEND,
                    latency=time.perf_counter() - started,
                    detail="the server cut the stream: output blocked",
                )
                return (await self._judge(turn, "output", "", pipeline, _ready([verdict]))).block
            if error is None or not error.transient:
                return None  # not the guardrails' doing (a refused key, a bad request)
            verdict = self._unavailable(GENERATION_BACKEND, error.message, started)
            outcome = await self._judge(turn, "input", "", pipeline, _ready([verdict]))
            if outcome.block is not None:
                return outcome.block
            return Retry(reason=scrub(f"{_FAIL_OPEN_RETRY}: {error.message}"), plugin=STAGE)
        log = _generation_log(response)
        if log is None:
            if response.ttft is None:
                reason = (
                    f"the reply of {route.host} carries no guardrails log "
                    "(not a NeMo Guardrails server, or the config_id is unknown)"
                )
                verdict = self._unavailable(GENERATION_BACKEND, reason, started)
                return (await self._judge(turn, "output", "", pipeline, _ready([verdict]))).block
            if response.text.strip() != NEMO_REFUSAL:
                return None  # streamed: post_output judges the held-back text
            verdict = Verdict(
                rule=INPUT_RAILS,
                decision="block",
                plugin=STAGE,
                backend=GENERATION_BACKEND,
                detail="the server streamed its refusal (a streamed reply carries no rails log)",
            )
            return (await self._judge(turn, "input", "", pipeline, _ready([verdict]))).block
        inputs, outputs = _generation_verdicts(log)
        outcome = await self._judge(turn, "input", "", pipeline, _ready(inputs))
        if outcome.block is not None:
            return outcome.block
        return (await self._judge(turn, "output", "", pipeline, _ready(outputs))).block

    # -- verdicts ---------------------------------------------------------------------

    @property
    def _settings(self) -> GuardrailsSettings:
        if self.settings is None:
            raise NimpipeError("the guardrails stage is used before configure()")
        return self.settings

    def _check_model(self, turn: Turn, pipeline: Pipeline) -> str:
        settings = self._settings
        if settings.model:
            return settings.model
        if turn.model:
            return turn.model
        config = pipeline.config
        name = turn.route or config.default_route
        route = config.routes.get(name) if name else None
        if route is None and config.routes:
            route = next(iter(config.routes.values()))
        return route.model if route is not None else "default"

    async def _backend_verdicts(
        self,
        turn: Turn,
        pipeline: Pipeline,
        kind: Literal["input", "output"],
        text: str,
        backends: Sequence[Backend] | None = None,
    ) -> list[Verdict]:
        model = self._check_model(turn, pipeline)
        if kind == "input":
            check = functools.partial(_input_check, text=text, model=model)
        else:
            check = functools.partial(
                _output_check, prompt=turn.last_user_text, text=text, model=model
            )
        if backends is None:
            backends = self._checking_backends()
        return await self._run_backends(turn, check, backends)

    async def _run_backends(
        self,
        turn: Turn,
        check: Callable[[Backend], Coroutine[Any, Any, Verdict | None]],
        backends: Sequence[Backend] | None = None,
    ) -> list[Verdict]:
        timeout = self._settings.timeout
        remaining = turn.remaining()
        if remaining is not None:
            timeout = max(0.001, min(timeout, remaining))

        async def one(backend: Backend) -> Verdict | None:
            started = time.perf_counter()
            try:
                verdict = await self._loop.run(asyncio.wait_for(check(backend), timeout))
            except BackendUnavailable as exc:
                return self._unavailable(backend.name, exc.reason, started)
            except (asyncio.TimeoutError, TimeoutError):
                return self._unavailable(backend.name, f"no verdict within {timeout:g} s", started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return self._unavailable(backend.name, f"{type(exc).__name__}: {exc}", started)
            if verdict is None:
                return None
            return attrs.evolve(verdict, plugin=STAGE)

        chosen = self._backends if backends is None else backends
        results = await asyncio.gather(*(one(b) for b in chosen))
        return [v for v in results if v is not None]

    async def _provider_verdicts(
        self, pipeline: Pipeline, hook: str, **kwargs: Any
    ) -> list[Verdict]:
        if not pipeline.plugins.has_impls(hook):
            return []
        started = time.perf_counter()
        try:
            results = await pipeline.plugins.collect(hook, _await, pipeline=pipeline, **kwargs)
        except NimpipeError as exc:
            plugin = getattr(exc, "plugin", "?")
            return [self._unavailable(f"hook:{plugin}", str(exc), started)]
        verdicts = []
        for plugin, result in results:
            if not isinstance(result, Verdict):
                reason = f"{hook} returned {type(result).__name__}, not a Verdict"
                verdicts.append(self._unavailable(f"hook:{plugin}", reason, started))
                continue
            latency = result.latency or (time.perf_counter() - started)
            verdicts.append(
                attrs.evolve(
                    result,
                    plugin=result.plugin or plugin,
                    backend=result.backend or f"hook:{plugin}",
                    latency=latency,
                )
            )
        return verdicts

    def _unavailable(self, backend: str, reason: str, started: float) -> Verdict:
        return Verdict(
            rule=UNAVAILABLE_RULE,
            decision="unchecked" if self._settings.fail_open else "error",
            plugin=STAGE,
            backend=scrub(backend),
            latency=time.perf_counter() - started,
            detail=scrub(reason),
        )

    def _block(self, verdict: Verdict, reason: str) -> Block:
        return Block(
            reason=scrub(reason),
            plugin=STAGE,
            rule=verdict.rule,
            message=self._settings.message,
        )

    async def _judge(
        self,
        turn: Turn,
        kind: Kind,
        text: str,
        pipeline: Pipeline,
        pending: Coroutine[Any, Any, list[Verdict]],
    ) -> _Outcome:
        """Await the verdicts, record them, and decide (nothing is decided in report mode)."""
        verdicts = [scrub_fields(verdict) for verdict in await pending]
        settings = self._settings
        report = settings.mode == "report"
        for verdict in verdicts:
            recorded = verdict
            if verdict.decision == "rewrite":
                recorded = attrs.evolve(
                    verdict, detail=f"{kind} rewritten ({len(text)} -> {len(verdict.detail)} chars)"
                )
            if report and verdict.decision in ("block", "rewrite", "error"):
                recorded = attrs.evolve(recorded, detail=f"report only: {recorded.detail}".strip())
            publish_verdict(pipeline, turn, recorded, self.verdict_log)
        if report:
            return _Outcome()
        for verdict in verdicts:
            if verdict.decision == "block" or (
                kind == "tool call" and verdict.decision == "rewrite"
            ):
                reason = f"{kind} blocked by {verdict.rule} ({verdict.backend})"
                if verdict.detail and verdict.decision == "block":
                    reason += f": {verdict.detail}"
                return _Outcome(block=self._block(verdict, reason))
        for verdict in verdicts:
            if verdict.decision == "error":
                reason = f"guardrails unavailable ({verdict.backend}): {verdict.detail}"
                return _Outcome(block=self._block(verdict, reason))
        rewrite = None
        for verdict in verdicts:
            if verdict.decision == "rewrite":
                rewrite = verdict
        if rewrite is not None:
            return _Outcome(text=rewrite.detail, rewrite=rewrite)
        return _Outcome()


async def _ready(verdicts: list[Verdict]) -> list[Verdict]:
    return verdicts


#: Reason prefix of the retry that calls a route directly when the guardrails server is down.
_FAIL_OPEN_RETRY = "guardrails server unavailable, fail_open"


#: How NeMo Guardrails 0.24 words the error chunk that ends a stream its output rail blocked.
_STREAM_BLOCK = re.compile(r"Blocked by (?P<rail>[^.]+?) rails\.")


def _streamed_block_rail(message: str) -> str | None:
    """The rail that cut a streamed guarded generation, from the error it ended with."""
    found = _STREAM_BLOCK.search(message)
    return found["rail"] if found else None


def _is_generation_route(route: Route) -> bool:
    return isinstance(route.extra_body.get("guardrails"), Mapping)


def _generation_log(response: Response) -> Mapping[str, Any] | None:
    """The ``guardrails`` object of a guarded generation's reply, if it has one."""
    data = response.extra.get("guardrails")
    return data if isinstance(data, Mapping) else None


def _rail_latency(rail: Mapping[str, Any]) -> float:
    duration = rail.get("duration")
    if isinstance(duration, (int, float)):
        return float(duration)
    total = 0.0
    for action in rail.get("executed_actions") or ():
        if isinstance(action, Mapping) and isinstance(action.get("duration"), (int, float)):
            total += float(action["duration"])
    return total


def _generation_verdicts(guardrails: Mapping[str, Any]) -> tuple[list[Verdict], list[Verdict]]:
    """Input and output verdicts from a guarded generation's ``guardrails`` object.

    One verdict per activated input or output rail (``block`` when it
    stopped the turn); a rail named by ``output_data.triggered_input_rail`` /
    ``triggered_output_rail`` but missing from the log blocks too.
    """
    kinds: dict[str, list[Verdict]] = {"input": [], "output": []}
    log = guardrails.get("log")
    rails = log.get("activated_rails") if isinstance(log, Mapping) else None
    for rail in rails or ():
        if not isinstance(rail, Mapping) or rail.get("type") not in kinds:
            continue
        kind = str(rail["type"])
        stopped = bool(rail.get("stop"))
        kinds[kind].append(
            Verdict(
                rule=str(rail.get("name") or (INPUT_RAILS if kind == "input" else OUTPUT_RAILS)),
                decision="block" if stopped else "pass",
                plugin=STAGE,
                backend=GENERATION_BACKEND,
                latency=_rail_latency(rail),
                detail=f"{kind} blocked" if stopped else "",
            )
        )
    data = guardrails.get("output_data")
    for kind in ("input", "output"):
        triggered = data.get(f"triggered_{kind}_rail") if isinstance(data, Mapping) else None
        if not triggered:
            continue
        verdicts = kinds[kind]
        if any(v.rule == triggered and v.decision == "block" for v in verdicts):
            continue
        verdicts.append(
            Verdict(
                rule=str(triggered),
                decision="block",
                plugin=STAGE,
                backend=GENERATION_BACKEND,
                detail=f"{kind} blocked",
            )
        )
    return kinds["input"], kinds["output"]


async def _input_check(backend: Backend, *, text: str, model: str) -> Verdict | None:
    return await backend.check_input(text, model)


async def _output_check(backend: Backend, *, prompt: str, text: str, model: str) -> Verdict | None:
    return await backend.check_output(prompt, text, model)


async def _tool_call_check(
    backend: Backend, *, prompt: str, call: ToolCall, model: str
) -> Verdict | None:
    return await backend.check_tool_call(prompt, call, model)


@attrs.define
class _InputCheckers:
    """Runs the providers' input checks before the call (registered as ``guardrails.checkers``)."""

    stage: GuardrailsStage

    @hookimpl
    async def pre_input(self, turn: Turn, pipeline: Pipeline) -> Turn | Block | None:
        return await self.stage.check_input_with_providers(turn, pipeline)


@attrs.define
class _ToolCallGuard:
    """Judges proposed tool calls (registered as ``guardrails.tool_calls``).

    A separate plugin so that, with ``check_tool_calls = false``, the stage
    implements no ``on_response`` and streamed text can be released sentence
    by sentence.
    """

    stage: GuardrailsStage

    @hookimpl
    async def on_response(
        self,
        turn: Turn,
        route: Route,
        response: Response | None,
        error: ProviderError | None,
        attempt: Attempt,
        pipeline: Pipeline,
    ) -> Block | None:
        if response is None or not response.tool_calls:
            return None
        return await self.stage.check_tool_calls(turn, response.tool_calls, pipeline)


@attrs.define
class _GenerationGuard:
    """Sends model calls through the NeMo Guardrails server and reads its rails' log.

    Registered as ``guardrails.generation`` with ``approach = "generation"``.
    """

    stage: GuardrailsStage

    @hookimpl(trylast=True)
    def before_call(
        self, turn: Turn, route: Route, attempt: Attempt, pipeline: Pipeline
    ) -> Route | None:
        return self.stage.generation_route(route, attempt)

    @hookimpl
    async def on_response(
        self,
        turn: Turn,
        route: Route,
        response: Response | None,
        error: ProviderError | None,
        attempt: Attempt,
        pipeline: Pipeline,
    ) -> Block | Retry | None:
        return await self.stage.judge_generation(turn, route, response, error, pipeline)


def create_plugin() -> GuardrailsStage:
    """The stage object registered as ``guardrails`` (one per pipeline)."""
    return GuardrailsStage()


# --------------------------------------------------------------------------
# Demo
# --------------------------------------------------------------------------


def demo_guardrails(base_url: str, model: str = "smollm2") -> None:
    """Show a blocked input and a blocked output on a local model, offline.

    Uses the ``guardrails`` stage with no remote backend and the regex
    ``pii_redactor`` as its provider (``action = "block"``), so the verdicts
    are deterministic even on a 135M model: the first input carries a card
    number and is blocked before the model is called; the second asks for a
    phone number spelled out in words, and the output check blocks the answer
    that writes it in digits.  Prints each turn's text, the block, the number
    of model calls and the verdicts.
    """
    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline
    from nimpipe.types import Route

    config = Config.from_dict(
        {
            "stages": {
                STAGE: {"backends": [], "input_mode": "sequential"},
                "pii_redactor": {"action": "block"},
            }
        },
        env={},
    ).with_routes(Route(name="local", base_url=base_url, model=model), default="local")
    turns = [
        ("blocked input", "My card is 4111 1111 1111 1111, is it still valid?"),
        (
            "blocked output",
            "The support phone number is one eight hundred, five five five, "
            "nine seven three two. Write it with digits.",
        ),
    ]
    with Pipeline.create(config, entrypoints=False) as pipeline:
        stage = pipeline.plugins.pm.get_plugin(STAGE)
        assert isinstance(stage, GuardrailsStage)
        for title, prompt in turns:
            params = {"temperature": 0.0, "max_tokens": 40}
            turn = Turn(messages=[Message.user(prompt)], params=params)
            result = pipeline.run(turn)
            print(f"--- {title}: {prompt}")
            print(f"    answer : {result.text}")
            if result.blocked is not None:
                print(f"    blocked: rule {result.blocked.rule!r}: {result.blocked.reason}")
            calls = len(result.records)
            print(f"    model calls: {calls}")
            for verdict in stage.verdicts(turn.id):
                print(
                    f"    verdict: {verdict.rule} {verdict.decision} "
                    f"({verdict.plugin}/{verdict.backend}, {verdict.latency * 1000:.1f} ms)"
                )
