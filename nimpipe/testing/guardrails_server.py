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
import atexit
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import attrs

from nimpipe.embedded import nimpipe_home
from nimpipe.errors import NimpipeError

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

_LOOPBACK = "127.0.0.1"

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
    return home / "venv" / "bin" / "python"


def _site_packages(home: Path) -> Path | None:
    found = sorted((home / "venv").glob("lib/python*/site-packages"))
    return found[-1] if found else None


def is_installed(home: Path | None = None) -> bool:
    """Whether the server venv holds NeMo Guardrails at :data:`NEMOGUARDRAILS_VERSION` and uvicorn.

    Checks files only.
    """
    home = server_home() if home is None else home
    site = _site_packages(home)
    if site is None or not _python(home).exists():
        return False
    dist = site / f"nemoguardrails-{NEMOGUARDRAILS_VERSION}.dist-info"
    return dist.is_dir() and (site / "uvicorn").is_dir() and (site / "fastapi").is_dir()


def _print_progress(message: str) -> None:
    print(f"nimpipe: {message}", file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def ensure_installed(
    progress: Callable[[str], None] = _print_progress, home: Path | None = None
) -> Path:
    """Create the server venv and install :data:`REQUIREMENT` unless done; returns its python.

    An exclusive lock makes a second process wait for the first one's
    install.  Raises :class:`~nimpipe.errors.NimpipeError` quoting the log when
    pip fails.
    """
    import fcntl

    home = server_home() if home is None else home
    if is_installed(home):
        return _python(home)
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "install.log"
    with open(home / "install.lock", "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("another process is installing the guardrails server; waiting")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_installed(home):
                return _python(home)
            with open(log_path, "w", encoding="utf-8") as log:
                steps: list[list[str]] = []
                if not _python(home).exists():
                    steps.append([sys.executable, "-m", "venv", str(home / "venv")])
                pip = [str(_python(home)), "-m", "pip", "install", "--disable-pip-version-check"]
                steps.append([*pip, "--no-input", "--progress-bar", "off", REQUIREMENT])
                progress(f"installing {REQUIREMENT} into {home / 'venv'} (log: {log_path})")
                for command in steps:
                    log.write(f"$ {' '.join(command)}\n")
                    log.flush()
                    code = subprocess.call(
                        command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                    )
                    if code != 0:
                        raise NimpipeError(
                            f"`{' '.join(command)}` failed with exit code {code}; see {log_path}:\n"
                            f"{_tail(log_path)}"
                        )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if not is_installed(home):
        raise NimpipeError(f"the guardrails server install left files missing; see {log_path}")
    progress(f"NeMo Guardrails server {NEMOGUARDRAILS_VERSION} installed in {home / 'venv'}")
    return _python(home)


_LIVE: set[RunningGuardrailsServer] = set()
_LIVE_LOCK = threading.Lock()
_ATEXIT = False


def _stop_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        server.stop()


@attrs.define(eq=False)
class RunningGuardrailsServer:
    """A NeMo Guardrails server process on 127.0.0.1 started by :func:`start`.

    Stopped by :meth:`stop` (SIGTERM, then SIGKILL), :meth:`kill` (SIGKILL at
    once, as a crash would), the context manager, or at interpreter exit.
    """

    process: subprocess.Popen[bytes]
    port: int
    #: The configuration directory served.
    config_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        """Process id of the server."""
        return self.process.pid

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, the server root (``/v1/checks`` lives under it)."""
        return f"http://{_LOOPBACK}:{self.port}"

    @property
    def config_id(self) -> str:
        """The config id of the served configuration (the directory's name)."""
        return self.config_dir.name

    def is_running(self) -> bool:
        """Whether the process is alive."""
        return self.process.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; waits for the exit (idempotent)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL the server by its pid, as a crash would; waits for the exit."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def log_tail(self, lines: int = 25) -> str:
        """The end of the server's log."""
        return _tail(self.log_path, lines)

    def __enter__(self) -> RunningGuardrailsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


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
    global _ATEXIT
    home = server_home() if home is None else home
    if not is_installed(home):
        raise NimpipeError(
            "the guardrails server is not installed; run "
            "`python -m nimpipe.testing.guardrails_server install`"
        )
    config = Path(config_dir).resolve()
    if not (config / "config.yml").is_file() and not (config / "config.yaml").is_file():
        raise NimpipeError(f"{config} holds no config.yml")
    port = port or _free_port()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"server-{port}.log"
    env = {**os.environ, **SERVER_ENV}
    command = [str(_python(home)), "-c", _BOOT, str(config), _LOOPBACK, str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    server = RunningGuardrailsServer(process, port, config, log_path)
    with _LIVE_LOCK:
        if not _ATEXIT:
            atexit.register(_stop_all)
            _ATEXIT = True
        _LIVE.add(server)
    try:
        _wait_ready(server, ready_timeout)
    except BaseException:
        server.stop(grace=1.0)
        raise
    return server


def _wait_ready(server: RunningGuardrailsServer, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    url = f"{server.url}/v1/rails/configs"
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while True:
            code = server.process.poll()
            if code is not None:
                raise NimpipeError(
                    f"the guardrails server exited with code {code} before it was ready; "
                    f"log {server.log_path}:\n{server.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise NimpipeError(
                    f"the guardrails server (pid {server.pid}) did not answer {url} within "
                    f"{timeout:g} s; log {server.log_path}:\n{server.log_tail()}"
                )
            time.sleep(0.1)


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


def _serve(config: Path, port: int) -> int:
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with start(config, port) as server:
            print(f"READY {server.url} pid={server.pid} config_id={server.config_id}", flush=True)
            while not stop.wait(0.5):
                if not server.is_running():
                    _print_progress(f"the guardrails server exited:\n{server.log_tail()}")
                    return 1
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    try:
        if args.command == "install":
            ensure_installed()
            return 0
        if args.command == "example-config":
            print(write_self_check_config(args.directory, base_url=args.base_url, model=args.model))
            return 0
        ensure_installed()
        return _serve(args.config, args.port)
    except NimpipeError as exc:
        _print_progress(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
