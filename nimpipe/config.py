"""Configuration: one ``nimpipe.toml`` plus ``NIMPIPE_*`` environment variables.

The file is the first found of: ``./nimpipe.toml``, ``$NIMPIPE_CONFIG``, then
``$XDG_CONFIG_HOME/nimpipe/nimpipe.toml`` (``~/.config/nimpipe/nimpipe.toml``).
Environment variables override the file.  API keys are never written in the
file: a route names the environment variable that holds its key
(``api_key_env``).

With no file at all, jaato's NIM settings (``JAATO_NIM_BASE_URL``,
``JAATO_NIM_API_KEY``, ``JAATO_NIM_MODEL``, ``JAATO_NIM_CONTEXT_LENGTH``)
define a route named ``nim``, and ``NIMPIPE_BASE_URL`` / ``NIMPIPE_MODEL`` /
``NIMPIPE_API_KEY`` one named ``default``.

Example::

    default_route = "local"

    [routes.local]
    base_url = "http://127.0.0.1:8000/v1"
    model = "meta/llama-3.1-8b-instruct"
    tier = 0

    [routes.hosted]
    base_url = "https://integrate.api.nvidia.com/v1"
    model = "meta/llama-3.1-70b-instruct"
    api_key_env = "NVIDIA_API_KEY"
    tier = 1
    price = { input_per_1k = 0.00035, output_per_1k = 0.0004 }

    [stages.pii_redactor]
    # a contrib stage's table enables it; `enabled = false` turns it off
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from nimpipe.errors import ConfigError
from nimpipe.hosts import host_of, is_private_address
from nimpipe.redaction import API_KEY
from nimpipe.types import Price, Route, Secret

__all__ = ["HOSTED_NIM_URL", "Config", "find_config_file"]

#: Base URL of NVIDIA's hosted NIM API.
HOSTED_NIM_URL = "https://integrate.api.nvidia.com/v1"

ENV_SOURCE = "environment"

_TOP_KEYS = {
    "default_route",
    "max_attempts",
    "stream_policy",
    "offline",
    "trace",
    "routes",
    "plugins",
    "stages",
}
_ROUTE_KEYS = {
    "base_url",
    "model",
    "tier",
    "price",
    "self_hosted",
    "api_key_env",
    "timeout",
    "connect_timeout",
    "max_retries",
    "context_length",
    "max_output_tokens",
    "flags",
    "headers",
    "extra_body",
}
_SECRET_KEYS = {"api_key", "key", "token", "password", "secret", "authorization"}
_STREAM_POLICIES = ("buffer", "sentence")


def _user_config_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "nimpipe"


def find_config_file(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path | None:
    """The config file nimpipe would read, or ``None``.

    Raises :class:`ConfigError` if ``$NIMPIPE_CONFIG`` names a missing file.
    """
    env = os.environ if env is None else env
    local = (cwd or Path.cwd()) / "nimpipe.toml"
    if local.is_file():
        return local
    named = env.get("NIMPIPE_CONFIG")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise ConfigError("file not found", path=str(path), key="NIMPIPE_CONFIG")
        return path
    user = _user_config_dir(env) / "nimpipe.toml"
    return user if user.is_file() else None


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=str(path)) from exc


# --------------------------------------------------------------------------
# Typed field readers: each error names the source, the key and the problem.
# --------------------------------------------------------------------------


@attrs.frozen
class FieldReader:
    """Reads typed values out of ``source`` (a config file, or the environment).

    Every method takes the full key and the raw value, and raises a
    :class:`ConfigError` naming ``source``, the key and the problem.  Strings
    are accepted where numbers and booleans are, as environment variables
    give them.
    """

    #: What the values come from, shown in errors (``None``: nothing to name).
    source: str | None

    def fail(self, key: str, problem: str) -> ConfigError:
        """A :class:`ConfigError` about ``key``."""
        return ConfigError(problem, path=self.source, key=key)

    def string(self, key: str, value: Any) -> str:
        """A non-empty string, stripped."""
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def integer(self, key: str, value: Any, minimum: int | None = 0) -> int:
        """An integer of at least ``minimum`` (``None``: no bound)."""
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise self.fail(key, f"must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, value: Any, minimum: float | None = 0.0) -> float:
        """An ``int`` or ``float`` of at least ``minimum`` (``None``: no bound), as a float."""
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise self.fail(key, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"must be a number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        return float(value)

    def boolean(self, key: str, value: Any, *, blank_is_false: bool = True) -> bool:
        """``true``/``false``, or the strings ``1``/``0``, ``yes``/``no``, ``on``/``off``.

        A blank string reads as false, as an empty environment variable does,
        unless ``blank_is_false`` is false.
        """
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off") or (blank_is_false and not lowered):
                return False
        raise self.fail(key, f"must be true or false, got {value!r}")

    def names(self, key: str, value: Any) -> tuple[str, ...]:
        """Names from a list of strings or a comma-separated string; blank ones dropped."""
        if isinstance(value, str):
            return tuple(n.strip() for n in value.split(",") if n.strip())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(v.strip() for v in value if v.strip())
        raise self.fail(key, f"must be a list of names, got {value!r}")

    def table(self, key: str, value: Any) -> Mapping[str, Any]:
        """A table (any mapping)."""
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a table, got {value!r}")
        return value

    def url(self, key: str, value: Any) -> str:
        """An http(s) URL with a host, without a trailing slash."""
        url = self.string(key, value).rstrip("/")
        if not url.startswith(("http://", "https://")) or not host_of(url):
            raise self.fail(key, f"must be an http(s) URL with a host, got {value!r}")
        return url


def _refuse_secrets(reader: FieldReader, prefix: str, table: Mapping[str, Any]) -> None:
    for key, value in table.items():
        if key.lower() in _SECRET_KEYS:
            raise reader.fail(
                f"{prefix}{key}",
                "API keys are never written in config files: name the environment "
                'variable that holds it instead, e.g. api_key_env = "NVIDIA_API_KEY"',
            )
        if isinstance(value, str) and (
            value.startswith(("nvapi-", "sk-")) or API_KEY.search(value)
        ):
            raise reader.fail(
                f"{prefix}{key}",
                "looks like an API key; keys are never written in config files (use api_key_env)",
            )
        if isinstance(value, Mapping):
            _refuse_secrets(reader, f"{prefix}{key}.", value)


def _route_from_table(
    name: str, table: Mapping[str, Any], reader: FieldReader, env: Mapping[str, str]
) -> Route:
    prefix = f"routes.{name}."
    unknown = set(table) - _ROUTE_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise reader.fail(
            prefix + key, f"unknown route setting (known: {', '.join(sorted(_ROUTE_KEYS))})"
        )
    if "base_url" not in table:
        raise reader.fail(prefix + "base_url", "is required")
    if "model" not in table:
        raise reader.fail(prefix + "model", "is required")
    base_url = reader.url(prefix + "base_url", table["base_url"])
    kwargs: dict[str, Any] = {
        "name": name,
        "base_url": base_url,
        "model": reader.string(prefix + "model", table["model"]),
    }
    if "tier" in table:
        kwargs["tier"] = reader.integer(prefix + "tier", table["tier"])
    for key in ("timeout", "connect_timeout"):
        if key in table:
            kwargs[key] = reader.number(prefix + key, table[key], minimum=0.001)
    for key in ("max_retries",):
        if key in table:
            kwargs[key] = reader.integer(prefix + key, table[key])
    for key in ("context_length", "max_output_tokens"):
        if key in table:
            kwargs[key] = reader.integer(prefix + key, table[key], minimum=1)
    if "context_length" in table:
        kwargs["context_source"] = "config"
    if "price" in table:
        price = reader.table(prefix + "price", table["price"])
        extra = set(price) - {"input_per_1k", "output_per_1k"}
        if extra:
            raise reader.fail(prefix + "price." + sorted(extra)[0], "unknown price setting")
        kwargs["price"] = Price(
            input_per_1k=reader.number(prefix + "price.input_per_1k", price.get("input_per_1k", 0)),
            output_per_1k=reader.number(
                prefix + "price.output_per_1k", price.get("output_per_1k", 0)
            ),
            source="config",
        )
    if "flags" in table:
        kwargs["flags"] = reader.names(prefix + "flags", table["flags"])
    if "headers" in table:
        headers = reader.table(prefix + "headers", table["headers"])
        kwargs["headers"] = {
            str(k): reader.string(prefix + f"headers.{k}", v) for k, v in headers.items()
        }
    if "extra_body" in table:
        kwargs["extra_body"] = dict(reader.table(prefix + "extra_body", table["extra_body"]))
    if "self_hosted" in table:
        kwargs["self_hosted"] = reader.boolean(prefix + "self_hosted", table["self_hosted"])
    else:
        kwargs["self_hosted"] = bool(is_private_address(host_of(base_url)))
    key_env = table.get("api_key_env")
    if key_env is None and host_of(base_url) == host_of(HOSTED_NIM_URL):
        key_env = "NVIDIA_API_KEY"
    if key_env is not None:
        key_env = reader.string(prefix + "api_key_env", key_env)
        kwargs["api_key_env"] = key_env
        if env.get(key_env):
            kwargs["api_key"] = Secret(env[key_env])
    return Route(**kwargs)


def _env_route(
    name: str,
    env: Mapping[str, str],
    prefix: str,
    default_url: str | None,
) -> Route | None:
    base = env.get(f"{prefix}BASE_URL")
    model = env.get(f"{prefix}MODEL")
    if not base and not model:
        return None
    reader = FieldReader(ENV_SOURCE)
    if not model:
        raise reader.fail(f"{prefix}MODEL", f"must be set when {prefix}BASE_URL is set")
    url = reader.url(f"{prefix}BASE_URL", base or default_url or "")
    kwargs: dict[str, Any] = {
        "name": name,
        "base_url": url,
        "model": model.strip(),
        "self_hosted": bool(is_private_address(host_of(url))),
    }
    key_var = f"{prefix}API_KEY"
    if env.get(key_var):
        kwargs["api_key"] = Secret(env[key_var])
        kwargs["api_key_env"] = key_var
    ctx = env.get(f"{prefix}CONTEXT_LENGTH")
    if ctx:
        kwargs["context_length"] = reader.integer(f"{prefix}CONTEXT_LENGTH", ctx, minimum=1)
        kwargs["context_source"] = "environment"
    return Route(**kwargs)


@attrs.frozen(kw_only=True)
class Config:
    """The effective configuration of a pipeline."""

    #: Routes by name, in the order they were defined.
    routes: Mapping[str, Route] = attrs.field(factory=dict)
    #: The route used when no stage chooses one (``NIMPIPE_ROUTE``).
    default_route: str | None = None
    #: Model calls allowed per turn, retries and escalations included.
    max_attempts: int = 4
    #: How streamed output is released while output stages run: ``buffer`` or ``sentence``.
    stream_policy: str = "buffer"
    #: Only local and self-hosted routes may be used (``NIMPIPE_OFFLINE``).
    offline: bool = False
    #: Log every hook call (``NIMPIPE_TRACE``).
    trace: bool = False
    #: Entry-point plugins to load (``None``: all installed; ``NIMPIPE_LOAD_PLUGINS``).
    load_plugins: tuple[str, ...] | None = None
    #: Plugins never registered, by name (``NIMPIPE_DISABLE_PLUGINS``).
    disable_plugins: tuple[str, ...] = ()
    #: Contrib stages to register, by name (``NIMPIPE_STAGES`` or ``[stages.NAME]`` tables).
    stages: tuple[str, ...] = ()
    #: Per-stage settings: ``[stages.NAME]`` tables.
    stage_settings: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    #: The file this came from, if any.
    source: str | None = None

    def stage(self, name: str) -> Mapping[str, Any]:
        """The settings table of stage ``name`` (empty if none)."""
        return self.stage_settings.get(name, {})

    def route(self, name: str) -> Route:
        """The route called ``name``; raises :class:`ConfigError` if there is none."""
        try:
            return self.routes[name]
        except KeyError:
            known = ", ".join(self.routes) or "none configured"
            raise ConfigError(f"no route named {name!r} (routes: {known})", key=name) from None

    # ------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Config:
        """Read the config file (``path`` or the first found) and the environment."""
        env = os.environ if env is None else env
        if path is not None:
            file: Path | None = Path(path).expanduser()
            assert file is not None
            if not file.is_file():
                raise ConfigError("file not found", path=str(file))
        else:
            file = find_config_file(env, cwd)
        data = _load_toml(file) if file is not None else {}
        return cls.from_dict(data, env=env, source=str(file) if file else None)

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        env: Mapping[str, str] | None = None,
        source: str | None = None,
    ) -> Config:
        """Build a config from parsed TOML data plus the environment."""
        env = os.environ if env is None else env
        reader = FieldReader(source or "config")
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise reader.fail(
                sorted(unknown)[0], f"unknown setting (known: {', '.join(sorted(_TOP_KEYS))})"
            )
        _refuse_secrets(reader, "", data)

        routes: dict[str, Route] = {}
        for name, table in reader.table("routes", data.get("routes", {})).items():
            routes[name] = _route_from_table(
                name, reader.table(f"routes.{name}", table), reader, env
            )
        for name, prefix, default_url in (
            ("default", "NIMPIPE_", None),
            ("nim", "JAATO_NIM_", HOSTED_NIM_URL),
        ):
            if name not in routes:
                route = _env_route(name, env, prefix, default_url)
                if route is not None:
                    routes[name] = route

        kwargs: dict[str, Any] = {"routes": routes, "source": source}
        if "default_route" in data:
            kwargs["default_route"] = reader.string("default_route", data["default_route"])
        if "max_attempts" in data:
            kwargs["max_attempts"] = reader.integer("max_attempts", data["max_attempts"], 1)
        if "stream_policy" in data:
            kwargs["stream_policy"] = reader.string("stream_policy", data["stream_policy"])
        if "offline" in data:
            kwargs["offline"] = reader.boolean("offline", data["offline"])
        if "trace" in data:
            kwargs["trace"] = reader.boolean("trace", data["trace"])

        plugins = reader.table("plugins", data.get("plugins", {}))
        extra = set(plugins) - {"load", "disable"}
        if extra:
            raise reader.fail(
                f"plugins.{sorted(extra)[0]}", "unknown setting (known: load, disable)"
            )
        if "load" in plugins:
            kwargs["load_plugins"] = reader.names("plugins.load", plugins["load"])
        if "disable" in plugins:
            kwargs["disable_plugins"] = reader.names("plugins.disable", plugins["disable"])

        stage_settings: dict[str, Mapping[str, Any]] = {}
        enabled: list[str] = []
        for name, table in reader.table("stages", data.get("stages", {})).items():
            settings = dict(reader.table(f"stages.{name}", table))
            on = reader.boolean(f"stages.{name}.enabled", settings.pop("enabled", True))
            stage_settings[name] = settings
            if on:
                enabled.append(name)
        kwargs["stage_settings"] = stage_settings
        kwargs["stages"] = tuple(enabled)

        cls._apply_env(kwargs, env)
        config = cls(**kwargs)
        config._validate(reader)
        return config

    @staticmethod
    def _apply_env(kwargs: dict[str, Any], env: Mapping[str, str]) -> None:
        reader = FieldReader(ENV_SOURCE)
        if env.get("NIMPIPE_ROUTE"):
            kwargs["default_route"] = reader.string("NIMPIPE_ROUTE", env["NIMPIPE_ROUTE"])
        if env.get("NIMPIPE_MAX_ATTEMPTS"):
            kwargs["max_attempts"] = reader.integer(
                "NIMPIPE_MAX_ATTEMPTS", env["NIMPIPE_MAX_ATTEMPTS"], 1
            )
        if env.get("NIMPIPE_STREAM_POLICY"):
            kwargs["stream_policy"] = reader.string(
                "NIMPIPE_STREAM_POLICY", env["NIMPIPE_STREAM_POLICY"]
            )
        if "NIMPIPE_OFFLINE" in env:
            kwargs["offline"] = reader.boolean("NIMPIPE_OFFLINE", env["NIMPIPE_OFFLINE"])
        elif "JAATO_OFFLINE" in env and reader.boolean("JAATO_OFFLINE", env["JAATO_OFFLINE"]):
            kwargs["offline"] = True
        if "NIMPIPE_TRACE" in env:
            kwargs["trace"] = reader.boolean("NIMPIPE_TRACE", env["NIMPIPE_TRACE"])
        if "NIMPIPE_LOAD_PLUGINS" in env:
            kwargs["load_plugins"] = reader.names(
                "NIMPIPE_LOAD_PLUGINS", env["NIMPIPE_LOAD_PLUGINS"]
            )
        if "NIMPIPE_DISABLE_PLUGINS" in env:
            kwargs["disable_plugins"] = reader.names(
                "NIMPIPE_DISABLE_PLUGINS", env["NIMPIPE_DISABLE_PLUGINS"]
            )
        if "NIMPIPE_STAGES" in env:
            kwargs["stages"] = reader.names("NIMPIPE_STAGES", env["NIMPIPE_STAGES"])

    def _validate(self, reader: FieldReader) -> None:
        if self.stream_policy not in _STREAM_POLICIES:
            raise reader.fail(
                "stream_policy",
                f"must be one of {', '.join(_STREAM_POLICIES)}, got {self.stream_policy!r}",
            )
        if self.default_route is not None and self.default_route not in self.routes:
            known = ", ".join(self.routes) or "none configured"
            raise reader.fail(
                "default_route",
                f"names no configured route: {self.default_route!r} (routes: {known})",
            )

    # ------------------------------------------------------------------

    def with_routes(self, *routes: Route, default: str | None = None) -> Config:
        """A copy with ``routes`` added (replacing same-named ones)."""
        merged = dict(self.routes)
        for route in routes:
            merged[route.name] = route
        return attrs.evolve(self, routes=merged, default_route=default or self.default_route)

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets masked (for display)."""
        routes = {}
        for name, r in self.routes.items():
            routes[name] = {
                "base_url": r.base_url,
                "model": r.model,
                "tier": r.tier,
                "self_hosted": r.self_hosted,
                "api_key": ("***" if r.api_key else "(not set)")
                + (f" from ${r.api_key_env}" if r.api_key_env else ""),
                "timeout": r.timeout,
                "max_retries": r.max_retries,
                "context_length": r.context_length,
                "context_source": r.context_source,
                "price": attrs.asdict(r.price) if r.price else None,
                "flags": sorted(r.flags),
            }
        return {
            "source": self.source,
            "default_route": self.default_route,
            "max_attempts": self.max_attempts,
            "stream_policy": self.stream_policy,
            "offline": self.offline,
            "trace": self.trace,
            "plugins": {
                "load": list(self.load_plugins)
                if self.load_plugins is not None
                else "all installed",
                "disable": list(self.disable_plugins),
            },
            "stages": list(self.stages),
            "stage_settings": {k: dict(v) for k, v in self.stage_settings.items()},
            "routes": routes,
        }
