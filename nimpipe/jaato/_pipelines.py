"""Pipelines shared by jaato's provider instances, and the cost tally they keep.

jaato makes one provider instance per session and one per subagent, up to
four at once on threads.  Instances with the same effective configuration
share one :class:`~nimpipe.pipeline.Pipeline`: one set of stages, one HTTP
client per route and one ledger of hooks.  The cache is module-level and
lock-protected; a pipeline lives until :func:`close_pipelines`.

The configuration of an instance is, in order of precedence:

1. ``plugin_configs["nimpipe"]`` from the jaato profile (``base_url``,
   ``api_key``, ``model``, ``route``, ``context_length``,
   ``max_output_tokens``), which adjusts the route named ``nim``;
2. ``nimpipe.toml`` in the jaato workspace (else ``$NIMPIPE_CONFIG``, else
   the user's config file), which adds routes and stages;
3. the environment: ``JAATO_NIM_BASE_URL`` / ``JAATO_NIM_API_KEY`` /
   ``JAATO_NIM_MODEL`` / ``JAATO_NIM_CONTEXT_LENGTH`` define the route
   ``nim``, ``NIMPIPE_*`` variables the rest.

With no route at all, ``nim`` points at NVIDIA's hosted API with the model
jaato connects to.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe._markers import hookimpl

if TYPE_CHECKING:
    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline
    from nimpipe.types import CallRecord, Route

__all__ = [
    "NIM_ROUTE",
    "AgentCost",
    "CostTally",
    "Settings",
    "SharedPipeline",
    "active_pipelines",
    "build_config",
    "close_pipelines",
    "register_plugin",
    "shared_pipeline",
    "unregister_plugin",
]

#: The route jaato's ``JAATO_NIM_*`` settings define.
NIM_ROUTE = "nim"

#: Environment variables that shape a pipeline's configuration.
_ENV_PREFIXES = ("NIMPIPE_", "JAATO_NIM_")
_ENV_NAMES = ("JAATO_OFFLINE", "XDG_CONFIG_HOME", "HOME", "NVIDIA_API_KEY")


def _jaato_workspace() -> str | None:
    """The workspace jaato has active for this task or process, if jaato-server can tell."""
    try:
        from shared.session_context import get_workspace_root
    except ImportError:
        return None
    root = get_workspace_root()
    return str(root) if root else None


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "":
        return None
    return int(value)


@attrs.frozen(kw_only=True)
class Settings:
    """The pipeline-shaping settings jaato hands one provider instance.

    Built from jaato's ``ProviderConfig``: ``extra`` holds
    ``plugin_configs["nimpipe"]`` plus ``workspace_path``; the profile's
    ``api_key`` arrives on ``ProviderConfig.api_key``.
    """

    #: The jaato workspace (where ``nimpipe.toml`` is looked for): the
    #: session's ``workspace_path``, else the workspace jaato has active.
    workspace: str | None = None
    #: Endpoint of the route ``nim`` (``plugin_configs.nimpipe.base_url``).
    base_url: str | None = None
    #: Key of the route ``nim``; never shown in ``repr``.
    api_key: str | None = attrs.field(default=None, repr=False)
    #: Model of the route ``nim`` (default: ``JAATO_NIM_MODEL``, else jaato's model).
    model: str | None = None
    #: The route used when the model jaato asks for names none.
    route: str | None = None
    #: Context window of the route ``nim``.
    context_length: int | None = None
    #: Output cap of the route ``nim``.
    max_output_tokens: int | None = None
    #: jaato's config root (for its stored NIM credentials).
    config_root: str | None = None

    @classmethod
    def from_provider_config(cls, config: Any) -> Settings:
        """Read a jaato ``ProviderConfig`` (``None``: only the active workspace)."""
        if config is None:
            return cls(workspace=_jaato_workspace())
        extra: Mapping[str, Any] = getattr(config, "extra", None) or {}
        key = getattr(config, "api_key", None) or extra.get("api_key")
        return cls(
            workspace=extra.get("workspace_path") or _jaato_workspace(),
            base_url=extra.get("base_url") or None,
            api_key=str(key) if key else None,
            model=extra.get("model") or None,
            route=extra.get("route") or None,
            context_length=_int_or_none(extra.get("context_length")),
            max_output_tokens=_int_or_none(extra.get("max_output_tokens")),
            config_root=extra.get("config_root") or None,
        )


def _stored_nim_key(settings: Settings) -> str | None:
    """The NIM key jaato's ``nim-auth`` command stored, if jaato-server can tell."""
    try:
        from shared.plugins.model_provider.nim.env import resolve_api_key
    except ImportError:
        return None
    try:
        key = resolve_api_key(workspace_path=settings.workspace, config_root=settings.config_root)
    except Exception:  # a broken credentials file means "no stored key" here
        return None
    return str(key) if key else None


def _nim_route(config: Config, settings: Settings, model: str | None) -> Route | None:
    from nimpipe.config import HOSTED_NIM_URL
    from nimpipe.errors import ConfigError
    from nimpipe.hosts import host_of, is_private_address
    from nimpipe.types import Route, Secret

    nim = config.routes.get(NIM_ROUTE)
    if nim is None and not settings.base_url and config.routes:
        return None
    changes: dict[str, Any] = {}
    if nim is None:
        chosen = settings.model or model
        if not chosen:
            raise ConfigError(
                "no model: set JAATO_NIM_MODEL or plugin_configs.nimpipe.model",
                key="plugin_configs.nimpipe.model",
            )
        nim = Route(name=NIM_ROUTE, base_url=settings.base_url or HOSTED_NIM_URL, model=chosen)
    if settings.base_url:
        url = settings.base_url.rstrip("/")
        if not url.startswith(("http://", "https://")) or not host_of(url):
            raise ConfigError(
                f"must be an http(s) URL with a host, got {settings.base_url!r}",
                key="plugin_configs.nimpipe.base_url",
            )
        changes["base_url"] = url
    base_url = changes.get("base_url", nim.base_url)
    changes["self_hosted"] = bool(is_private_address(host_of(base_url)))
    if settings.model:
        changes["model"] = settings.model
    if settings.api_key:
        changes["api_key"] = Secret(settings.api_key)
        changes["api_key_env"] = None
    elif nim.api_key is None and not changes["self_hosted"]:
        stored = _stored_nim_key(settings)
        if stored:
            changes["api_key"] = Secret(stored)
    if settings.context_length:
        changes["context_length"] = settings.context_length
        changes["context_source"] = "jaato"
    if settings.max_output_tokens:
        changes["max_output_tokens"] = settings.max_output_tokens
    return attrs.evolve(nim, **changes)


def build_config(
    settings: Settings, model: str | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """The effective nimpipe configuration of a jaato provider instance.

    :param settings: what jaato passed the instance.
    :param model: the model jaato connects to (used when no route names one).
    :param env: the environment (default: ``os.environ``).
    """
    from nimpipe.config import Config
    from nimpipe.errors import ConfigError

    env = os.environ if env is None else env
    chosen = settings.model or model
    if env.get("JAATO_NIM_BASE_URL") and not env.get("JAATO_NIM_MODEL") and chosen:
        # jaato's own nim provider needs no JAATO_NIM_MODEL: the model jaato asks for is it.
        env = {**env, "JAATO_NIM_MODEL": chosen}
    cwd = Path(settings.workspace) if settings.workspace else None
    config = Config.load(env=env, cwd=cwd)
    nim = _nim_route(config, settings, model)
    if nim is not None:
        config = config.with_routes(nim)
    if settings.route:
        if settings.route not in config.routes:
            known = ", ".join(config.routes) or "none configured"
            raise ConfigError(
                f"names no configured route: {settings.route!r} (routes: {known})",
                key="plugin_configs.nimpipe.route",
            )
        config = attrs.evolve(config, default_route=settings.route)
    return config


# --------------------------------------------------------------------------
# The cost tally: the stage behind ``nimpipe-cost``
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class AgentCost:
    """Model calls, tokens and cost of one agent, as the tally counted them."""

    agent_id: str
    agent_type: str
    calls: int = 0
    #: Calls that failed, were cancelled or were blocked.
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    #: Whether any of the calls had a price (else ``cost_usd`` means "unknown").
    priced: bool = False


@attrs.define
class CostTally:
    """Built-in stage ``jaato_costs``: model calls, tokens and cost per agent.

    Registered in every pipeline the jaato integration builds; counts in
    memory, for this process only.  Thread-safe.
    """

    #: (agent id, agent type) -> [calls, failed, prompt, completion, cost, priced].
    _rows: dict[tuple[str, str], list[Any]] = attrs.field(factory=dict, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    @hookimpl
    def record_cost(self, record: CallRecord) -> None:
        """Add one call's tokens and cost to its agent's row."""
        key = (record.agent_id, record.agent_type)
        failed = record.outcome in ("error", "cancelled", "blocked")
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = [0, 0, 0, 0, 0.0, False]
            row[0] += 1
            row[1] += failed
            row[2] += record.prompt_tokens
            row[3] += record.completion_tokens
            row[4] += record.cost_usd
            row[5] = row[5] or record.price_source != "none"

    def summary(self) -> tuple[AgentCost, ...]:
        """One row per agent, the main agent first."""
        with self._lock:
            rows = [(key, list(row)) for key, row in self._rows.items()]
        costs = [
            AgentCost(
                agent_id=agent_id,
                agent_type=agent_type,
                calls=row[0],
                failed=row[1],
                prompt_tokens=row[2],
                completion_tokens=row[3],
                cost_usd=row[4],
                priced=row[5],
            )
            for (agent_id, agent_type), row in rows
        ]
        return tuple(sorted(costs, key=lambda r: (r.agent_type != "main", r.agent_id)))


# --------------------------------------------------------------------------
# The shared pipelines
# --------------------------------------------------------------------------


@attrs.frozen
class SharedPipeline:
    """A pipeline shared by provider instances of one configuration."""

    pipeline: Pipeline
    tally: CostTally


_lock = threading.Lock()
_cache: dict[str, SharedPipeline] = {}
_extra: dict[str, Any] = {}


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register ``plugin`` in every pipeline the jaato provider builds from now on.

    For tests and programs that embed jaato: pipelines already built keep
    their plugins, so call this before the jaato session starts (or call
    :func:`close_pipelines` first).  Returns the name used.
    """
    plugin_name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    with _lock:
        _extra[plugin_name] = plugin
    return plugin_name


def unregister_plugin(name: str) -> None:
    """Stop registering the plugin ``name`` in new pipelines (no error if absent)."""
    with _lock:
        _extra.pop(name, None)


def close_pipelines() -> None:
    """Close every shared pipeline (its stages' ``unconfigure`` runs) and forget them."""
    with _lock:
        shared = list(_cache.values())
        _cache.clear()
    for entry in shared:
        entry.pipeline.close()


def active_pipelines() -> tuple[SharedPipeline, ...]:
    """The shared pipelines of this process, most recently built first."""
    with _lock:
        return tuple(reversed(_cache.values()))


def _environment(env: Mapping[str, str], config: Config) -> dict[str, str]:
    names = {r.api_key_env for r in config.routes.values() if r.api_key_env}
    return {
        k: v for k, v in env.items() if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES or k in names
    }


def _cache_key(settings: Settings, config: Config, env: Mapping[str, str]) -> str:
    source = config.source
    try:
        stamp = os.stat(source).st_mtime_ns if source else 0
    except OSError:
        stamp = 0
    parts = {
        "config": config.masked(),
        "stamp": stamp,
        "settings": attrs.asdict(settings),
        "env": _environment(env, config),
        "plugins": [[name, id(plugin)] for name, plugin in sorted(_extra.items())],
    }
    # Hashed so that the key never holds a secret in the clear.
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def shared_pipeline(
    settings: Settings, model: str | None = None, env: Mapping[str, str] | None = None
) -> SharedPipeline:
    """The pipeline for ``settings`` and ``model``, built on first use and then shared.

    Raises :class:`~nimpipe.errors.ConfigError` or
    :class:`~nimpipe.errors.PluginLoadError` when the configuration or a
    plugin is broken.
    """
    from nimpipe.jaato._convert import JaatoWireProvider
    from nimpipe.pipeline import Pipeline

    env = os.environ if env is None else env
    config = build_config(settings, model, env)
    with _lock:
        key = _cache_key(settings, config, env)
        entry = _cache.get(key)
        if entry is not None:
            return entry
        tally = CostTally()
        plugins: list[Any] = [("jaato_costs", tally), *_extra.items()]
        pipeline = Pipeline.create(config, plugins=plugins, provider=JaatoWireProvider())
        entry = SharedPipeline(pipeline, tally)
        _cache[key] = entry
        return entry
