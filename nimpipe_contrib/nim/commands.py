"""The ``nimpipe models`` and ``nimpipe status`` commands, added by :func:`register_commands`.

Both work whether or not the stages are enabled: they read the stages'
settings from the config when present and build their own catalog or
monitor, without a pipeline.  Importing this module is cheap (``nimpipe
--help`` imports it); the catalog and the monitor load when a command runs.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

from nimpipe import hookimpl

if TYPE_CHECKING:
    import argparse

    from nimpipe import Config
    from nimpipe.cli import CommandRegistry

__all__ = ["register_commands", "run_models_command", "run_status_command"]


@hookimpl
def register_commands(commands: CommandRegistry) -> None:
    """Add ``nimpipe models`` and ``nimpipe status``."""
    models = commands.add(
        "models",
        help="list the models of every configured NIM endpoint",
        run=run_models_command,
    )
    models.add_argument("--search", metavar="TEXT", help="only models whose id contains TEXT")
    models.add_argument(
        "--capabilities", action="store_true", help="show context length and features"
    )
    models.add_argument("--json", action="store_true", help="print as JSON")
    models.add_argument("--refresh", action="store_true", help="ignore the cached catalog")

    status = commands.add(
        "status", help="health, load and models of every endpoint", run=run_status_command
    )
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    status.add_argument("--json", action="store_true", help="print as JSON")


def run_models_command(config: Config, args: argparse.Namespace) -> int:
    """``nimpipe models [--search X] [--capabilities] [--json] [--refresh]``; returns the exit code.

    0 when a catalog (fresh or cached) was found for at least one endpoint,
    1 when none was, 2 when no route is configured.
    """
    from nimpipe_contrib.nim.known_models import load_snapshot
    from nimpipe_contrib.nim.model_catalog import ModelCatalog
    from nimpipe_contrib.nim.reports import models_report

    if not config.routes:
        print(
            "nimpipe models: no endpoint is configured: add [routes.NAME] to nimpipe.toml "
            "or set NIMPIPE_BASE_URL and NIMPIPE_MODEL",
            file=sys.stderr,
        )
        return 2
    catalog = ModelCatalog.from_config(config)
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


def run_status_command(
    config: Config, args: argparse.Namespace, *, samples: int | None = None
) -> int:
    """``nimpipe status [--watch] [--interval S] [--json]``; returns the exit code.

    Probes every endpoint of the configured routes (offline: the local ones)
    and prints endpoint, health, probe latency, models, context, queue depth,
    running requests, KV-cache use and tokens/s (from the second sample on).
    ``--watch`` repeats every ``--interval`` seconds until interrupted (or
    ``samples`` times); with ``--json`` each sample is one JSON document per
    line.  Exit code: 0 when every endpoint is ready, 1 otherwise, 2 with no
    route configured.
    """
    from nimpipe_contrib.nim.monitor import HealthMonitor
    from nimpipe_contrib.nim.reports import status_report, status_row

    if not config.routes:
        print(
            "nimpipe status: no endpoint is configured: add [routes.NAME] to nimpipe.toml "
            "or set NIMPIPE_BASE_URL and NIMPIPE_MODEL",
            file=sys.stderr,
        )
        return 2
    monitor = HealthMonitor.from_config(config)
    watch = bool(getattr(args, "watch", False))
    interval = max(0.1, float(getattr(args, "interval", 2.0) or 2.0))
    count = samples if samples is not None else (None if watch else 1)
    code = 1
    try:
        taken = 0
        while count is None or taken < count:
            if taken:
                time.sleep(interval)
            monitor.probe()
            rows = [
                status_row(monitor.registry.snapshot(e.url), monitor.settings, e)
                for e in monitor.endpoints()
            ]
            skipped = [
                e.url for e in monitor.endpoints() if not e.may_probe(offline=monitor.offline())
            ]
            taken += 1
            if args.json:
                payload: Any = rows if not watch else {"time": time.time(), "endpoints": rows}
                print(json.dumps(payload, indent=None if watch else 2), flush=True)
            else:
                if watch:
                    print(time.strftime("%H:%M:%S"), flush=True)
                for line in status_report(rows):
                    print(line, flush=True)
                for url in skipped:
                    print(f"nimpipe status: {url}: not probed (offline)", file=sys.stderr)
            code = 0 if all(r["state"] == "ready" for r in rows) else 1
    except KeyboardInterrupt:
        if not watch:
            raise
    finally:
        monitor.close()
    return code
