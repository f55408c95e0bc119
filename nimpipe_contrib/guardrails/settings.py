"""The ``[stages.guardrails]`` table: every setting, its default and its check, declared once.

:class:`GuardrailsSettings` is what the stage runs on; ``docs/guardrails.md``
explains each setting (a test checks that every key of :data:`KEYS` is
documented there).  A bad value is a :class:`~nimpipe.errors.ConfigError`
naming ``stages.guardrails.KEY``.  Reading a table starts nothing: no
backend is built until :meth:`GuardrailsSettings.build_backends`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from nimpipe.errors import ConfigError
from nimpipe.stage import register_secret
from nimpipe_contrib.guardrails.backends.base import NEMO_REFUSAL, Backend
from nimpipe_contrib.guardrails.backends.inprocess import (
    InProcessBackend,
    missing_nemoguardrails_message,
    nemoguardrails_available,
)
from nimpipe_contrib.guardrails.backends.microservice import MicroserviceBackend
from nimpipe_contrib.guardrails.backends.nemoguard import (
    ContentSafetyBackend,
    JailbreakBackend,
    TopicControlBackend,
)

if TYPE_CHECKING:
    from nimpipe.config import Config

__all__ = [
    "APPROACHES",
    "BACKEND_NAMES",
    "INPUT_MODES",
    "KEYS",
    "STAGE",
    "GuardrailsSettings",
]

#: The stage's name (``[stages.guardrails]``, ``Block.plugin``, ``Verdict.plugin``).
STAGE = "guardrails"

#: Values of ``approach``: rails-only checks around the call, or the call made through the server.
APPROACHES = ("checks", "generation")

#: Values of ``input_mode``.
INPUT_MODES = ("concurrent", "sequential")

#: Backend names accepted in ``backends``.
BACKEND_NAMES = ("microservice", "inprocess", "content_safety", "topic_control", "jailbreak")

#: Every key of the table (the NIM safety services each have a table of their own).
KEYS = frozenset(
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
    #: Judge the user's input.
    check_input: bool = True
    #: Judge the answer before it is released.
    check_output: bool = True
    #: Judge every tool call the model proposes.
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
        unknown = sorted(set(table) - KEYS)
        if unknown:
            raise reader.fail(unknown[0], f"unknown setting (known: {', '.join(sorted(KEYS))})")
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
            ("input_mode", INPUT_MODES),
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


@attrs.frozen
class _Reader:
    """Reads one value of the table, strictly (``true``/``false`` only, never ``"yes"``)."""

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
