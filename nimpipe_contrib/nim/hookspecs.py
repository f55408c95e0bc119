"""The hooks the NIM stages declare: ``nim_catalog`` and ``nim_status`` (jaato calls
both), and ``nim_models_seen`` (how the health stage shares what its probes saw).

Each stage declares its hooks from ``addhooks`` with :func:`declare_hooks`,
so a pipeline without the stage has no such hook, and two stages (or two
pipelines on one plugin manager) never declare one twice.  Both stages
declare ``nim_models_seen``: the health stage calls it, the catalog
implements it, and either may run without the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nimpipe.stage import hookspec

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pluggy

    from nimpipe import Pipeline
    from nimpipe_contrib.nim.endpoints import ModelCard

__all__ = ["CatalogHookSpecs", "ModelsHookSpecs", "StatusHookSpecs", "declare_hooks"]


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


class StatusHookSpecs:
    """The hook the health stage declares (jaato's ``nim-status`` calls it)."""

    @hookspec
    def nim_status(self, pipeline: Pipeline) -> list[dict[str, Any]] | None:
        """Health and load per route.

        :param pipeline: the running pipeline.
        :return: rows with ``route``, ``state``, ``ready``, ``waiting``,
            ``running``, ``kv_cache`` and ``detail``, plus ``endpoint``,
            ``latency_ms``, ``models``, ``context`` and ``tokens_per_s``.
            *Collected*.
        """


class ModelsHookSpecs:
    """The hook both NIM stages declare: the health stage calls it, the catalog implements it."""

    @hookspec
    def nim_models_seen(self, url: str, cards: Sequence[ModelCard], pipeline: Pipeline) -> None:
        """Receive the models an endpoint listed, as a health probe saw them.

        Called by the ``nim_health`` stage each time a probe read an
        endpoint's ``/v1/models`` (on its scheduler thread, or on the thread
        that asked for the probe): the way the catalog stays fresh at no
        extra request.  Keep it fast and do not block.

        :param url: the endpoint's URL (as
            :func:`~nimpipe_contrib.nim.endpoints.endpoint_url` normalises it).
        :param cards: the models the endpoint listed, in its order.
        :param pipeline: the running pipeline.
        :return: nothing.  *Collected* (results are ignored).
        """


def declare_hooks(pluginmanager: pluggy.PluginManager, specs: type, name: str) -> None:
    """Declare ``specs`` unless a hook called ``name`` already has a specification."""
    caller = getattr(pluginmanager.hook, name, None)
    if caller is None or caller.spec is None:
        pluginmanager.add_hookspecs(specs)
