"""The ``nimpipe cost`` command, added by :func:`register_commands`.

Importing this module is cheap (``nimpipe --help`` imports it); the ledger
loads when the command runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nimpipe import hookimpl

if TYPE_CHECKING:
    import argparse

    from nimpipe import Config
    from nimpipe.cli import CommandRegistry

__all__ = ["register_commands", "run_cost"]


def run_cost(config: Config, args: argparse.Namespace) -> int:
    """Run ``nimpipe cost`` (:func:`nimpipe_contrib.cost.reports.run_cost_command`)."""
    from nimpipe_contrib.cost.reports import run_cost_command

    return run_cost_command(config, args)


@hookimpl
def register_commands(commands: CommandRegistry) -> None:
    """Add ``nimpipe cost [--by route|model|agent|day] [--since WHEN] [--json|--csv]``."""
    cost = commands.add("cost", help="spend from the ledger, grouped", run=run_cost)
    cost.add_argument(
        "--by",
        choices=("route", "model", "agent", "day"),
        default="route",
        help="grouping (default route)",
    )
    cost.add_argument(
        "--since", metavar="WHEN", help="only calls since WHEN (ISO date or e.g. 7d, 24h)"
    )
    output = cost.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print as JSON")
    output.add_argument("--csv", action="store_true", help="print as CSV")
