"""Contrib stage ``nim_catalog``: the models of every NIM endpoint, and their context windows.

Enable it with a ``[stages.nim_catalog]`` table (its settings, all
optional, are :class:`~nimpipe_contrib.nim.catalog_settings.CatalogSettings`
and ``docs/catalog-health.md``).  The stage is a
:class:`~nimpipe_contrib.nim.model_catalog.ModelCatalog` bound to the
pipeline, plus its hooks:

- ``configure`` reads the snapshot, the override file and the disk cache,
  gives routes the context windows they say, and starts fetching stale
  catalogs on a daemon thread (it never waits on the network);
- ``select_provider`` sends a turn for a model no route serves
  (``turn.model``) to an endpoint whose cached catalog lists it, through a
  new route ``MODEL@ROUTE`` (no request on the turn's path);
- ``nim_catalog`` (declared here) gives jaato's ``list_models()`` and
  ``nim-models`` their rows;
- ``nim_models_seen`` (declared here and by the health stage) takes the
  models a health probe's ``/v1/models`` answer listed
  (:meth:`ModelCatalog.observe`), so the catalog stays fresh at no extra
  request.

A model found on several endpoints goes to one whose route no stage's
``route_usable`` hook refuses (the ``nim_health`` stage answers it from its
registry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nimpipe.stage import hookimpl
from nimpipe.types import Attempt, Route, Turn
from nimpipe_contrib.nim.catalog_settings import STAGE_NAME, CatalogSettings
from nimpipe_contrib.nim.endpoints import ModelCard
from nimpipe_contrib.nim.hookspecs import CatalogHookSpecs, ModelsHookSpecs, declare_hooks
from nimpipe_contrib.nim.model_catalog import ModelCatalog

if TYPE_CHECKING:
    import pluggy

    from nimpipe import Pipeline

__all__ = ["STAGE_NAME", "NimCatalog", "create_plugin"]


class NimCatalog(ModelCatalog):
    """The ``nim_catalog`` stage: a :class:`ModelCatalog` bound to a pipeline, and its hooks."""

    @hookimpl
    def addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
        declare_hooks(pluginmanager, CatalogHookSpecs, "nim_catalog")
        declare_hooks(pluginmanager, ModelsHookSpecs, "nim_models_seen")

    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        """Read settings, the snapshot, the overrides and the disk cache; start discovery."""
        settings = CatalogSettings.from_table(
            pipeline.config.stage(STAGE_NAME), pipeline.config.source
        )
        self.usable = self._usable_by_health
        self.bind(pipeline, settings)

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
    def nim_models_seen(self, url: str, cards: Sequence[ModelCard]) -> None:
        """Take the models a health probe saw at ``url`` (no request of its own)."""
        self.observe(url, cards)

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

    def _usable_by_health(self, route: Route) -> bool:
        # Whoever knows endpoint state (the nim_health stage, when it is on) says so by hook.
        pipeline = self._pipeline
        if pipeline is None:
            return True
        answers = pipeline.hooks.call("route_usable", route=route, pipeline=pipeline)
        return all(answer is not False for answer in answers)


def create_plugin() -> NimCatalog:
    """The stage object registered as ``nim_catalog`` (one per pipeline)."""
    return NimCatalog()
