"""Hooks that stages declare are open to third-party plugins like the core's.

A plugin that implements ``nim_catalog``, ``nim_status`` or ``cost_summary``
beside the stages that declare them is called with them, and its rows come
back with theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nimpipe import hookimpl
from nimpipe.testing.nim_server import NimServer
from nimpipe.types import Route, Turn

MODEL = "meta/llama-3.1-8b-instruct"


class Reporter:
    """A third party's rows for the stages' report hooks."""

    @hookimpl
    def nim_catalog(self, search: str | None, capabilities: bool, pipeline: Any) -> list[Any]:
        return [{"id": "acme/extra", "route": "acme", "search": search}]

    @hookimpl
    def nim_status(self, pipeline: Any) -> list[Any]:
        return [{"route": "acme", "state": "ready"}]

    @hookimpl
    def cost_summary(self, pipeline: Any) -> list[Any]:
        return [{"agent_id": "acme-agent", "calls": 0}]


def test_a_plugin_adds_rows_to_the_stages_report_hooks(make_pipeline: Any, tmp_path: Path) -> None:
    with NimServer() as server:
        pipeline = make_pipeline(
            routes=[Route(name="local", base_url=server.base_url, model=MODEL, max_retries=0)],
            plugins=[Reporter()],
            stages={
                "nim_health": {},
                "nim_catalog": {"cache_dir": str(tmp_path / "cache")},
                "ledger": {"path": str(tmp_path / "ledger.sqlite")},
            },
        )
        assert pipeline.run(Turn.create("hello", agent_id="a1", timeout=30)).ok
        hook = pipeline.plugins.pm.hook

        catalog = [
            row
            for rows in hook.nim_catalog(search=None, capabilities=False, pipeline=pipeline)
            for row in rows or ()
        ]
        assert {"acme/extra", MODEL} <= {row["id"] for row in catalog}

        status = [row for rows in hook.nim_status(pipeline=pipeline) for row in rows or ()]
        assert {"acme", "local"} <= {row["route"] for row in status}

        pipeline.close()  # the ledger's queue is written out
        summary = [row for rows in hook.cost_summary(pipeline=pipeline) for row in rows or ()]
        agents = {row["agent_id"]: row for row in summary}
        assert agents["acme-agent"]["calls"] == 0
        assert agents["a1"]["calls"] == 1
