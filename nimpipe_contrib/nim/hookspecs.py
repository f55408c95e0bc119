"""The hooks the NIM stages declare: ``nim_catalog`` and ``nim_status`` (jaato calls both).

Each stage declares its hook from ``addhooks`` with :func:`declare_hooks`,
so a pipeline without the stage has no such hook, and two stages (or two
pipelines on one plugin manager) never declare one twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nimpipe.stage import hookspec

if TYPE_CHECKING:
    import pluggy

    from nimpipe import Pipeline

__all__ = ["CatalogHookSpecs", "StatusHookSpecs", "declare_hooks"]


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


def declare_hooks(pluginmanager: pluggy.PluginManager, specs: type, name: str) -> None:
    """Declare ``specs`` unless a hook called ``name`` already has a specification."""
    caller = getattr(pluginmanager.hook, name, None)
    if caller is None or caller.spec is None:
        pluginmanager.add_hookspecs(specs)
