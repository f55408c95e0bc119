"""jaato tool plugin ``nimpipe``: user commands that report what nimpipe's stages know.

- ``nim-models [--search X] [--capabilities]``: the NIM catalog (from a
  catalog stage) and the configured routes;
- ``nim-status [--watch]``: health and load per route (from a health stage);
  ``--watch`` takes five samples a second apart;
- ``nimpipe-cost``: model calls, tokens and cost per agent (from a cost
  ledger stage, else the integration's in-memory tally ``jaato_costs``).

A command whose stage is not enabled says so and shows what the
configuration alone tells.  The commands read the pipelines that the
``nimpipe`` provider built in this process; see :mod:`nimpipe.jaato._reports`
for the hooks a stage implements to answer them.

jaato loads this module through the entry point ``nimpipe`` of the group
``jaato.plugins``; it imports nothing from jaato or the pipeline at import time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nimpipe.config import Config
    from nimpipe.jaato._pipelines import AgentCost
    from nimpipe.pipeline import Pipeline

__all__ = ["COMMANDS", "PLUGIN_KIND", "PLUGIN_TIER", "NimpipeCommands", "create_plugin"]

#: jaato plugin kind: a tool plugin (it offers user commands, no model tools).
PLUGIN_KIND = "tool"
#: jaato discovery tier: loaded where sessions run, next to the provider.
PLUGIN_TIER = "runner"

#: Command name -> description, as jaato lists them.
COMMANDS: Mapping[str, str] = {
    "nim-models": "List the NIM model catalog and nimpipe's routes "
    "(nim-models [--search TEXT] [--capabilities])",
    "nim-status": "Show health and load of nimpipe's routes (nim-status [--watch])",
    "nimpipe-cost": "Show model calls, tokens and cost per agent, as nimpipe recorded them",
}

#: ``nim-status --watch``: samples and seconds between them.
WATCH_SAMPLES = 5
WATCH_INTERVAL = 1.0

_NO_PROVIDER = (
    "nimpipe is not the model provider of this session: nothing was recorded. "
    "Switch with JAATO_PROVIDER=nimpipe."
)


def _flags(args: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Split jaato's command arguments into ``--name [value]`` options and the rest."""
    args = dict(args or {})
    raw = args.pop("args", [])
    words = raw.split() if isinstance(raw, str) else [str(w) for w in raw]
    options: dict[str, Any] = {k.replace("-", "_"): v for k, v in args.items()}
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            key = name.replace("-", "_")
            if value:
                options[key] = value
            elif i + 1 < len(words) and not words[i + 1].startswith("--") and key == "search":
                options[key] = words[i + 1]
                i += 1
            else:
                options[key] = True
        else:
            rest.append(word)
        i += 1
    return options, rest


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  "
        + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _route_lines(config: Config, search: str | None = None) -> list[str]:
    routes = [
        r
        for r in config.routes.values()
        if not search or search.lower() in f"{r.name} {r.model}".lower()
    ]
    if not routes:
        return ["  (no route matches)" if search else "  (no route configured)"]
    return _table(
        ("route", "model", "endpoint", "tier", "context"),
        (
            (
                r.name + (" (default)" if r.name == config.default_route else ""),
                r.model,
                r.base_url + (" (self-hosted)" if r.self_hosted else ""),
                r.tier,
                r.context_length or "?",
            )
            for r in routes
        ),
    )


class NimpipeCommands:
    """The jaato tool plugin ``nimpipe``: user commands only, no model tools."""

    def __init__(self) -> None:
        self._config: dict[str, Any] = {}

    @property
    def name(self) -> str:
        """``"nimpipe"``."""
        return "nimpipe"

    def initialize(self, config: Mapping[str, Any] | None = None) -> None:
        """Keep jaato's plugin config (``workspace_path`` locates ``nimpipe.toml``)."""
        self._config = dict(config or {})

    def shutdown(self) -> None:
        """Nothing to release."""

    def reset_for_next_session(self) -> None:
        """Nothing is kept per session."""

    def get_tool_schemas(self) -> list[Any]:
        """No model tools."""
        return []

    def get_system_instructions(self) -> str | None:
        """No instructions for the model."""
        return None

    def get_auto_approved_tools(self) -> list[str]:
        """The user commands: a user runs them, so they need no permission prompt."""
        return list(COMMANDS)

    def get_user_commands(self) -> list[Any]:
        """jaato ``UserCommand`` declarations of the three commands."""
        from jaato_sdk.plugins.base import UserCommand

        return [UserCommand(name, description) for name, description in COMMANDS.items()]

    def get_executors(self) -> dict[str, Callable[[Mapping[str, Any]], str]]:
        """Command name -> executor taking jaato's argument dict, returning the report."""
        return {
            "nim-models": self.nim_models,
            "nim-status": self.nim_status,
            "nimpipe-cost": self.nimpipe_cost,
        }

    # ------------------------------------------------------------------

    def _pipelines(self) -> tuple[Pipeline, ...]:
        from nimpipe.jaato._pipelines import active_pipelines

        return tuple(shared.pipeline for shared in active_pipelines())

    def _configuration(self) -> Config | None:
        """The configuration in force: the active pipeline's, else the one jaato's settings give."""
        pipelines = self._pipelines()
        if pipelines:
            return pipelines[0].config
        from nimpipe.errors import NimpipeError
        from nimpipe.jaato._pipelines import Settings, build_config

        workspace = self._config.get("workspace_path") or self._config.get("workspace_root")
        try:
            return build_config(Settings(workspace=workspace), None)
        except NimpipeError:
            return None

    def nim_models(self, args: Mapping[str, Any] | None = None) -> str:
        """``nim-models [--search TEXT] [--capabilities]``."""
        from nimpipe.jaato import _reports

        options, rest = _flags(args)
        search = options.get("search")
        search = str(search) if search not in (None, True) else (" ".join(rest) or None)
        capabilities = bool(options.get("capabilities"))
        lines: list[str] = []
        catalog = None
        for pipeline in self._pipelines():
            catalog = _reports.ask(
                pipeline, _reports.CATALOG_HOOK, search=search, capabilities=capabilities
            )
            if catalog is not None:
                break
        if catalog is None:
            lines.append(
                "NIM catalog: not available: no catalog stage is enabled in nimpipe "
                f"(a stage implementing {_reports.CATALOG_HOOK!r})."
            )
            if capabilities:
                lines.append("Model capabilities come from the catalog stage: not available.")
        else:
            lines.append(f"NIM catalog ({len(catalog)} models):")
            header = ["model", "route", "context", "base model"]
            if capabilities:
                header.append("capabilities")
            rows = []
            for row in catalog:
                cells = [
                    row.get("id", "?"),
                    row.get("route", ""),
                    row.get("context_length", "?"),
                    row.get("parent") or "",
                ]
                if capabilities:
                    cells.append(", ".join(row.get("capabilities") or ()) or "?")
                rows.append(cells)
            lines.extend(_table(header, rows) if rows else ["  (no model matches)"])
        config = self._configuration()
        lines.append("nimpipe routes:")
        if config is None:
            lines.append("  (no configuration: set JAATO_NIM_BASE_URL and JAATO_NIM_MODEL)")
        else:
            lines.extend(_route_lines(config, search))
        return "\n".join(lines)

    def nim_status(self, args: Mapping[str, Any] | None = None) -> str:
        """``nim-status [--watch]``."""
        from nimpipe.jaato import _reports

        options, _ = _flags(args)
        watch = bool(options.get("watch"))
        pipelines = self._pipelines()
        banner = _offline_banner(pipelines)
        asked = None
        for pipeline in pipelines:
            asked = _reports.ask(pipeline, _reports.STATUS_HOOK)
            if asked is not None:
                break
        if asked is None:
            lines = [
                "Route status: not available: no health stage is enabled in nimpipe "
                f"(a stage implementing {_reports.STATUS_HOOK!r}); nothing was probed."
            ]
            if watch:
                lines.append("--watch needs the health stage too.")
            config = self._configuration()
            if config is not None:
                lines.append("nimpipe routes:")
                lines.extend(_route_lines(config))
            return "\n".join([*banner, *lines])
        samples = [asked]
        if watch:
            for _ in range(WATCH_SAMPLES - 1):
                time.sleep(WATCH_INTERVAL)
                samples.append(_reports.ask(pipeline, _reports.STATUS_HOOK) or [])
        lines = []
        keys = ("state", "ready", "waiting", "running", "kv_cache", "detail")
        for number, rows in enumerate(samples, 1):
            title = f"Route status (sample {number}/{len(samples)}):" if watch else "Route status:"
            lines.append(title)
            lines.extend(
                _table(
                    ("route", *keys),
                    ([row.get("route", "?"), *(row.get(k, "") for k in keys)] for row in rows),
                )
                if rows
                else ["  (no route reported)"]
            )
        return "\n".join([*banner, *lines])

    def nimpipe_cost(self, args: Mapping[str, Any] | None = None) -> str:
        """``nimpipe-cost``."""
        from nimpipe.jaato import _reports
        from nimpipe.jaato._pipelines import active_pipelines

        active = active_pipelines()
        if not active:
            return _NO_PROVIDER
        for shared in active:
            ledger = _reports.ask(shared.pipeline, _reports.COST_HOOK)
            if ledger is not None:
                return _ledger_report(ledger)
        return _tally_report(_merge(row for shared in active for row in shared.tally.summary()))


def _merge(rows: Iterable[AgentCost]) -> list[AgentCost]:
    import attrs

    merged: dict[tuple[str, str], AgentCost] = {}
    for row in rows:
        key = (row.agent_id, row.agent_type)
        seen = merged.get(key)
        merged[key] = (
            row
            if seen is None
            else attrs.evolve(
                seen,
                calls=seen.calls + row.calls,
                failed=seen.failed + row.failed,
                prompt_tokens=seen.prompt_tokens + row.prompt_tokens,
                completion_tokens=seen.completion_tokens + row.completion_tokens,
                cost_usd=seen.cost_usd + row.cost_usd,
                priced=seen.priced or row.priced,
            )
        )
    return sorted(merged.values(), key=lambda r: (r.agent_type != "main", r.agent_id))


def _money(value: float, priced: bool) -> str:
    return f"${value:.6f}" if priced else "unpriced"


def _tally_report(rows: list[AgentCost]) -> str:
    lines = [
        "nimpipe cost, this process (stage 'jaato_costs'; a persistent ledger needs a cost stage):"
    ]
    if not rows:
        lines.append("  (no model call yet)")
        return "\n".join(lines)
    total_priced = any(r.priced for r in rows)
    lines.extend(
        _table(
            ("agent", "type", "calls", "failed", "prompt tok", "output tok", "cost"),
            [
                *(
                    (
                        r.agent_id,
                        r.agent_type,
                        r.calls,
                        r.failed,
                        r.prompt_tokens,
                        r.completion_tokens,
                        _money(r.cost_usd, r.priced),
                    )
                    for r in rows
                ),
                (
                    "total",
                    "",
                    sum(r.calls for r in rows),
                    sum(r.failed for r in rows),
                    sum(r.prompt_tokens for r in rows),
                    sum(r.completion_tokens for r in rows),
                    _money(sum(r.cost_usd for r in rows), total_priced),
                ),
            ],
        )
    )
    return "\n".join(lines)


def _ledger_report(rows: list[Mapping[str, Any]]) -> str:
    keys = ("agent_type", "calls", "prompt_tokens", "completion_tokens", "cost_usd")
    lines = ["nimpipe cost (cost ledger stage):"]
    lines.extend(
        _table(
            ("agent", *keys),
            ([row.get("agent_id", "?"), *(row.get(k, "") for k in keys)] for row in rows),
        )
        if rows
        else ["  (no model call recorded)"]
    )
    return "\n".join(lines)


def create_plugin() -> NimpipeCommands:
    """Entry-point factory of the ``jaato.plugins`` group."""
    return NimpipeCommands()


def _offline_banner(pipelines: Any) -> list[str]:
    """A first line saying offline mode is on, when it is."""
    from nimpipe import offline

    if offline.is_enforced() or any(p.config.offline for p in pipelines):
        return ["Offline mode: on (only loopback and self-hosted routes are reached)."]
    return []
