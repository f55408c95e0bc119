"""Plugin registration, discovery and hook dispatch.

Plugins come from three places, each registered under a short stable name:

- built-in stages (``default_route``), always present unless disabled;
- contrib stages from :mod:`nimpipe_contrib`, enabled by name in the config;
- packages that declare an entry point in the group ``nimpipe``, loaded
  lazily and once per pipeline.  ``NIMPIPE_LOAD_PLUGINS`` (comma-separated
  entry-point names; empty for none) chooses which load and
  ``NIMPIPE_DISABLE_PLUGINS`` blocks names of any kind.

The pipeline hooks are dispatched here rather than through ``pm.hook`` so
that coroutines returned by implementations are awaited and a failing
implementation is named in the error.  ``NIMPIPE_TRACE=1`` logs every hook
call with its plugin, result and duration on the ``nimpipe.trace`` logger
(and to stderr when logging is not configured).
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from nimpipe import hookspecs as _hookspecs
from nimpipe._markers import PROJECT_NAME
from nimpipe.errors import (
    BlockedError,
    CancelledError,
    ConfigError,
    DeadlineExceededError,
    HookError,
    OfflineError,
    PluginLoadError,
    ProviderError,
)

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from nimpipe.config import Config

__all__ = [
    "BUILTIN_COMMANDS",
    "BUILTIN_STAGES",
    "CONTRIB_STAGES",
    "PluginInfo",
    "PluginStatus",
    "Plugins",
    "check_stages",
    "plugin_statuses",
    "unknown_stage_error",
]

#: Built-in stages: short name -> module.  Registered in every pipeline.
BUILTIN_STAGES: Mapping[str, str] = {
    "default_route": "nimpipe.default_route",
}

#: Contrib stages: short name -> module.  Registered when enabled in the config.
CONTRIB_STAGES: Mapping[str, str] = {
    "nim_catalog": "nimpipe_contrib.nim.catalog",
    "nim_health": "nimpipe_contrib.nim.health",
    "ledger": "nimpipe_contrib.cost.ledger",
    "budget": "nimpipe_contrib.cost.budget",
    "router": "nimpipe_contrib.routing.router",
    "cascade": "nimpipe_contrib.routing.cascade",
    "guardrails": "nimpipe_contrib.guardrails.stage",
    "pii_redactor": "nimpipe_contrib.guardrails.pii",
}

#: Built-in command modules: short name -> module implementing ``register_commands``.
#: Asked for their ``nimpipe`` subcommands when the command line starts (those installed).
BUILTIN_COMMANDS: Mapping[str, str] = {
    "nim_commands": "nimpipe_contrib.nim.commands",
    "cost_commands": "nimpipe_contrib.cost.commands",
    "demo": "nimpipe_contrib.demo",
}

#: The module whose ``SETTINGS_READERS`` reads each contrib stage's table on its own
#: (see :func:`nimpipe.settings.check_stage_settings`).
CONTRIB_SETTINGS_READERS = "nimpipe_contrib._settings"

#: Hooks nimpipe dispatches itself; wrappers are refused on them.
PIPELINE_HOOKS = frozenset(
    {
        "configure",
        "unconfigure",
        "pre_input",
        "filter_routes",
        "select_provider",
        "before_call",
        "on_response",
        "post_output",
        "record_cost",
    }
)

#: Exceptions a hook may raise on purpose; they reach the caller unwrapped.  A
#: ``ConfigError`` (a stage's settings reader in ``configure``) already names the
#: file and the key, which is what the user has to fix.
_PASS_THROUGH = (
    BlockedError,
    CancelledError,
    ConfigError,
    DeadlineExceededError,
    OfflineError,
    ProviderError,
)

trace_log = logging.getLogger("nimpipe.trace")

Resolver = Callable[[Any], Awaitable[Any]]

#: Capabilities a plugin declares with an attribute of the same name, read when
#: the pipeline runs a turn; each with the hooks whose implementation implies it
#: when the plugin does not say:
#:
#: - ``holds_output``: streamed output is held back until this plugin has
#:   judged it (implied by ``post_output`` and ``on_response``);
#: - ``judges_answers``: after seeing an answer this plugin may retry, escalate
#:   or block it, so none of it may be released before (implied by
#:   ``on_response``); without it, held output can be released sentence by
#:   sentence.
CAPABILITIES: dict[str, frozenset[str]] = {
    "holds_output": frozenset({"post_output", "on_response"}),
    "judges_answers": frozenset({"on_response"}),
}


@attrs.frozen
class PluginInfo:
    """What ``nimpipe plugins`` shows about one plugin."""

    name: str
    version: str
    kind: str  # "builtin", "contrib", "entrypoint" or "local"
    hooks: tuple[str, ...]
    module: str


@attrs.frozen
class PluginStatus:
    """What ``nimpipe plugins --all`` shows about a plugin that is registered, or could be."""

    name: str
    kind: str  # "builtin", "contrib", "entrypoint" or "local"
    module: str
    #: Whether it is registered in the pipeline.
    active: bool
    #: How it was turned on, or how to turn it on (or why it is off).
    how: str
    version: str = ""
    #: The hooks it implements (known for active plugins only: others are not imported).
    hooks: tuple[str, ...] = ()


@attrs.frozen
class _Impl:
    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]


@attrs.define
class Plugins:
    """The plugins of one pipeline and the dispatch of their hooks.

    Thread-safe: registration takes a lock and replaces the immutable dispatch
    tables that hook calls read.
    """

    pm: pluggy.PluginManager = attrs.field(factory=lambda: _new_manager())
    #: Log every hook call (``NIMPIPE_TRACE=1``).
    trace: bool = False
    _kinds: dict[str, tuple[str, str]] = attrs.field(factory=dict, init=False)
    _table: dict[str, tuple[_Impl, ...]] = attrs.field(factory=dict, init=False)
    _capabilities: dict[str, bool] = attrs.field(factory=dict, init=False)
    _lock: threading.RLock = attrs.field(factory=threading.RLock, init=False)
    _blocked: set[str] = attrs.field(factory=set, init=False)
    #: Plugins left out, by name, with the reason (e.g. offline mode).
    skipped: dict[str, str] = attrs.field(factory=dict, init=False)

    # ------------------------------------------------------------------
    # registration
    # ------------------------------------------------------------------

    def register(
        self, plugin: Any, name: str | None = None, *, kind: str = "local", version: str = ""
    ) -> str:
        """Register a plugin (module, class instance or class) under ``name``.

        Returns the name used.  Raises :class:`PluginLoadError` if the name is
        taken, the plugin implements an unknown hook, or it puts a wrapper on
        a pipeline hook.
        """
        with self._lock:
            plugin_name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
            if plugin_name in self._blocked:
                return plugin_name
            try:
                registered = self.pm.register(plugin, plugin_name)
            except ValueError as exc:
                raise PluginLoadError(str(exc), plugin=plugin_name) from exc
            except pluggy.PluginValidationError as exc:
                raise PluginLoadError(
                    f"plugin {plugin_name!r} is invalid: {exc}", plugin=plugin_name
                ) from exc
            assert registered is not None
            try:
                self._refuse_wrappers(plugin, registered)
            except PluginLoadError:
                self.pm.unregister(plugin)
                raise
            self._kinds[registered] = (kind, version)
            self._table.clear()
            self._capabilities.clear()
            return registered

    def _refuse_wrappers(self, plugin: Any, name: str) -> None:
        for hook_name in PIPELINE_HOOKS:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper):
                    raise PluginLoadError(
                        f"plugin {name!r} wraps pipeline hook {hook_name!r}; "
                        "nimpipe dispatches pipeline hooks itself, order stages "
                        "with tryfirst/trylast instead",
                        plugin=name,
                    )

    def unregister(self, name: str) -> None:
        """Remove the plugin registered under ``name`` (no error if absent)."""
        with self._lock:
            plugin = self.pm.get_plugin(name)
            if plugin is not None:
                self.pm.unregister(plugin, name)
            self._kinds.pop(name, None)
            self._table.clear()
            self._capabilities.clear()

    def block(self, names: Iterable[str]) -> None:
        """Block plugins by name: already registered ones are removed, later ones skipped."""
        with self._lock:
            for name in names:
                self._blocked.add(name)
                self.unregister(name)
                self.pm.set_blocked(name)

    def register_module(self, name: str, module_path: str, *, kind: str) -> None:
        """Import ``module_path`` and register it under ``name``.

        A stage module that keeps state per pipeline defines
        ``create_plugin()``; the object it returns is registered instead of
        the module, so two pipelines never share a stage's state.
        """
        if name in self._blocked or self.pm.get_plugin(name) is not None:
            return
        try:
            module = importlib.import_module(module_path)
        except ImportError as exc:
            raise PluginLoadError(
                f"cannot import stage {name!r} ({module_path}): {exc}", plugin=name
            ) from exc
        from nimpipe import __version__

        factory = getattr(module, "create_plugin", None)
        plugin = factory() if callable(factory) else module
        self.register(plugin, name, kind=kind, version=__version__)

    def load_entrypoints(self, only: Iterable[str] | None = None) -> list[str]:
        """Load plugins from the ``nimpipe`` entry-point group; returns the names loaded.

        ``only`` restricts loading to those entry-point names.
        """
        from importlib.metadata import entry_points

        wanted = set(only) if only is not None else None
        loaded = []
        for ep in entry_points(group=PROJECT_NAME):
            if wanted is not None and ep.name not in wanted:
                continue
            if ep.name in self._blocked or self.pm.get_plugin(ep.name) is not None:
                continue
            plugin = self._load_entrypoint(ep)
            version = ep.dist.version if ep.dist is not None else ""
            self.register(plugin, ep.name, kind="entrypoint", version=version)
            loaded.append(ep.name)
        if wanted:
            missing = wanted - set(loaded) - self._blocked
            missing -= {n for n in missing if self.pm.get_plugin(n) is not None}
            if missing:
                raise PluginLoadError(
                    f"NIMPIPE_LOAD_PLUGINS names plugins that are not installed: "
                    f"{', '.join(sorted(missing))}",
                    plugin=sorted(missing)[0],
                )
        return loaded

    @staticmethod
    def _load_entrypoint(ep: EntryPoint) -> Any:
        try:
            return ep.load()
        except Exception as exc:
            raise PluginLoadError(
                f"cannot load plugin {ep.name!r} from {ep.value}: {type(exc).__name__}: {exc}",
                plugin=ep.name,
            ) from exc

    def info(self) -> list[PluginInfo]:
        """Every registered plugin with its version and the hooks it implements."""
        out = []
        for name, plugin in sorted(self.pm.list_name_plugin()):
            if plugin is None:
                continue
            hooks = sorted(
                caller.name
                for caller in self.pm.get_hookcallers(plugin) or []
                if caller.name != "addhooks"
            )
            kind, version = self._kinds.get(name, ("local", ""))
            module = getattr(plugin, "__name__", None) or type(plugin).__module__
            out.append(PluginInfo(name, version, kind, tuple(hooks), module))
        return out

    def has_impls(self, hook_name: str) -> bool:
        """Whether any plugin implements ``hook_name``."""
        return bool(self._impls(hook_name))

    def declares(self, capability: str) -> bool:
        """Whether any registered plugin declares ``capability`` (see :data:`CAPABILITIES`).

        A plugin declares it with a class or module attribute of that name; one
        that says nothing is given the default its hooks imply.
        """
        cached = self._capabilities.get(capability)
        if cached is None:
            implied = CAPABILITIES[capability]
            cached = False
            # (Not pm.get_plugins(): it builds a set, and stages need not be hashable.)
            for _, plugin in self.pm.list_name_plugin():
                if plugin is None:
                    continue
                declared = getattr(plugin, capability, None)
                if declared is None:
                    declared = any(
                        caller.name in implied for caller in self.pm.get_hookcallers(plugin) or []
                    )
                cached = cached or bool(declared)
            self._capabilities[capability] = cached
        return cached

    def impl_names(self, hook_name: str) -> tuple[str, ...]:
        """Plugin names implementing ``hook_name``, in call order."""
        return tuple(i.plugin for i in self._impls(hook_name))

    # ------------------------------------------------------------------
    # dispatch
    # ------------------------------------------------------------------

    def _impls(self, hook_name: str) -> tuple[_Impl, ...]:
        table = self._table
        impls = table.get(hook_name)
        if impls is None:
            with self._lock:
                caller = getattr(self.pm.hook, hook_name, None)
                if caller is None:
                    raise AttributeError(f"no hook named {hook_name!r}")
                impls = tuple(
                    _Impl(i.plugin_name, i.function, tuple(i.argnames))
                    for i in reversed(caller.get_hookimpls())
                )
                table[hook_name] = impls
        return impls

    def _failed(self, hook: str, impl: _Impl, exc: BaseException) -> BaseException:
        if isinstance(exc, _PASS_THROUGH):
            return exc
        error = HookError(plugin=impl.plugin, hook=hook, cause=exc)
        error.__cause__ = exc
        return error

    def _trace(self, hook: str, impl: _Impl, start: float, result: Any) -> None:
        elapsed = (time.perf_counter() - start) * 1e6
        shown = type(result).__name__ if result is not None else "None"
        msg = f"hook {hook} -> {impl.plugin}: {shown} ({elapsed:.0f} us)"
        if trace_log.hasHandlers():
            trace_log.info(msg)
        else:
            print(f"[nimpipe] {msg}", file=sys.stderr)

    async def _invoke(
        self, hook: str, impl: _Impl, kwargs: Mapping[str, Any], resolve: Resolver
    ) -> Any:
        import asyncio  # (here, not at the top: ``nimpipe --help`` imports this module)
        import inspect

        start = time.perf_counter() if self.trace else 0.0
        try:
            result = impl.function(*[kwargs[a] for a in impl.argnames])
            if result is not None and inspect.isawaitable(result):
                result = await resolve(result)
        except (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError):
            raise
        except BaseException as exc:
            raise self._failed(hook, impl, exc) from exc
        if self.trace:
            self._trace(hook, impl, start, result)
        return result

    async def collect(self, hook: str, resolve: Resolver, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation; returns ``(plugin, result)`` for non-None results."""
        out = []
        for impl in self._impls(hook):
            result = await self._invoke(hook, impl, kwargs, resolve)
            if result is not None:
                out.append((impl.plugin, result))
        return out

    async def first(self, hook: str, resolve: Resolver, **kwargs: Any) -> tuple[str, Any] | None:
        """Call implementations until one returns non-None; returns ``(plugin, result)``."""
        for impl in self._impls(hook):
            result = await self._invoke(hook, impl, kwargs, resolve)
            if result is not None:
                return impl.plugin, result
        return None

    async def chain(
        self,
        hook: str,
        resolve: Resolver,
        value_arg: str,
        value: Any,
        step: Callable[[str, Any, Any], tuple[Any, bool]],
        **kwargs: Any,
    ) -> Any:
        """Call implementations in turn, each seeing the value the previous one left.

        ``step(plugin, result, value)`` interprets one result and returns the
        new value and whether to stop.
        """
        for impl in self._impls(hook):
            kwargs[value_arg] = value
            result = await self._invoke(hook, impl, kwargs, resolve)
            if result is None:
                continue
            value, stop = step(impl.plugin, result, value)
            if stop:
                break
        return value

    # Generic entry points for plugin-declared hooks.

    def call(self, hook: str, **kwargs: Any) -> Any:
        """Call any hook synchronously, honouring the spec's ``firstresult``.

        Coroutines returned by implementations run on the calling thread's
        private event loop.  Returns the first result, or the list of
        non-None results.
        """
        from nimpipe._sync import drive, resolve_blocking

        return drive(self._call(hook, resolve_blocking, kwargs))

    async def acall(self, hook: str, **kwargs: Any) -> Any:
        """Like :meth:`call`, awaiting coroutine results on the running loop."""
        from nimpipe._sync import resolve_async

        return await self._call(hook, resolve_async, kwargs)

    async def _call(self, hook: str, resolve: Resolver, kwargs: dict[str, Any]) -> Any:
        caller = getattr(self.pm.hook, hook, None)
        if caller is None:
            raise AttributeError(f"no hook named {hook!r}")
        spec = caller.spec
        if spec is not None and spec.opts.get("firstresult"):
            found = await self.first(hook, resolve, **kwargs)
            return found[1] if found else None
        return [result for _, result in await self.collect(hook, resolve, **kwargs)]


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(_hookspecs)
    # Historic: every plugin registered from now on gets ``addhooks`` called.
    pm.hook.addhooks.call_historic(kwargs={"pluginmanager": pm})
    return pm


# --------------------------------------------------------------------------
# Stages named by the configuration, and what could be enabled
# --------------------------------------------------------------------------


def unknown_stage_error(config: Config, name: str) -> ConfigError:
    """The error for stage ``name``, which is not a contrib stage.

    Names ``stages.NAME`` in the config file when a table names it, else
    ``NIMPIPE_STAGES`` (the only other way to name a stage).
    """
    known = ", ".join(sorted(CONTRIB_STAGES)) or "none"
    if name in config.stage_settings:
        return ConfigError(
            f"unknown stage (known: {known})", path=config.source, key=f"stages.{name}"
        )
    return ConfigError(
        f"unknown stage {name!r} (known: {known})", path="environment", key="NIMPIPE_STAGES"
    )


def check_stages(config: Config) -> None:
    """Refuse unknown stage names and bad settings of enabled stages, starting nothing.

    Every ``[stages.NAME]`` table (enabled or not) and every name in
    ``NIMPIPE_STAGES`` must name a contrib stage; the table of each enabled
    stage is read the way the stage reads it when configured (unknown keys and
    bad values are :class:`ConfigError` naming ``stages.NAME.KEY``).
    """
    from nimpipe.settings import check_stage_settings

    for name in (*config.stage_settings, *config.stages):
        if name not in CONTRIB_STAGES:
            raise unknown_stage_error(config, name)
    for name in config.stages:
        check_stage_settings(config, name)


def load_plugin_entry_points(
    only: Iterable[str] | None = None, *, skip: Iterable[str] = ()
) -> list[tuple[str, Any]]:
    """Load the installed ``nimpipe`` entry points: ``(name, plugin)`` each, registering nothing.

    ``only`` restricts loading to those names (a name that is not installed is a
    :class:`PluginLoadError`, as in :meth:`Plugins.load_entrypoints`); names in
    ``skip`` are left out.
    """
    wanted = set(only) if only is not None else None
    skipped = set(skip)
    out: list[tuple[str, Any]] = []
    for ep in _installed_entry_points():
        if ep.name in skipped or (wanted is not None and ep.name not in wanted):
            continue
        if any(name == ep.name for name, _ in out):
            continue
        out.append((ep.name, Plugins._load_entrypoint(ep)))
    if wanted:
        missing = wanted - {name for name, _ in out} - skipped
        if missing:
            raise PluginLoadError(
                f"NIMPIPE_LOAD_PLUGINS names plugins that are not installed: "
                f"{', '.join(sorted(missing))}",
                plugin=sorted(missing)[0],
            )
    return out


def _installed_entry_points() -> list[EntryPoint]:
    from importlib.metadata import entry_points

    return sorted(entry_points(group=PROJECT_NAME), key=lambda ep: ep.name)


def plugin_statuses(config: Config, plugins: Plugins) -> list[PluginStatus]:
    """Every plugin of ``plugins``, then every built-in, contrib stage and installed
    entry point that is not registered, with how to enable it.  Imports nothing."""
    active = {info.name: info for info in plugins.info()}
    out: list[PluginStatus] = []
    seen: set[str] = set()

    def add(name: str, kind: str, module: str, how: str) -> None:
        seen.add(name)
        info = active.get(name)
        if info is not None:
            out.append(
                PluginStatus(name, info.kind, info.module, True, how, info.version, info.hooks)
            )
        else:
            out.append(PluginStatus(name, kind, module, False, how))

    def off(name: str) -> str | None:
        if name in plugins.skipped:
            return f"skipped: {plugins.skipped[name]}"
        if name in plugins._blocked:
            return f"disabled by NIMPIPE_DISABLE_PLUGINS or [plugins] disable; remove {name} there"
        return None

    for name, module in BUILTIN_STAGES.items():
        why = off(name)
        add(name, "builtin", module, why or f"built in (NIMPIPE_DISABLE_PLUGINS={name} removes it)")
    for name, module in CONTRIB_STAGES.items():
        why = off(name)
        if why is None and name in active:
            why = (
                f"enabled by its [stages.{name}] table"
                if name in config.stage_settings
                else "enabled by NIMPIPE_STAGES"
            )
        elif why is None and name in config.stage_settings:
            why = (
                f"its [stages.{name}] table says enabled = false; "
                f"remove that line, or set NIMPIPE_STAGES={name}"
            )
        elif why is None:
            why = f"enable with a [stages.{name}] table in nimpipe.toml, or NIMPIPE_STAGES={name}"
        add(name, "contrib", module, why)
    for ep in _installed_entry_points():
        if ep.name in seen:
            continue
        why = off(ep.name)
        if why is None:
            why = (
                "installed, loaded"
                if ep.name in active
                else f"installed; enable with NIMPIPE_LOAD_PLUGINS={ep.name} or [plugins] load"
            )
        add(ep.name, "entrypoint", ep.value, why)
    for name, info in active.items():
        if name not in seen:
            add(name, info.kind, info.module, "registered by the program")
    return out
