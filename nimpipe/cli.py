"""The ``nimpipe`` command line.

``--help`` stays fast: this module imports only argparse at load time; each
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline

#: Exit codes.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BLOCKED = 3


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nimpipe",
        description="A middleware pipeline around every model call of NIM agents.",
    )
    parser.add_argument(
        "--config", metavar="PATH", help="config file (default: nimpipe.toml search)"
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    chat = sub.add_parser("chat", help="run one turn through the pipeline and print the answer")
    chat.add_argument("prompt", help="the user message ('-' reads standard input)")
    chat.add_argument("--route", help="route name (default: chosen by the stages)")
    chat.add_argument("--model", help="model to ask for")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--stream", action="store_true", help="stream the answer")
    chat.add_argument(
        "--timeout", type=float, default=120.0, help="turn deadline in seconds (default 120)"
    )
    chat.add_argument("--json", action="store_true", help="print the result as JSON")

    plugins = sub.add_parser("plugins", help="list plugins, their versions and hooks")
    plugins.add_argument("--json", action="store_true", help="print as JSON")

    config = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    config.add_argument("--json", action="store_true", help="print as JSON")

    demo = sub.add_parser("demo", help="run the pipeline on the embedded local model")
    demo.add_argument("--replay", action="store_true", help="replay the recorded demo offline")
    demo.add_argument("--record", action="store_true", help="re-record the demo cassette")
    demo.add_argument("--cassette", metavar="PATH", help="cassette file for --replay/--record")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from nimpipe import __version__

        print(f"nimpipe {__version__}")
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from nimpipe.errors import ConfigError, NimpipeError

    try:
        handler = _COMMANDS[args.command]
        return handler(args)
    except ConfigError as exc:
        print(f"nimpipe: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NimpipeError as exc:
        print(f"nimpipe: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("nimpipe: interrupted", file=sys.stderr)
        return 130


def _load_config(args: argparse.Namespace) -> Config:
    from nimpipe.config import Config

    return Config.load(args.config)


def _pipeline(args: argparse.Namespace) -> Pipeline:
    from nimpipe.pipeline import Pipeline

    return Pipeline.create(_load_config(args))


def _cmd_chat(args: argparse.Namespace) -> int:
    from nimpipe.types import Turn

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    turn = Turn.create(
        prompt, system=args.system, timeout=args.timeout, route=args.route, model=args.model
    )
    with _pipeline(args) as pipeline:
        if args.stream and not args.json:
            stream = pipeline.stream(turn)
            for chunk in stream:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            sys.stdout.write("\n")
            result = stream.result
        else:
            result = pipeline.run(turn)
    assert result is not None
    if args.json:
        print(json.dumps(_result_json(result), indent=2))
    elif not args.stream:
        print(result.text)
    if result.blocked is not None:
        print(
            f"nimpipe: blocked by {result.blocked.plugin}: {result.blocked.reason}", file=sys.stderr
        )
        return EXIT_BLOCKED
    return EXIT_OK


def _result_json(result: Any) -> dict[str, Any]:
    import attrs

    response = result.response
    return {
        "turn_id": result.turn.id,
        "text": result.text,
        "route": result.route.name if result.route else None,
        "blocked": attrs.asdict(result.blocked) if result.blocked else None,
        "finish_reason": result.finish_reason.value,
        "usage": attrs.asdict(response.usage) if response else None,
        "tool_calls": [attrs.asdict(c) for c in result.tool_calls],
        "records": [attrs.asdict(r) for r in result.records],
    }


def _cmd_plugins(args: argparse.Namespace) -> int:
    with _pipeline(args) as pipeline:
        infos = pipeline.plugins.info()
    if args.json:
        import attrs

        print(json.dumps([attrs.asdict(i) for i in infos], indent=2))
        return EXIT_OK
    width = max((len(i.name) for i in infos), default=4)
    for info in infos:
        print(
            f"{info.name:<{width}}  {info.version or '-':<8}  {info.kind:<10}  "
            f"{', '.join(info.hooks)}"
        )
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    data = _load_config(args).masked()
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"# source: {data.pop('source') or '(no file; environment only)'}")
    routes = data.pop("routes")
    for key, value in data.items():
        print(f"{key} = {json.dumps(value)}")
    for name, route in routes.items():
        print(f"\n[routes.{name}]")
        for key, value in route.items():
            print(f"{key} = {json.dumps(value)}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from nimpipe.demo import run_demo

    return run_demo(replay=args.replay, record=args.record, cassette=args.cassette)


_COMMANDS = {
    "chat": _cmd_chat,
    "plugins": _cmd_plugins,
    "config": _cmd_config,
    "demo": _cmd_demo,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
