"""nimpipe inside jaato: a model provider and user commands.

Installing nimpipe next to jaato-server registers two entry points:

- ``jaato.model_providers`` -> ``nimpipe``: :class:`NimpipeProvider`, which runs
  every jaato model call through a nimpipe pipeline (``JAATO_PROVIDER=nimpipe``);
- ``jaato.plugins`` -> ``nimpipe``: the user commands ``nim-models``,
  ``nim-status`` and ``nimpipe-cost`` (:mod:`nimpipe.jaato.commands`).

Importing this package is cheap and imports neither jaato nor the pipeline;
the names below load on first use.  Programs that embed jaato (and tests)
add stages to the pipelines the provider builds with :func:`register_plugin`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nimpipe.jaato._pipelines import (
        AgentCost,
        CostTally,
        Settings,
        SharedPipeline,
        active_pipelines,
        build_config,
        close_pipelines,
        register_plugin,
        shared_pipeline,
        unregister_plugin,
    )
    from nimpipe.jaato.commands import NimpipeCommands, create_plugin
    from nimpipe.jaato.provider import PROVIDER_NAME, NimpipeProvider, create_provider

__all__ = [
    "PROVIDER_NAME",
    "AgentCost",
    "CostTally",
    "NimpipeCommands",
    "NimpipeProvider",
    "Settings",
    "SharedPipeline",
    "active_pipelines",
    "build_config",
    "close_pipelines",
    "create_plugin",
    "create_provider",
    "register_plugin",
    "shared_pipeline",
    "unregister_plugin",
]

_LAZY = {
    "AgentCost": "nimpipe.jaato._pipelines",
    "CostTally": "nimpipe.jaato._pipelines",
    "Settings": "nimpipe.jaato._pipelines",
    "SharedPipeline": "nimpipe.jaato._pipelines",
    "active_pipelines": "nimpipe.jaato._pipelines",
    "build_config": "nimpipe.jaato._pipelines",
    "close_pipelines": "nimpipe.jaato._pipelines",
    "register_plugin": "nimpipe.jaato._pipelines",
    "shared_pipeline": "nimpipe.jaato._pipelines",
    "unregister_plugin": "nimpipe.jaato._pipelines",
    "NimpipeCommands": "nimpipe.jaato.commands",
    "create_plugin": "nimpipe.jaato.commands",
    "PROVIDER_NAME": "nimpipe.jaato.provider",
    "NimpipeProvider": "nimpipe.jaato.provider",
    "create_provider": "nimpipe.jaato.provider",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nimpipe.jaato' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
