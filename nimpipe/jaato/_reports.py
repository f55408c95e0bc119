"""What the stages of a pipeline can report to jaato's commands and ``list_models``.

A stage answers by implementing a plugin-declared hook (declared through
``addhooks``, as :mod:`nimpipe.hookspecs` describes).  The jaato integration
asks; when no stage implements the hook, the answer is ``None`` and the
command says the report is not available.

``nim_catalog(search, capabilities, pipeline)``
    The NIM model catalog: a list of mappings, each with ``id`` and
    optionally ``route``, ``context_length``, ``parent`` and
    ``capabilities`` (a list of strings).  ``search`` (``None`` for all) is a
    case-insensitive substring of the id; ``capabilities`` asks for the
    capability lists.
``nim_status(pipeline)``
    Health and load per route: a list of mappings, each with ``route`` and
    any of ``state``, ``ready``, ``waiting``, ``running``, ``kv_cache``,
    ``detail``.
``cost_summary(pipeline)``
    Spend per agent from a persistent ledger: a list of mappings, each with
    ``agent_id`` and any of ``agent_type``, ``calls``, ``prompt_tokens``,
    ``completion_tokens``, ``cost_usd``.  Without such a stage, the jaato
    integration's own in-memory tally (stage ``jaato_costs``) answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nimpipe.pipeline import Pipeline

__all__ = ["CATALOG_HOOK", "COST_HOOK", "STATUS_HOOK", "ask"]

#: Hook a catalog stage implements.
CATALOG_HOOK = "nim_catalog"
#: Hook a health/metrics stage implements.
STATUS_HOOK = "nim_status"
#: Hook a persistent cost ledger implements.
COST_HOOK = "cost_summary"


def ask(pipeline: Pipeline, hook: str, **kwargs: Any) -> list[Mapping[str, Any]] | None:
    """Ask the stages implementing ``hook`` for their rows; ``None`` if none does."""
    plugins = pipeline.hooks
    if getattr(plugins.pm.hook, hook, None) is None or not plugins.has_impls(hook):
        return None
    result = plugins.call(hook, pipeline=pipeline, **kwargs)
    if result is None:
        return []
    batches = [result] if isinstance(result, Mapping) else list(result)
    rows: list[Mapping[str, Any]] = []
    for batch in batches:
        if isinstance(batch, Mapping):
            rows.append(batch)
        else:
            rows.extend(row for row in batch if isinstance(row, Mapping))
    return rows
