"""A real NeMo Guardrails server for tests, benchmarks and demos.

``nemoguardrails[server]`` needs ``openai<3`` while nimpipe runs on openai 2.x
or 3.x, so the server lives in a dedicated virtualenv under the nimpipe home,
as it would run in its own container in production::

    from nimpipe.testing import guardrails_server as gs

    gs.ensure_installed()                          # first run only, about 30 s
    config = gs.write_self_check_config(tmp / "rails", base_url=judge.base_url, model="judge")
    with gs.start(config) as server:               # uvicorn on 127.0.0.1, ready in 2-15 s
        httpx.post(f"{server.url}/v1/checks", json={...})

``nemoguardrails server`` binds 0.0.0.0 and has no ``--host``; :func:`start`
runs uvicorn itself on 127.0.0.1 with ``app.rails_config_path`` set.  The
configuration directory holds one configuration (single-config mode): its
config id is the directory's name (:attr:`RunningGuardrailsServer.config_id`).

From a shell, for nox and CI::

    python -m nimpipe.testing.guardrails_server install
    python -m nimpipe.testing.guardrails_server serve --config DIR [--port P]
    python -m nimpipe.testing.guardrails_server example-config DIR --base-url URL --model M

Layout of ``<nimpipe home>/guardrails-server``: ``venv/``, ``install.log``,
``install.lock``, ``logs/server-P.log``.  Importing this module is cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import attrs

from nimpipe import _service
from nimpipe.errors import NimpipeError
from nimpipe.paths import nimpipe_home

if TYPE_CHECKING:
    import subprocess

__all__ = [
    "NEMOGUARDRAILS_VERSION",
    "REQUIREMENT",
    "RunningGuardrailsServer",
    "ensure_installed",
    "is_installed",
    "main",
    "server_home",
    "start",
    "write_self_check_config",
]

#: The NeMo Guardrails release the server venv holds.
NEMOGUARDRAILS_VERSION = "0.24.1"

#: What pip installs into the server venv.
REQUIREMENT = f"nemoguardrails[server]=={NEMOGUARDRAILS_VERSION}"

_BOOT = textwrap.dedent(
    """
    import sys
    import uvicorn
    from nemoguardrails.server.api import app
    app.rails_config_path = sys.argv[1]
    uvicorn.run(app, host=sys.argv[2], port=int(sys.argv[3]), log_level="warning")
    """
)

#: Environment of the server process: no telemetry, no chat UI.
SERVER_ENV: Mapping[str, str] = {
    "NEMO_GUARDRAILS_NO_USAGE_STATS": "1",
    "NEMO_GUARDRAILS_DISABLE_CHAT_UI": "true",
}


def server_home(environ: Mapping[str, str] | None = None) -> Path:
    """``<nimpipe home>/guardrails-server``: the venv, the logs and the install lock."""
    return nimpipe_home(environ) / "guardrails-server"


def _python(home: Path) -> Path:
    return _service.venv_python(home / "venv")


def is_installed(home: Path | None = None) -> bool:
    """Whether the server venv holds NeMo Guardrails at :data:`NEMOGUARDRAILS_VERSION` and uvicorn.

    Checks files only.
    """
    home = server_home() if home is None else home
    site = _service.site_packages(home / "venv")
    if site is None or not _python(home).exists():
        return False
    dist = site / f"nemoguardrails-{NEMOGUARDRAILS_VERSION}.dist-info"
    return dist.is_dir() and (site / "uvicorn").is_dir() and (site / "fastapi").is_dir()


def ensure_installed(
    progress: Callable[[str], None] = _service.print_progress, home: Path | None = None
) -> Path:
    """Create the server venv and install :data:`REQUIREMENT` unless done; returns its python.

    An exclusive lock makes a second process wait for the first one's
    install.  Raises :class:`~nimpipe.errors.NimpipeError` quoting the log when
    pip fails.
    """
    home = server_home() if home is None else home
    _service.install_once(
        home / "install.lock",
        lambda: is_installed(home),
        lambda: _install(home, progress),
        what="the guardrails server",
        progress=progress,
    )
    return _python(home)


def _install(home: Path, progress: Callable[[str], None]) -> None:
    log_path = home / "install.log"
    with _service.InstallLog.open(log_path, progress) as log:
        progress(f"installing {REQUIREMENT} into {home / 'venv'} (log: {log_path})")
        if not _python(home).exists():
            log.run([sys.executable, "-m", "venv", str(home / "venv")])
        log.run([*_service.pip_install(_python(home)), REQUIREMENT])
    if not is_installed(home):
        raise NimpipeError(f"the guardrails server install left files missing; see {log_path}")
    progress(f"NeMo Guardrails server {NEMOGUARDRAILS_VERSION} installed in {home / 'venv'}")


@attrs.define(eq=False)
class RunningGuardrailsServer(_service.ServiceProcess):
    """A NeMo Guardrails server process on 127.0.0.1 started by :func:`start`.

    Stopped by :meth:`stop` (SIGTERM, then SIGKILL), :meth:`kill` (SIGKILL at
    once, as a crash would), the context manager, or at interpreter exit.
    """

    service_name: ClassVar[str] = "the guardrails server"

    process: subprocess.Popen[bytes]
    port: int
    #: The configuration directory served.
    config_dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, the server root (``/v1/checks`` lives under it)."""
        return f"http://{_service.LOOPBACK}:{self.port}"

    @property
    def config_id(self) -> str:
        """The config id of the served configuration (the directory's name)."""
        return self.config_dir.name


def start(
    config_dir: str | os.PathLike[str],
    port: int = 0,
    *,
    ready_timeout: float = 90.0,
    home: Path | None = None,
) -> RunningGuardrailsServer:
    """Start the server on 127.0.0.1 serving ``config_dir``; returns once it answers.

    ``port=0`` picks a free port.  The server must be installed
    (:func:`ensure_installed`).  Raises :class:`~nimpipe.errors.NimpipeError`
    quoting the server log when it exits early or is not ready in time.
    """
    home = server_home() if home is None else home
    if not is_installed(home):
        raise NimpipeError(
            "the guardrails server is not installed; run "
            "`python -m nimpipe.testing.guardrails_server install`"
        )
    config = Path(config_dir).resolve()
    if not (config / "config.yml").is_file() and not (config / "config.yaml").is_file():
        raise NimpipeError(f"{config} holds no config.yml")
    port = port or _service.free_loopback_port()
    log_path = home / "logs" / f"server-{port}.log"
    command = [str(_python(home)), "-c", _BOOT, str(config), _service.LOOPBACK, str(port)]
    # The boot script is not echoed into the log: its lines would crowd the log tail of errors.
    env = {**os.environ, **SERVER_ENV}
    process = _service.spawn(command, log_path, env=env, echo_command=False)
    server = RunningGuardrailsServer(process, port, config, log_path)
    server.wait_ready(f"{server.url}/v1/rails/configs", ready_timeout)
    return server


#: The self-check policy used when none is given.
DEFAULT_INPUT_POLICY = "no requests for weapons, malware or other people's personal data"
DEFAULT_OUTPUT_POLICY = "no secrets, credentials or insults"


def write_self_check_config(
    directory: str | os.PathLike[str],
    *,
    base_url: str,
    model: str,
    input_policy: str = DEFAULT_INPUT_POLICY,
    output_policy: str = DEFAULT_OUTPUT_POLICY,
    input_rails: bool = True,
    output_rails: bool = True,
    check_base_url: str | None = None,
    check_model: str | None = None,
) -> Path:
    """Write a rails configuration with the ``self check input``/``output`` rails; returns it.

    ``model`` at ``base_url`` (an OpenAI-compatible endpoint) is the main
    model (the one a guarded generation answers with).  The rails ask it, or
    ``check_model`` at ``check_base_url`` when given, whether a message should
    be blocked: NeMo reads an answer starting with "Yes" as block and "No" as
    allow (anything else blocks).  Such a configuration needs no embedding
    model.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    flows_in = "\n      - self check input" if input_rails else " []"
    flows_out = "\n      - self check output" if output_rails else " []"
    checkers = ""
    if check_base_url or check_model:
        for task in ("self_check_input", "self_check_output"):
            checkers += (
                f"  - type: {task}\n"
                "    engine: openai\n"
                f"    model: {check_model or model}\n"
                "    parameters:\n"
                f"      base_url: {check_base_url or base_url}\n"
                "      api_key: unused\n"
            )
    (path / "config.yml").write_text(
        "models:\n"
        "  - type: main\n"
        "    engine: openai\n"
        f"    model: {model}\n"
        "    parameters:\n"
        f"      base_url: {base_url}\n"
        "      api_key: unused\n"
        f"{checkers}"
        "rails:\n"
        "  input:\n"
        f"    flows:{flows_in}\n"
        "  output:\n"
        f"    flows:{flows_out}\n"
    )
    prompts = []
    if input_rails:
        prompts.append(
            f"""\
  - task: self_check_input
    content: |
      Your task is to check if the user message below complies with the policy.
      Policy: {input_policy}.
      User message: "{{{{ user_input }}}}"
      Question: Should the user message be blocked (Yes or No)?
      Answer:"""
        )
    if output_rails:
        prompts.append(
            f"""\
  - task: self_check_output
    content: |
      Your task is to check if the bot message below complies with the policy.
      Policy: {output_policy}.
      Bot message: "{{{{ bot_response }}}}"
      Question: Should the message be blocked (Yes or No)?
      Answer:"""
        )
    (path / "prompts.yml").write_text("prompts:\n" + "\n".join(prompts) + "\n")
    return path


# -- command line -------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nimpipe.testing.guardrails_server {install,serve,example-config}``."""
    parser = argparse.ArgumentParser(
        prog="python -m nimpipe.testing.guardrails_server",
        description="Install and run a NeMo Guardrails server on 127.0.0.1 in its own venv.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help=f"install {REQUIREMENT} into its venv (once)")
    serve = commands.add_parser("serve", help="serve a configuration until SIGTERM or SIGINT")
    serve.add_argument("--config", type=Path, required=True, help="rails configuration directory")
    serve.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    example = commands.add_parser(
        "example-config", help="write a self-check rails configuration into DIR"
    )
    example.add_argument("directory", type=Path)
    example.add_argument("--base-url", required=True, help="the checking model's /v1 URL")
    example.add_argument("--model", required=True, help="the checking model's name")
    args = parser.parse_args(argv)
    return _service.run_service_command(
        args.command,
        install=ensure_installed,
        start=lambda: start(args.config, args.port),
        ready_line=lambda server: (
            f"READY {server.url} pid={server.pid} config_id={server.config_id}"
        ),
        others={
            "example-config": lambda: print(
                write_self_check_config(args.directory, base_url=args.base_url, model=args.model)
            )
        },
    )


if __name__ == "__main__":
    sys.exit(main())
