"""The ``nimpipe`` command line.

``--help`` stays fast: this module imports only argparse at load time; each
command imports what it needs when it runs.  Stages and plugins add commands
through the ``register_commands`` hook (see :class:`CommandRegistry`): the
built-in command modules of :data:`nimpipe.plugins.BUILTIN_COMMANDS` and the
modules of installed ``nimpipe`` entry points are asked when the command line
starts.

Errors are one line on stderr, ``nimpipe: <message>``, and an exit code:
0 ok, 1 error, 2 configuration or usage error, 3 blocked (130 interrupted).
Any other exception (a bug) is one line too, with a hint: ``--debug`` (or
``NIMPIPE_DEBUG=1``) prints the traceback instead, for every error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline

#: Exit codes.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BLOCKED = 3
EXIT_INTERRUPTED = 130

#: Set to a true value to print tracebacks (as ``--debug`` does).
DEBUG_ENV = "NIMPIPE_DEBUG"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nimpipe",
        description="A middleware pipeline around every model call of NIM agents.",
    )
    parser.add_argument(
        "--config", metavar="PATH", help="config file (default: nimpipe.toml search)"
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--offline",
        action="store_true",
        help="offline mode: only local and self-hosted routes; any other host is refused",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of an error (also {DEBUG_ENV}=1)",
    )
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
    plugins.add_argument(
        "--all",
        action="store_true",
        help="also the stages and plugins that could be enabled, and how (* marks active ones)",
    )
    plugins.add_argument("--json", action="store_true", help="print as JSON")

    config = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    config.add_argument("--json", action="store_true", help="print as JSON")

    commands = CommandRegistry(sub, reserved=("chat", "plugins", "config"))
    _register_stage_commands(commands)

    parser.set_defaults(_registry=commands)
    return parser


class CommandRegistry:
    """The ``nimpipe`` subcommands that stages and plugins add (``register_commands`` hook).

    ``run(config, args)`` is called with the loaded configuration and the parsed
    arguments and returns the exit code; it is looked up only when its command runs.
    """

    def __init__(self, subparsers: Any, *, reserved: Sequence[str] = ()) -> None:
        self._sub = subparsers
        self._owners: dict[str, str] = {name: "nimpipe" for name in reserved}
        self.runners: dict[str, Callable[[Config, argparse.Namespace], int]] = {}
        #: The plugin whose ``register_commands`` is being called (named in errors).
        self.owner = "nimpipe"

    def add(
        self, name: str, *, help: str, run: Callable[[Config, argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        """Add command ``name``; returns its parser, for its options.

        Raises :class:`~nimpipe.errors.PluginLoadError` when ``name`` is taken.
        """
        if name in self._owners:
            from nimpipe.errors import PluginLoadError

            raise PluginLoadError(
                f"plugin {self.owner!r} registers command {name!r}, "
                f"which {self._owners[name]!r} already registers",
                plugin=self.owner,
            )
        if not callable(run):
            from nimpipe.errors import PluginLoadError

            raise PluginLoadError(
                f"plugin {self.owner!r} registers command {name!r} with a run that is not "
                f"callable ({type(run).__name__})",
                plugin=self.owner,
            )
        self._owners[name] = self.owner
        self.runners[name] = run
        parser: argparse.ArgumentParser = self._sub.add_parser(name, help=help)
        return parser

    def names(self) -> tuple[str, ...]:
        """The commands added through :meth:`add`, in order."""
        return tuple(self.runners)


def _command_plugins() -> list[tuple[str, Any]]:
    """The plugins asked for commands: the built-in command modules (those installed),
    then installed ``nimpipe`` entry points (as ``NIMPIPE_LOAD_PLUGINS`` and
    ``NIMPIPE_DISABLE_PLUGINS`` say; the config file is not read yet)."""
    import importlib

    from nimpipe.plugins import BUILTIN_COMMANDS, load_plugin_entry_points

    disabled = _env_names("NIMPIPE_DISABLE_PLUGINS") or ()
    out: list[tuple[str, Any]] = []
    for name, module_path in BUILTIN_COMMANDS.items():
        if name in disabled:
            continue
        try:
            out.append((name, importlib.import_module(module_path)))
        except ImportError:
            continue  # that stage package is not installed: no such command
    only = _env_names("NIMPIPE_LOAD_PLUGINS")
    if only is None or only:
        out.extend(load_plugin_entry_points(only, skip=disabled))
    return out


def _env_names(variable: str) -> tuple[str, ...] | None:
    """Comma-separated names from ``variable``; ``None`` when it is not set."""
    value = os.environ.get(variable)
    if value is None:
        return None
    return tuple(n.strip() for n in value.split(",") if n.strip())


def _register_stage_commands(commands: CommandRegistry) -> None:
    import pluggy

    from nimpipe import hookspecs
    from nimpipe._markers import PROJECT_NAME
    from nimpipe.errors import PluginLoadError

    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for name, plugin in _command_plugins():
        try:
            pm.register(plugin, name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            raise PluginLoadError(f"plugin {name!r} is invalid: {exc}", plugin=name) from exc
    # Earliest registered first, so that built-in commands come first in ``--help``.
    for impl in pm.hook.register_commands.get_hookimpls():
        commands.owner = impl.plugin_name
        try:
            impl.function(**{arg: commands for arg in impl.argnames})
        except PluginLoadError:
            raise
        except Exception as exc:
            raise PluginLoadError(
                f"plugin {impl.plugin_name!r} failed to register its commands: "
                f"{type(exc).__name__}: {exc}",
                plugin=impl.plugin_name,
            ) from exc
    commands.owner = "nimpipe"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = _build_parser()
    except Exception as exc:  # a plugin's commands: before --debug is parsed
        if _env_flag(DEBUG_ENV):
            import traceback

            traceback.print_exc(file=sys.stderr)
        code, message = _describe(exc)
        _fail(message if code is not None else f"internal error: {type(exc).__name__}: {message}")
        return code if code is not None else EXIT_ERROR
    args = parser.parse_args(argv)
    if args.version:
        from nimpipe import __version__

        print(f"nimpipe {__version__}")
        return EXIT_OK
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    debug = args.debug or _env_flag(DEBUG_ENV)
    try:
        handler = _COMMANDS.get(args.command)
        if handler is None:
            run = args._registry.runners[args.command]
            result: int = run(_load_config(args), args)
            return result
        return handler(args)
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``nimpipe chat ... | head``): nothing more to say to it.
        _silence_stdout()
        return EXIT_ERROR
    except Exception as exc:
        if debug:
            import traceback

            traceback.print_exc(file=sys.stderr)
        code, message = _describe(exc)
        if code is None:
            hint = "" if debug else f" (run with --debug or {DEBUG_ENV}=1 for the traceback)"
            _fail(f"internal error: {type(exc).__name__}: {message}{hint}")
            return EXIT_ERROR
        _fail(message)
        return code


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _describe(exc: BaseException) -> tuple[int | None, str]:
    """The exit code and message for ``exc``; code ``None`` for an exception nimpipe did not
    raise on purpose."""
    from nimpipe.errors import BlockedError, ConfigError, NimpipeError, PluginLoadError

    if isinstance(exc, ConfigError):
        return EXIT_USAGE, f"config error: {exc}"
    if isinstance(exc, PluginLoadError):
        return EXIT_USAGE, f"plugin error: {exc}"
    if isinstance(exc, BlockedError):
        return EXIT_BLOCKED, str(exc)
    if isinstance(exc, NimpipeError):
        return EXIT_ERROR, f"error: {exc}"
    return None, str(exc)


def _one_line(text: str) -> str:
    from nimpipe.redaction import scrub

    return " ".join(scrub(text).split())


def _fail(message: str) -> None:
    """Print ``nimpipe: MESSAGE`` on stderr, on one line, any credential masked."""
    try:
        sys.stderr.write(f"nimpipe: {_one_line(message)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr is gone: the exit code still says it


def _silence_stdout() -> None:
    # Python flushes stdout at exit and would report the broken pipe again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _load_config(args: argparse.Namespace) -> Config:
    import attrs

    from nimpipe.config import Config

    config = Config.load(args.config)
    if args.offline and not config.offline:
        config = attrs.evolve(config, offline=True)
    if config.offline:
        print("nimpipe: offline mode is on (only local and self-hosted routes)", file=sys.stderr)
    return config


def _pipeline(args: argparse.Namespace) -> Pipeline:
    from nimpipe.pipeline import Pipeline

    return Pipeline.create(_load_config(args))


def _read_prompt(args: argparse.Namespace) -> str:
    from nimpipe.errors import ConfigError

    if args.prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"standard input is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                f"{exc.start})",
                key="prompt",
            ) from None
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the locale could not decode arrive as surrogates
        raise ConfigError("the prompt is not valid UTF-8 text", key="prompt") from None
    prompt: str = args.prompt
    return prompt


def _print_stream(stream: Any) -> None:
    """Write each released chunk as it comes; the line is ended even when the stream fails."""
    from nimpipe.errors import MalformedReplyError

    written = False
    try:
        for chunk in stream:
            if not isinstance(chunk, str):
                # The pipeline releases text only; never let a bad chunk crash the printer.
                raise MalformedReplyError(
                    f"the stream released a {type(chunk).__name__} where text was expected"
                )
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
                written = True
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        if written:
            sys.stdout.write("\n")
            sys.stdout.flush()


def _cmd_chat(args: argparse.Namespace) -> int:
    from nimpipe.types import Turn

    prompt = _read_prompt(args)
    turn = Turn.create(
        prompt, system=args.system, timeout=args.timeout, route=args.route, model=args.model
    )
    with _pipeline(args) as pipeline:
        if args.stream and not args.json:
            stream = pipeline.stream(turn)
            _print_stream(stream)
            result = stream.result
        else:
            result = pipeline.run(turn)
    if result is None:
        from nimpipe.errors import NimpipeError

        raise NimpipeError("the stream ended without a result")
    if args.json:
        print(json.dumps(_result_json(result), indent=2, default=str))
    elif not args.stream:
        print(result.text)
    if result.blocked is not None:
        _fail(f"blocked by {result.blocked.plugin}: {result.blocked.reason}")
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
    import attrs

    with _pipeline(args) as pipeline:
        infos = pipeline.plugins.info()
        if args.all:
            from nimpipe.plugins import plugin_statuses

            statuses = plugin_statuses(pipeline.config, pipeline.plugins)
    if args.all:
        if args.json:
            print(json.dumps([attrs.asdict(s) for s in statuses], indent=2))
            return EXIT_OK
        width = max((len(s.name) for s in statuses), default=4)
        for status in statuses:
            mark = "*" if status.active else " "
            detail = ", ".join(status.hooks) if status.active else status.how
            print(
                f"{mark} {status.name:<{width}}  {status.version or '-':<8}  {status.kind:<10}  "
                f"{detail}"
            )
        print("\n* active; the others are installed and can be enabled as shown")
        return EXIT_OK
    if args.json:
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
    from nimpipe.plugins import check_stages

    config = _load_config(args)
    check_stages(config)
    data = config.masked()
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


_COMMANDS = {
    "chat": _cmd_chat,
    "plugins": _cmd_plugins,
    "config": _cmd_config,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
