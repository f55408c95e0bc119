"""Contrib stage ``nim_catalog``: the models of every NIM endpoint, and their context windows.

Enable it with a ``[stages.nim_catalog]`` table (all settings optional)::

    [stages.nim_catalog]
    ttl = 3600                 # seconds a fetched catalog counts as fresh
    timeout = 5                # seconds per /v1/models request
    cache_dir = "~/.cache/nimpipe/catalog"   # default: <nimpipe home>/catalog
    overrides = "~/.config/nimpipe/models.toml"
    default_context_length = 32768
    refresh_on_start = true    # fetch stale catalogs in the background at start
    fetch_hosted = true        # also fetch the hosted catalog (never when offline)

What it does:

- lists the models of every configured endpoint through ``GET /v1/models``
  (``id``, ``owned_by``, ``root``, ``parent`` (the base of a LoRA adapter)
  and ``max_model_len``), hosted and self-hosted;
- gives every route a context window and says where it came from
  (``Route.context_source``): a route's own ``context_length`` (``config`` or
  ``environment``) is never touched; otherwise the user override file
  (``override``) wins, then the server's ``max_model_len`` (``server``), then
  the versioned snapshot shipped in ``nimpipe/data/nim_models.json``
  (``snapshot``).  :meth:`NimCatalog.context_length` answers ``default`` (the
  ``default_context_length`` setting) when none of them knows the model;
  routes are left as they are then;
- caches each endpoint's catalog in memory and on disk (one JSON file per
  endpoint under ``cache_dir``) with a TTL, so a later start works offline
  from the last answer;
- when a turn asks for a model that no route serves (``turn.model``), finds
  the endpoint that serves it in the cached catalogs (no request on the
  turn's path) and adds a route ``MODEL@ROUTE`` for it.

Network requests happen only in a background thread started by
``configure`` (fetching stale catalogs once) and in the blocking calls
:meth:`NimCatalog.models` / :meth:`NimCatalog.refresh` that the ``nimpipe
models`` command and jaato's ``list_models()`` / ``nim-models`` use.  With
the ``nim_health`` stage enabled, every health probe's ``/v1/models`` answer
also refreshes the catalog (:meth:`NimCatalog.observe`), at no extra request.

The override file (TOML)::

    [models."meta/llama-3.1-8b-instruct"]
    context_length = 65536
    capabilities = ["chat", "tools"]
    price = { input_per_1k = 0.0002, output_per_1k = 0.0002 }
    note = "our containers run with NIM_MAX_MODEL_LEN=65536"
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe._markers import hookimpl, hookspec
from nimpipe.errors import ConfigError
from nimpipe.types import Attempt, Price, Route, Turn
from nimpipe_contrib._nim import (
    Endpoint,
    ModelCard,
    cards_from_dicts,
    endpoint_url,
    endpoints_of,
    format_error,
    parse_model_list,
)
from nimpipe_contrib._settings import StageSettings

if TYPE_CHECKING:
    import argparse

    import httpx
    import pluggy

    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline

__all__ = [
    "DEFAULT_CONTEXT_LENGTH",
    "STAGE_NAME",
    "CatalogSettings",
    "EndpointCatalog",
    "KnownModel",
    "ModelInfo",
    "NimCatalog",
    "Snapshot",
    "create_plugin",
    "load_overrides",
    "load_snapshot",
    "run_models_command",
]

#: The stage's name in ``CONTRIB_STAGES`` and ``[stages.NAME]``.
STAGE_NAME = "nim_catalog"

#: Context window reported for a model nothing knows about (source ``default``).
DEFAULT_CONTEXT_LENGTH = 32768

#: Context sources a route brings itself; the catalog never replaces them.
_ROUTE_OWN_SOURCES = frozenset({"config", "environment"})

#: Version of the disk cache's file format.
_CACHE_FORMAT = 1

log = logging.getLogger("nimpipe.catalog")


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


def _user_config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME")
    if base and os.path.isabs(base):
        return Path(base) / "nimpipe"
    return Path.home() / ".config" / "nimpipe"


@attrs.frozen(kw_only=True)
class CatalogSettings:
    """The ``[stages.nim_catalog]`` settings."""

    #: Seconds a fetched catalog counts as fresh.
    ttl: float = 3600.0
    #: Seconds allowed for one ``/v1/models`` request.
    timeout: float = 5.0
    #: Directory of the disk cache (default: ``<nimpipe home>/catalog``).
    cache_dir: Path | None = None
    #: The user override file (default: ``~/.config/nimpipe/models.toml``, if it exists).
    overrides: Path | None = None
    #: Whether ``overrides`` was named explicitly (then it must exist).
    overrides_named: bool = False
    #: Context window answered for models nothing knows about.
    default_context_length: int = DEFAULT_CONTEXT_LENGTH
    #: Fetch stale catalogs in a background thread when the pipeline starts.
    refresh_on_start: bool = True
    #: Also fetch the catalogs of hosted (not self-hosted) endpoints.
    fetch_hosted: bool = True

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str | None = None) -> CatalogSettings:
        """Read and validate a ``[stages.nim_catalog]`` table."""
        reader = StageSettings(STAGE_NAME, table, source, f"stages.{STAGE_NAME}")
        reader.only(
            (
                "ttl",
                "timeout",
                "cache_dir",
                "overrides",
                "default_context_length",
                "refresh_on_start",
                "fetch_hosted",
            )
        )
        overrides = reader.string("overrides", None)
        cache_dir = reader.string("cache_dir", None)
        return cls(
            ttl=reader.number("ttl", 3600.0),
            timeout=reader.number("timeout", 5.0, minimum=0.001),
            cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
            overrides=Path(overrides).expanduser() if overrides else None,
            overrides_named=overrides is not None,
            default_context_length=reader.integer(
                "default_context_length", DEFAULT_CONTEXT_LENGTH, minimum=1
            ),
            refresh_on_start=reader.boolean("refresh_on_start", True),
            fetch_hosted=reader.boolean("fetch_hosted", True),
        )

    def cache_directory(self) -> Path:
        """Where the disk cache lives."""
        if self.cache_dir is not None:
            return self.cache_dir
        from nimpipe.paths import nimpipe_home

        return nimpipe_home() / "catalog"

    def overrides_path(self) -> Path:
        """The override file to read (it may not exist unless named explicitly)."""
        return self.overrides if self.overrides is not None else _user_config_dir() / "models.toml"


# --------------------------------------------------------------------------
# What is known without asking a server: the snapshot and the override file
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class KnownModel:
    """A model's entry in the shipped snapshot or the user's override file."""

    id: str
    context_length: int | None = None
    capabilities: tuple[str, ...] = ()
    price: Price | None = None
    #: Where the figure comes from, in words (a model card, the user's note).
    note: str = ""
    #: ``snapshot`` or ``override``.
    origin: str = "snapshot"


@attrs.frozen
class Snapshot:
    """The versioned snapshot of known NIM models shipped with nimpipe."""

    version: str
    models: Mapping[str, KnownModel] = attrs.field(hash=False)


def _known_model(model_id: str, entry: Any, origin: str, where: str, fail: Any) -> KnownModel:
    if not isinstance(entry, Mapping):
        raise fail(f"models.{model_id}", "must be a table")
    allowed = {"context_length", "capabilities", "price", "source", "note"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise fail(
            f"models.{model_id}.{unknown[0]}",
            f"unknown model setting (known: {', '.join(sorted(allowed))})",
        )
    context = entry.get("context_length")
    if context is not None and (
        isinstance(context, bool) or not isinstance(context, int) or context < 1
    ):
        raise fail(f"models.{model_id}.context_length", f"must be a positive integer: {context!r}")
    capabilities = entry.get("capabilities", [])
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        raise fail(f"models.{model_id}.capabilities", "must be a list of strings")
    price = None
    if "price" in entry:
        raw = entry["price"]
        if not isinstance(raw, Mapping) or set(raw) - {"input_per_1k", "output_per_1k"}:
            raise fail(
                f"models.{model_id}.price", "must be a table of input_per_1k and output_per_1k"
            )
        values = [raw.get(k, 0) for k in ("input_per_1k", "output_per_1k")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise fail(f"models.{model_id}.price", "prices must be numbers (USD per 1,000 tokens)")
        price = Price(input_per_1k=float(values[0]), output_per_1k=float(values[1]), source=origin)
    note = entry.get("source", entry.get("note", ""))
    return KnownModel(
        id=model_id,
        context_length=context,
        capabilities=tuple(capabilities),
        price=price,
        note=str(note) or where,
        origin=origin,
    )


@functools.lru_cache(maxsize=1)
def load_snapshot() -> Snapshot:
    """The snapshot shipped as ``nimpipe/data/nim_models.json`` (read once per process)."""
    from importlib import resources

    text = resources.files("nimpipe").joinpath("data/nim_models.json").read_text("utf-8")
    data = json.loads(text)

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(problem, path="nimpipe/data/nim_models.json", key=key)

    models = {
        model_id: _known_model(model_id, entry, "snapshot", "nimpipe snapshot", fail)
        for model_id, entry in data.get("models", {}).items()
    }
    return Snapshot(str(data.get("version", "unknown")), models)


def load_overrides(path: Path, *, required: bool = False) -> dict[str, KnownModel]:
    """Read the user override file; a missing file is no overrides unless ``required``.

    Raises :class:`ConfigError` naming the file and the key when it is malformed.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError("file not found", path=str(path)) from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=str(path)) from exc

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(problem, path=str(path), key=key)

    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise fail(unknown[0], "unknown setting (known: models)")
    models = data.get("models", {})
    if not isinstance(models, Mapping):
        raise fail("models", 'must be a table of [models."MODEL ID"] tables')
    return {
        model_id: _known_model(model_id, entry, "override", f"override file {path}", fail)
        for model_id, entry in models.items()
    }


# --------------------------------------------------------------------------
# What servers said
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class EndpointCatalog:
    """What one endpoint's ``/v1/models`` said, and when."""

    endpoint: str
    cards: tuple[ModelCard, ...] = ()
    #: Wall-clock time of the answer the cards come from (``None``: never answered).
    fetched_at: float | None = None
    #: ``server`` (asked in this process), ``disk`` (read from the cache) or ``none``.
    origin: str = "none"
    #: Why the last fetch failed, if it did.
    error: str | None = None
    #: Whether the last fetch attempt was skipped (offline, or hosted fetching off).
    skipped: str | None = None

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the answer, or ``None``."""
        if self.fetched_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.fetched_at)

    def fresh(self, ttl: float, now: float | None = None) -> bool:
        """Whether the answer is younger than ``ttl``."""
        age = self.age(now)
        return age is not None and age < ttl

    def card(self, model_id: str) -> ModelCard | None:
        """The card of ``model_id``, or ``None``."""
        return next((c for c in self.cards if c.id == model_id), None)


@attrs.frozen(kw_only=True)
class ModelInfo:
    """One model an endpoint serves, with its context window and where that figure came from."""

    id: str
    endpoint: str
    #: Routes that ask for this model on this endpoint.
    routes: tuple[str, ...] = ()
    owned_by: str | None = None
    root: str | None = None
    #: Base model of a LoRA adapter.
    parent: str | None = None
    #: What the server reported, if it did.
    max_model_len: int | None = None
    context_length: int = DEFAULT_CONTEXT_LENGTH
    #: ``server``, ``override``, ``snapshot``, ``config``, ``environment`` or ``default``.
    context_source: str = "default"
    capabilities: tuple[str, ...] = ()
    price: Price | None = None
    self_hosted: bool = False
    #: ``server`` (this process asked) or ``disk`` (the cache of an earlier answer).
    origin: str = "server"
    fetched_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = attrs.asdict(self)
        data["routes"] = list(self.routes)
        data["capabilities"] = list(self.capabilities)
        return data


def _cache_file(directory: Path, url: str) -> Path:
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:20]
    return directory / f"{digest}.json"


def _read_cache(directory: Path, url: str) -> EndpointCatalog | None:
    path = _cache_file(directory, url)
    try:
        data = json.loads(path.read_text("utf-8"))
        if data.get("format") != _CACHE_FORMAT or data.get("endpoint") != url:
            return None
        fetched_at = float(data["fetched_at"])
        cards = cards_from_dicts(data["models"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the unreadable catalog cache %s: %s", path, exc)
        return None
    return EndpointCatalog(endpoint=url, cards=tuple(cards), fetched_at=fetched_at, origin="disk")


def _write_cache(directory: Path, entry: EndpointCatalog) -> None:
    path = _cache_file(directory, entry.endpoint)
    payload = {
        "format": _CACHE_FORMAT,
        "endpoint": entry.endpoint,
        "fetched_at": entry.fetched_at,
        "models": [c.to_dict() for c in entry.cards],
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(payload, indent=1), "utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the catalog cache %s: %s", path, exc)


# --------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------


class CatalogHookSpecs:
    """The hook the catalog stage declares (jaato's ``list_models`` and ``nim-models`` call it)."""

    @hookspec
    def nim_catalog(
        self, search: str | None, capabilities: bool, pipeline: Pipeline
    ) -> list[dict[str, Any]] | None:
        """The NIM model catalog, one mapping per model an endpoint serves.

        :param search: a case-insensitive substring of the model id, or ``None`` for all.
        :param capabilities: whether the caller shows capabilities.
        :param pipeline: the running pipeline.
        :return: rows with ``id``, ``route``, ``endpoint``, ``context_length``,
            ``context_source``, ``parent`` and ``capabilities``.  *Collected*.
        """


def declare_hooks(pluginmanager: pluggy.PluginManager, specs: type, name: str) -> None:
    """Declare ``specs`` unless a hook called ``name`` already has a specification."""
    caller = getattr(pluginmanager.hook, name, None)
    if caller is None or caller.spec is None:
        pluginmanager.add_hookspecs(specs)


@attrs.define(eq=False)
class NimCatalog:
    """The ``nim_catalog`` stage: also usable alone with :meth:`from_config`.

    Thread-safe: the per-endpoint catalogs are replaced under a lock, and
    the hooks on the turn's path only read them.
    """

    settings: CatalogSettings = attrs.field(factory=CatalogSettings)
    #: Configured routes when used without a pipeline (:meth:`from_config`).
    config: Config | None = None
    _pipeline: Pipeline | None = attrs.field(default=None, init=False)
    _entries: dict[str, EndpointCatalog] = attrs.field(factory=dict, init=False)
    _overrides: dict[str, KnownModel] | None = attrs.field(default=None, init=False)
    _lock: threading.RLock = attrs.field(factory=threading.RLock, init=False)
    _stop: threading.Event = attrs.field(factory=threading.Event, init=False)
    _thread: threading.Thread | None = attrs.field(default=None, init=False)
    _disk_written: dict[str, float] = attrs.field(factory=dict, init=False)

    @classmethod
    def from_config(cls, config: Config) -> NimCatalog:
        """A catalog for ``config``'s routes and ``[stages.nim_catalog]`` settings, no pipeline."""
        settings = CatalogSettings.from_table(config.stage(STAGE_NAME), config.source)
        catalog = cls(settings=settings, config=config)
        catalog.load_local()
        return catalog

    # ------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------

    @hookimpl
    def addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
        declare_hooks(pluginmanager, CatalogHookSpecs, "nim_catalog")

    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        """Read settings, the snapshot, the overrides and the disk cache; start discovery."""
        self.settings = CatalogSettings.from_table(
            pipeline.config.stage(STAGE_NAME), pipeline.config.source
        )
        self._pipeline = pipeline
        self.load_local()
        self.apply_contexts()
        if self.settings.refresh_on_start:
            self._thread = threading.Thread(
                target=self._discover, name="nimpipe-catalog", daemon=True
            )
            self._thread.start()

    @hookimpl
    def unconfigure(self, pipeline: Pipeline) -> None:
        """Stop discovery (waits briefly for a request in flight)."""
        self.close()

    @hookimpl(tryfirst=True)
    def select_provider(
        self, turn: Turn, routes: tuple[Route, ...], attempt: Attempt, pipeline: Pipeline
    ) -> Route | None:
        """A route to the endpoint serving ``turn.model`` when no configured route serves it."""
        if attempt.cause is not None or turn.model is None or turn.route is not None:
            return None
        if any(r.model == turn.model for r in routes):
            return None
        return self.route_for(turn.model)

    @hookimpl
    def nim_catalog(self, search: str | None, capabilities: bool) -> list[dict[str, Any]]:
        """Rows for jaato's ``nim-models`` and ``list_models()``."""
        rows = []
        for info in self.models(search=search):
            row: dict[str, Any] = {
                "id": info.id,
                "route": ", ".join(info.routes),
                "endpoint": info.endpoint,
                "context_length": info.context_length,
                "context_source": info.context_source,
                "parent": info.parent,
            }
            if capabilities:
                row["capabilities"] = list(info.capabilities)
            rows.append(row)
        return rows

    # ------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------

    def routes(self) -> tuple[Route, ...]:
        """The routes in force (the pipeline's, else the config's)."""
        if self._pipeline is not None:
            return self._pipeline.routes
        return tuple(self.config.routes.values()) if self.config is not None else ()

    def endpoints(self) -> list[Endpoint]:
        """The endpoints of the routes in force."""
        return endpoints_of(self.routes())

    def _offline(self) -> bool:
        if self._pipeline is not None:
            return self._pipeline.config.offline
        return bool(self.config is not None and self.config.offline)

    def overrides(self) -> Mapping[str, KnownModel]:
        """The user override file's models (read once, by :meth:`load_local`)."""
        if self._overrides is None:
            self._overrides = load_overrides(
                self.settings.overrides_path(), required=self.settings.overrides_named
            )
        return self._overrides

    def known(self, model_id: str) -> KnownModel | None:
        """What the override file, else the snapshot, says about ``model_id``."""
        return self.overrides().get(model_id) or load_snapshot().models.get(model_id)

    def load_local(self) -> None:
        """Read the override file and the disk cache (local files only, no network)."""
        self._overrides = None
        self.overrides()
        directory = self.settings.cache_directory()
        for endpoint in self.endpoints():
            with self._lock:
                if endpoint.url in self._entries:
                    continue
            cached = _read_cache(directory, endpoint.url)
            if cached is not None:
                with self._lock:
                    self._entries.setdefault(endpoint.url, cached)

    def catalog(self, endpoint: str) -> EndpointCatalog | None:
        """What is known about ``endpoint``'s models (no request)."""
        with self._lock:
            return self._entries.get(endpoint_url(endpoint))

    def endpoint_catalogs(self) -> list[EndpointCatalog]:
        """One entry per endpoint in force, in route order (no request)."""
        with self._lock:
            return [
                self._entries.get(e.url) or EndpointCatalog(endpoint=e.url)
                for e in self.endpoints()
            ]

    def context_length(self, route: Route) -> tuple[int, str]:
        """The context window of ``route`` and its source; makes no request.

        A route's own figure (``config``/``environment``) first, then the
        override file, the server's ``max_model_len``, the snapshot, and at
        last ``default_context_length`` (source ``default``).
        """
        if route.context_source in _ROUTE_OWN_SOURCES and route.context_length:
            return route.context_length, route.context_source
        entry = self.catalog(route.base_url)
        card = entry.card(route.model) if entry is not None else None
        return self._resolve(route.model, card)

    def _resolve(self, model_id: str, card: ModelCard | None) -> tuple[int, str]:
        override = self.overrides().get(model_id)
        if override is not None and override.context_length:
            return override.context_length, "override"
        if card is not None and card.max_model_len:
            return card.max_model_len, "server"
        for name in (model_id, card.root if card else None, card.parent if card else None):
            known = load_snapshot().models.get(name) if name else None
            if known is not None and known.context_length:
                return known.context_length, "snapshot"
        return self.settings.default_context_length, "default"

    def _capabilities(self, model_id: str, card: ModelCard | None) -> tuple[str, ...]:
        for name in (model_id, card.root if card else None, card.parent if card else None):
            known = self.known(name) if name else None
            if known is not None and known.capabilities:
                found = known.capabilities
                break
        else:
            found = ()
        if card is not None and card.parent:
            found = (*found, "lora")
        return found

    def apply_contexts(self) -> list[Route]:
        """Give routes the context windows now known; returns the routes replaced.

        Routes whose ``context_length`` came from their own config are left
        alone, and so are routes nothing knows about (``default``).
        """
        pipeline = self._pipeline
        if pipeline is None:
            return []
        changed = []
        with self._lock:
            for route in pipeline.routes:
                if route.context_source in _ROUTE_OWN_SOURCES:
                    continue
                length, source = self.context_length(route)
                if source == "default":
                    continue
                if (route.context_length, route.context_source) != (length, source):
                    changed.append(
                        attrs.evolve(route, context_length=length, context_source=source)
                    )
            if changed:
                pipeline.replace_routes(*changed)
        for route in changed:
            log.info(
                "route %r: context window %d (%s)",
                route.name,
                route.context_length,
                route.context_source,
            )
        return changed

    def observe(self, endpoint: str, cards: Sequence[ModelCard]) -> None:
        """Take a ``/v1/models`` answer fetched elsewhere (by the health stage's probes).

        Ignored until the stage is configured (or made with :meth:`from_config`).
        """
        if self._pipeline is None and self.config is None:
            return
        url = endpoint_url(endpoint)
        now = time.time()
        entry = EndpointCatalog(endpoint=url, cards=tuple(cards), fetched_at=now, origin="server")
        with self._lock:
            previous = self._entries.get(url)
            self._entries[url] = entry
            changed = previous is None or previous.cards != entry.cards
            stale_on_disk = now - self._disk_written.get(url, 0.0) > self.settings.ttl / 2
            if changed or stale_on_disk:
                self._disk_written[url] = now
        if changed or stale_on_disk:
            _write_cache(self.settings.cache_directory(), entry)
        if changed:
            self.apply_contexts()

    def refresh(self, *, force: bool = False) -> list[EndpointCatalog]:
        """Fetch the catalogs that are stale (all with ``force``), concurrently; blocking.

        Endpoints that cannot be reached keep what was known (memory or disk)
        with ``error`` set.  Offline, only local endpoints are asked; with
        ``fetch_hosted = false``, only self-hosted ones.
        """
        offline = self._offline()
        todo: list[Endpoint] = []
        for endpoint in self.endpoints():
            entry = self.catalog(endpoint.url)
            if not force and entry is not None and entry.fresh(self.settings.ttl):
                continue
            skip = None
            if not endpoint.may_probe(offline=offline):
                skip = "offline: not a local endpoint"
            elif not (endpoint.self_hosted or endpoint.local) and not self.settings.fetch_hosted:
                skip = "fetch_hosted is off"
            if skip is not None:
                with self._lock:
                    known = self._entries.get(endpoint.url) or EndpointCatalog(
                        endpoint=endpoint.url
                    )
                    self._entries[endpoint.url] = attrs.evolve(known, skipped=skip)
                continue
            todo.append(endpoint)
        if todo:
            self._fetch_all(todo)
            self.apply_contexts()
        return self.endpoint_catalogs()

    def models(self, *, refresh: bool = False, search: str | None = None) -> list[ModelInfo]:
        """Every model of every endpoint in force; fetches stale catalogs first (blocking).

        :param refresh: fetch every catalog even when the cached one is fresh.
        :param search: keep models whose id contains this (case-insensitive).
        """
        self.refresh(force=refresh)
        return self.cached_models(search=search)

    def cached_models(self, *, search: str | None = None) -> list[ModelInfo]:
        """Like :meth:`models`, from what is known now (no request)."""
        needle = search.lower() if search else None
        routes = self.routes()
        infos = []
        for endpoint in self.endpoints():
            entry = self.catalog(endpoint.url)
            if entry is None:
                continue
            on_endpoint = [r for r in routes if endpoint_url(r.base_url) == endpoint.url]
            for card in entry.cards:
                if needle and needle not in card.id.lower():
                    continue
                serving = [r for r in on_endpoint if r.model == card.id]
                length, source = self._resolve(card.id, card)
                own = next((r for r in serving if r.context_source in _ROUTE_OWN_SOURCES), None)
                if own is not None and own.context_length:
                    length, source = own.context_length, own.context_source
                known = self.known(card.id)
                price = next((r.price for r in serving if r.price is not None), None)
                infos.append(
                    ModelInfo(
                        id=card.id,
                        endpoint=endpoint.url,
                        routes=tuple(r.name for r in serving),
                        owned_by=card.owned_by,
                        root=card.root,
                        parent=card.parent,
                        max_model_len=card.max_model_len,
                        context_length=length,
                        context_source=source,
                        capabilities=self._capabilities(card.id, card),
                        price=price or (known.price if known else None),
                        self_hosted=endpoint.self_hosted or endpoint.local,
                        origin=entry.origin,
                        fetched_at=entry.fetched_at,
                    )
                )
        return infos

    def route_for(self, model_id: str) -> Route | None:
        """A route to an endpoint whose cached catalog lists ``model_id`` (no request).

        Prefers endpoints the ``nim_health`` stage does not consider down.
        The route, named ``MODEL@ROUTE`` after the endpoint's first route, is
        added to the pipeline so later turns find it directly.
        """
        routes = self.routes()
        health = self._health()
        found: list[Route] = []
        for endpoint in self.endpoints():
            entry = self.catalog(endpoint.url)
            if entry is None or not any(model_id in (c.id, c.root) for c in entry.cards):
                continue
            base = next(r for r in routes if r.name == endpoint.routes[0])
            found.append(base)
        if not found:
            return None
        if health is not None:
            usable = [r for r in found if health.usable(r)]
            found = usable or found
        base = found[0]
        name = f"{model_id}@{base.name}"
        existing = next((r for r in routes if r.name == name), None)
        if existing is not None:
            return existing
        card = None
        entry = self.catalog(base.base_url)
        if entry is not None:
            card = entry.card(model_id)
        length, source = self._resolve(model_id, card)
        route = attrs.evolve(
            base,
            name=name,
            model=model_id,
            context_length=None if source == "default" else length,
            context_source="unknown" if source == "default" else source,
        )
        if self._pipeline is not None:
            self._pipeline.replace_routes(route)
        log.info("model %r is served at %s: added route %r", model_id, base.base_url, name)
        return route

    def close(self) -> None:
        """Stop the discovery thread (waits up to the request timeout for it)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.settings.timeout + 1.0)
            self._thread = None

    # ------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------

    def _health(self) -> Any:
        if self._pipeline is None:
            return None
        plugin = self._pipeline.plugins.pm.get_plugin("nim_health")
        return plugin if hasattr(plugin, "usable") else None

    def _discover(self) -> None:
        try:
            if not self._stop.is_set():
                self.refresh()
        except Exception:
            log.exception("catalog discovery failed")

    def _fetch_all(self, endpoints: Sequence[Endpoint]) -> None:
        import httpx

        timeout = self.settings.timeout
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0))) as client:
            if len(endpoints) == 1:
                self._fetch(client, endpoints[0])
                return
            workers = min(8, len(endpoints))
            with concurrent.futures.ThreadPoolExecutor(workers, "nimpipe-catalog") as pool:
                for future in [pool.submit(self._fetch, client, e) for e in endpoints]:
                    future.result()

    def _fetch(self, client: httpx.Client, endpoint: Endpoint) -> None:
        if self._stop.is_set() and self._pipeline is not None:
            return
        url = f"{endpoint.url}/models"
        error: str | None = None
        cards: list[ModelCard] | None = None
        try:
            reply = client.get(url, headers=dict(endpoint.headers))
        except Exception as exc:
            error = format_error(exc, url, self.settings.timeout)
        else:
            if reply.status_code == 200:
                try:
                    cards = parse_model_list(reply.content)
                except ValueError as exc:
                    error = f"malformed reply from {url}: {exc}"
            elif reply.status_code in (401, 403):
                error = (
                    f"{url} refused the request (HTTP {reply.status_code}): the hosted "
                    "catalog needs an API key (set the route's api_key_env)"
                )
            else:
                error = f"{url} answered HTTP {reply.status_code}: {reply.text[:200].strip()}"
        now = time.time()
        with self._lock:
            previous = self._entries.get(endpoint.url)
            if cards is not None:
                entry = EndpointCatalog(
                    endpoint=endpoint.url, cards=tuple(cards), fetched_at=now, origin="server"
                )
                self._disk_written[endpoint.url] = now
            else:
                base = previous or EndpointCatalog(endpoint=endpoint.url)
                entry = attrs.evolve(base, error=error, skipped=None)
            self._entries[endpoint.url] = entry
        if cards is not None:
            _write_cache(self.settings.cache_directory(), entry)
        else:
            log.info("catalog of %s: %s", endpoint.url, error)


def create_plugin() -> NimCatalog:
    """The stage object registered as ``nim_catalog`` (one per pipeline)."""
    return NimCatalog()


# --------------------------------------------------------------------------
# ``nimpipe models``
# --------------------------------------------------------------------------


def _age_text(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def models_report(
    infos: Sequence[ModelInfo], endpoints: Sequence[EndpointCatalog], *, capabilities: bool
) -> tuple[list[str], list[str]]:
    """The ``nimpipe models`` table, and one line per endpoint that did not answer."""
    header = ["model", "context", "source", "routes", "endpoint", "base model"]
    if capabilities:
        header += ["capabilities", "price in/out per 1k"]
    rows = []
    for info in infos:
        row: list[Any] = [
            info.id,
            info.context_length,
            info.context_source,
            ", ".join(info.routes) or "-",
            info.endpoint + (" (cached)" if info.origin == "disk" else ""),
            info.parent or "-",
        ]
        if capabilities:
            price = info.price
            row += [
                ", ".join(info.capabilities) or "-",
                f"${price.input_per_1k:g} / ${price.output_per_1k:g}" if price else "-",
            ]
        rows.append(row)
    table = _table(header, rows) if rows else ["(no model found)"]
    problems = []
    for entry in endpoints:
        if entry.error:
            kept = (
                f"; showing the catalog cached {_age_text(entry.age())}"
                if entry.cards
                else "; nothing cached"
            )
            problems.append(f"{entry.endpoint}: {entry.error}{kept}")
        elif entry.skipped and not entry.cards:
            problems.append(f"{entry.endpoint}: not asked ({entry.skipped}); nothing cached")
    return table, problems


def run_models_command(config: Config, args: argparse.Namespace) -> int:
    """``nimpipe models [--search X] [--capabilities] [--json] [--refresh]``; returns the exit code.

    0 when a catalog (fresh or cached) was found for at least one endpoint,
    1 when none was, 2 when no route is configured.
    """
    if not config.routes:
        print(
            "nimpipe models: no endpoint is configured: add [routes.NAME] to nimpipe.toml "
            "or set NIMPIPE_BASE_URL and NIMPIPE_MODEL",
            file=sys.stderr,
        )
        return 2
    catalog = NimCatalog.from_config(config)
    try:
        infos = catalog.models(refresh=bool(getattr(args, "refresh", False)), search=args.search)
        endpoints = catalog.endpoint_catalogs()
    finally:
        catalog.close()
    answered = any(e.fetched_at is not None for e in endpoints)
    if args.json:
        payload = {
            "snapshot_version": load_snapshot().version,
            "models": [info.to_dict() for info in infos],
            "endpoints": [
                {
                    "endpoint": e.endpoint,
                    "origin": e.origin,
                    "fetched_at": e.fetched_at,
                    "models": len(e.cards),
                    "error": e.error,
                    "skipped": e.skipped,
                }
                for e in endpoints
            ],
        }
        print(json.dumps(payload, indent=2))
    else:
        table, problems = models_report(infos, endpoints, capabilities=bool(args.capabilities))
        for line in table:
            print(line)
        for line in problems:
            print(f"nimpipe models: {line}", file=sys.stderr)
    return 0 if answered else 1
