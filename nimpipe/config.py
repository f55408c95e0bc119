"""Configuration: one ``nimpipe.toml`` plus ``NIMPIPE_*`` environment variables.

The file is the first found of: ``./nimpipe.toml``, ``$NIMPIPE_CONFIG``, then
``$XDG_CONFIG_HOME/nimpipe/nimpipe.toml`` (``~/.config/nimpipe/nimpipe.toml``).
``NIMPIPE_CONFIG=/dev/null`` (:data:`os.devnull`) means no config file at all,
as with pip and git.  Environment variables override the file, and an error in
one names the variable.  API keys are never written in the file, anywhere in
it (nested tables and lists included): a route names the environment
variable that holds its key (``api_key_env``); an error about a key-shaped
value names its key path, never the value.

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

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from nimpipe.errors import ConfigError
from nimpipe.hosts import host_of, is_private_address
from nimpipe.redaction import scrub
from nimpipe.types import Price, Route, Secret

__all__ = ["HOSTED_NIM_URL", "Config", "find_config_file"]

#: Context window assumed for a model that neither its route nor its server sizes.
DEFAULT_CONTEXT_LENGTH = 32768
#: Base URL of NVIDIA's hosted NIM API.
HOSTED_NIM_URL = "https://integrate.api.nvidia.com/v1"

ENV_SOURCE = "environment"

_TOP_KEYS = {
    "default_route",
    "max_attempts",
    "max_retry_wait",
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
#: Keys that hold a credential, written with ``_`` for ``-`` (``X-Api-Key`` is ``x_api_key``).
_SECRET_KEYS = {
    "api_key",
    "apikey",
    "x_api_key",
    "key",
    "token",
    "access_token",
    "password",
    "passwd",
    "secret",
    "client_secret",
    "authorization",
    "proxy_authorization",
}
#: The largest integer a setting may hold (what SQLite and the SDKs can store).
_MAX_INTEGER = 2**63 - 1
#: How deep config tables and lists may nest.
_MAX_DEPTH = 32
_STREAM_POLICIES = ("buffer", "sentence")


def _user_config_dir(env: Mapping[str, str]) -> Path:
    from nimpipe.paths import config_dir

    return config_dir(env)


def _is_devnull(path: Path) -> bool:
    return path == Path(os.devnull)


def _named_file(path: Path, key: str | None) -> Path | None:
    """``path`` if it is a file to read; ``None`` for :data:`os.devnull` (no config file)."""
    if _is_devnull(path):
        return None
    if path.is_dir():
        raise ConfigError("is a directory, not a config file", path=str(path), key=key)
    if not path.exists():
        raise ConfigError("file not found", path=str(path), key=key)
    if not path.is_file():
        raise ConfigError("is not a regular file", path=str(path), key=key)
    return path


def find_config_file(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path | None:
    """The config file nimpipe would read, or ``None``.

    ``$NIMPIPE_CONFIG`` set to :data:`os.devnull` means no file, not even
    ``./nimpipe.toml``.  Raises :class:`ConfigError` if ``$NIMPIPE_CONFIG``
    names a missing file, a directory or anything else that is not a file.
    """
    env = os.environ if env is None else env
    named = env.get("NIMPIPE_CONFIG")
    if named and _is_devnull(Path(named)):
        return None
    local = (cwd or Path.cwd()) / "nimpipe.toml"
    if local.is_file():
        return local
    if named:
        return _named_file(Path(named).expanduser(), "NIMPIPE_CONFIG")
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
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "TOML files are UTF-8",
            path=str(path),
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {scrub(str(exc))}", path=str(path)) from None
    except RecursionError:
        raise ConfigError("not valid TOML: nested too deeply", path=str(path)) from None


def _shown(value: Any) -> str:
    """``value`` as an error message shows it: short, any credential in it masked."""
    text = scrub(repr(value))
    return text if len(text) <= 80 else f"{text[:77]}..."


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

    @staticmethod
    def shown(value: Any) -> str:
        """``value`` as an error message may show it: short, any credential in it masked."""
        return _shown(value)

    def string(self, key: str, value: Any) -> str:
        """A non-empty string, stripped."""
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {_shown(value)}")
        return value.strip()

    def integer(self, key: str, value: Any, minimum: int | None = 0) -> int:
        """An integer of at least ``minimum`` (``None``: no bound) and at most ``2**63 - 1``."""
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise self.fail(key, f"must be an integer, got {_shown(value)}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {_shown(value)}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {_shown(value)}")
        if abs(value) > _MAX_INTEGER:
            raise self.fail(key, f"must be at most {_MAX_INTEGER}, got {_shown(value)}")
        return value

    def number(self, key: str, value: Any, minimum: float | None = 0.0) -> float:
        """A finite ``int`` or ``float`` of at least ``minimum`` (``None``: no bound), as a float.

        ``nan`` and ``inf`` (which TOML and :func:`float` accept) are refused.
        """
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise self.fail(key, f"must be a number, got {_shown(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"must be a number, got {_shown(value)}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise self.fail(key, f"must be a finite number, got {_shown(value)}")
        if minimum is not None and number < minimum:
            raise self.fail(key, f"must be at least {minimum:g}, got {number:g}")
        return number

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
        raise self.fail(key, f"must be true or false, got {_shown(value)}")

    def names(self, key: str, value: Any) -> tuple[str, ...]:
        """Names from a list of strings or a comma-separated string; blank ones dropped."""
        if isinstance(value, str):
            return tuple(n.strip() for n in value.split(",") if n.strip())
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(v.strip() for v in value if v.strip())
        raise self.fail(key, f"must be a list of names, got {_shown(value)}")

    def table(self, key: str, value: Any) -> Mapping[str, Any]:
        """A table (any mapping)."""
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a table, got {_shown(value)}")
        return value

    def url(self, key: str, value: Any) -> str:
        """An http(s) URL with a host and no password, without a trailing slash."""
        url = self.string(key, value).rstrip("/")
        try:
            parts = urlsplit(url)
            host = parts.hostname
            if parts.port is not None and not parts.port:
                raise ValueError("port 0")
        except ValueError as exc:
            raise self.fail(key, f"is not a valid URL ({exc}): {_shown(value)}") from None
        if not url.startswith(("http://", "https://")) or not host:
            raise self.fail(key, f"must be an http(s) URL with a host, got {_shown(value)}")
        if parts.password:
            raise self.fail(
                key, "holds a password; keep credentials out of URLs (use api_key_env or headers)"
            )
        return url


def _looks_like_a_key(text: str) -> bool:
    # nimpipe.redaction defines a credential; the two prefixes catch short test keys too.
    return text.startswith(("nvapi-", "sk-")) or scrub(text) != text


def _refuse_secrets(reader: FieldReader, path: str, value: Any, depth: int = 0) -> None:
    """Refuse credentials anywhere in ``value``: by key name, or key-shaped text.

    Errors name the key path (``routes.a.flags[0]``), never the value.
    """
    if depth > _MAX_DEPTH:
        raise reader.fail(path, f"nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, str):
        if _looks_like_a_key(value):
            raise reader.fail(
                path,
                "looks like an API key; keys are never written in config files (use api_key_env)",
            )
    elif isinstance(value, Mapping):
        for key, item in value.items():
            name = str(key)
            if _looks_like_a_key(name):
                raise reader.fail(
                    f"{path}.***" if path else "***",
                    "a key name looks like an API key; keys are never written in config files",
                )
            full = f"{path}.{name}" if path else name
            if name.lower().replace("-", "_") in _SECRET_KEYS:
                raise reader.fail(
                    full,
                    "API keys are never written in config files: name the environment "
                    'variable that holds it instead, e.g. api_key_env = "NVIDIA_API_KEY"',
                )
            _refuse_secrets(reader, full, item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _refuse_secrets(reader, f"{path}[{index}]", item, depth + 1)


def _stream_policy(reader: FieldReader, key: str, value: Any) -> str:
    policy = reader.string(key, value)
    if policy not in _STREAM_POLICIES:
        raise reader.fail(
            key, f"must be one of {', '.join(_STREAM_POLICIES)}, got {_shown(policy)}"
        )
    return policy


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
    #: The longest wait before a retry, in seconds: a ``Retry-After`` beyond it
    #: is not waited for (the typed error, with its ``retry_after``, is raised).
    max_retry_wait: float = 30.0
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
        """Read the config file (``path`` or the first found) and the environment.

        ``path`` set to :data:`os.devnull` reads no file.
        """
        env = os.environ if env is None else env
        if path is not None:
            file = _named_file(Path(path).expanduser(), None)
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
        #: Where each checked-later setting came from: (reader, key) for its errors.
        origins: dict[str, tuple[FieldReader, str]] = {}
        if "default_route" in data:
            origins["default_route"] = (reader, "default_route")
            kwargs["default_route"] = reader.string("default_route", data["default_route"])
        if "max_attempts" in data:
            kwargs["max_attempts"] = reader.integer("max_attempts", data["max_attempts"], 1)
        if "max_retry_wait" in data:
            kwargs["max_retry_wait"] = reader.number("max_retry_wait", data["max_retry_wait"])
        if "stream_policy" in data:
            kwargs["stream_policy"] = _stream_policy(reader, "stream_policy", data["stream_policy"])
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

        cls._apply_env(kwargs, env, origins)
        config = cls(**kwargs)
        config._validate(origins)
        return config

    @staticmethod
    def _apply_env(
        kwargs: dict[str, Any], env: Mapping[str, str], origins: dict[str, tuple[FieldReader, str]]
    ) -> None:
        """Override ``kwargs`` from ``env``; every error names the variable."""
        reader = FieldReader(ENV_SOURCE)
        if env.get("NIMPIPE_ROUTE"):
            kwargs["default_route"] = reader.string("NIMPIPE_ROUTE", env["NIMPIPE_ROUTE"])
            origins["default_route"] = (reader, "NIMPIPE_ROUTE")
        if env.get("NIMPIPE_MAX_ATTEMPTS"):
            kwargs["max_attempts"] = reader.integer(
                "NIMPIPE_MAX_ATTEMPTS", env["NIMPIPE_MAX_ATTEMPTS"], 1
            )
        if env.get("NIMPIPE_MAX_RETRY_WAIT"):
            kwargs["max_retry_wait"] = reader.number(
                "NIMPIPE_MAX_RETRY_WAIT", env["NIMPIPE_MAX_RETRY_WAIT"]
            )
        if env.get("NIMPIPE_STREAM_POLICY"):
            kwargs["stream_policy"] = _stream_policy(
                reader, "NIMPIPE_STREAM_POLICY", env["NIMPIPE_STREAM_POLICY"]
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

    def _validate(self, origins: Mapping[str, tuple[FieldReader, str]]) -> None:
        if self.default_route is not None and self.default_route not in self.routes:
            reader, key = origins["default_route"]
            known = ", ".join(self.routes) or "none configured"
            raise reader.fail(
                key, f"names no configured route: {_shown(self.default_route)} (routes: {known})"
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
            "max_retry_wait": self.max_retry_wait,
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
