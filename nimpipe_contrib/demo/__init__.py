"""The ``nimpipe demo`` command, added by :func:`register_commands`.

Importing this package is cheap (``nimpipe --help`` imports it); the demo
itself (:mod:`.run`) loads when the command runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nimpipe import hookimpl

if TYPE_CHECKING:
    import argparse

    from nimpipe import Config
    from nimpipe.cli import CommandRegistry

__all__ = ["register_commands", "run_demo_command"]


def run_demo_command(config: Config, args: argparse.Namespace) -> int:
    """Run ``nimpipe demo`` (:func:`nimpipe_contrib.demo.run.run_demo`)."""
    from nimpipe_contrib.demo.run import run_demo

    return run_demo(replay=args.replay, record=args.record, cassette=args.cassette)


@hookimpl
def register_commands(commands: CommandRegistry) -> None:
    """Add ``nimpipe demo [--replay | --record] [--cassette PATH]``."""
    demo = commands.add(
        "demo", help="run the pipeline on the embedded local model", run=run_demo_command
    )
    demo.add_argument("--replay", action="store_true", help="replay the recorded demo offline")
    demo.add_argument("--record", action="store_true", help="re-record the demo cassette")
    demo.add_argument("--cassette", metavar="PATH", help="cassette file for --replay/--record")
