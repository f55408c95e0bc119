"""The model catalog: what every endpoint serves, and each route's context window.

A route's context window comes from the first of these that knows the model
(``Route.context_source`` says which): the route's own ``context_length``
(``config`` or ``environment``, never replaced), the user override file
(``override``), the server's ``max_model_len`` (``server``), the shipped
snapshot (``snapshot``); :meth:`ModelCatalog.context_length` answers
``default`` (the ``default_context_length`` setting) when none does, and
routes are then left as they are.

Requests happen only in :meth:`ModelCatalog.refresh` (and :meth:`models`,
which calls it), blocking, and in the discovery thread :meth:`bind`
starts; everything else reads what is known (memory, then the disk cache).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from nimpipe.types import Price, Route
from nimpipe_contrib.nim.catalog_cache import EndpointCatalog, read_cache, write_cache
from nimpipe_contrib.nim.catalog_settings import DEFAULT_CONTEXT_LENGTH, STAGE_NAME, CatalogSettings
from nimpipe_contrib.nim.endpoints import (
    Endpoint,
    ModelCard,
    endpoint_url,
    endpoints_of,
    format_error,
    parse_model_list,
)
from nimpipe_contrib.nim.known_models import KnownModel, load_overrides, load_snapshot

if TYPE_CHECKING:
    import httpx

    from nimpipe import Config, Pipeline

__all__ = ["ModelCatalog", "ModelInfo"]

#: Context sources a route brings itself; the catalog never replaces them.
_ROUTE_OWN_SOURCES = frozenset({"config", "environment"})

_Catalog = TypeVar("_Catalog", bound="ModelCatalog")

log = logging.getLogger("nimpipe.catalog")


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


@attrs.define(eq=False)
class ModelCatalog:
    """The models of every endpoint in force, and their context windows.

    Used alone (:meth:`from_config`: ``nimpipe models``) or as the base of
    the ``nim_catalog`` stage, which binds it to a pipeline (:meth:`bind`).
    Thread-safe: the per-endpoint catalogs are replaced under a lock, and
    what the turn's path calls only reads them.
    """

    settings: CatalogSettings = attrs.field(factory=CatalogSettings)
    #: Configured routes when used without a pipeline (:meth:`from_config`).
    config: Config | None = None
    #: Whether a route may be called now (the stage asks ``route_usable``); ``None``: any.
    usable: Callable[[Route], bool] | None = attrs.field(default=None, init=False)
    _pipeline: Pipeline | None = attrs.field(default=None, init=False)
    _entries: dict[str, EndpointCatalog] = attrs.field(factory=dict, init=False)
    _overrides: dict[str, KnownModel] | None = attrs.field(default=None, init=False)
    _lock: threading.RLock = attrs.field(factory=threading.RLock, init=False)
    _stop: threading.Event = attrs.field(factory=threading.Event, init=False)
    _thread: threading.Thread | None = attrs.field(default=None, init=False)
    _disk_written: dict[str, float] = attrs.field(factory=dict, init=False)

    @classmethod
    def from_config(cls: type[_Catalog], config: Config) -> _Catalog:
        """A catalog for ``config``'s routes and ``[stages.nim_catalog]`` settings, no pipeline."""
        settings = CatalogSettings.from_table(config.stage(STAGE_NAME), config.source)
        catalog = cls(settings=settings, config=config)
        catalog.load_local()
        return catalog

    def bind(self, pipeline: Pipeline, settings: CatalogSettings) -> None:
        """Follow ``pipeline``'s routes: read local files, apply what they say, start discovery.

        Discovery (fetching stale catalogs once) runs on a daemon thread when
        ``refresh_on_start`` is set; this returns at once.
        """
        self.settings = settings
        self._pipeline = pipeline
        self.load_local()
        self.apply_contexts()
        if settings.refresh_on_start:
            self._thread = threading.Thread(
                target=self._discover, name="nimpipe-catalog", daemon=True
            )
            self._thread.start()

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
            cached = read_cache(directory, endpoint.url)
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

        Ignored until bound to a pipeline (or made with :meth:`from_config`).
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
            write_cache(self.settings.cache_directory(), entry)
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

        Prefers endpoints whose route :attr:`usable` accepts (in the stage: no
        ``route_usable`` implementation refuses it).
        The route, named ``MODEL@ROUTE`` after the endpoint's first route, is
        added to the pipeline so later turns find it directly.
        """
        routes = self.routes()
        found: list[Route] = []
        for endpoint in self.endpoints():
            entry = self.catalog(endpoint.url)
            if entry is None or not any(model_id in (c.id, c.root) for c in entry.cards):
                continue
            base = next(r for r in routes if r.name == endpoint.routes[0])
            found.append(base)
        if not found:
            return None
        if self.usable is not None:
            usable = [r for r in found if self.usable(r)]
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
            write_cache(self.settings.cache_directory(), entry)
        else:
            log.info("catalog of %s: %s", endpoint.url, error)
