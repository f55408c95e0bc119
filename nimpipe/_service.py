"""Servers that live in a dedicated virtualenv: install once, serve on a loopback port.

:mod:`nimpipe.embedded` (llama.cpp's server) and
:mod:`nimpipe.testing.guardrails_server` (NeMo Guardrails) each keep a
virtualenv under the nimpipe home, install into it under a file lock, and run
a server process on 127.0.0.1 that is stopped when the interpreter exits.
This module holds what they share.  Importing it is cheap: ``subprocess``,
``socket``, ``signal``, ``fcntl`` and ``httpx`` are imported by the functions
that use them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, ClassVar, TypeVar

import attrs

from nimpipe.errors import NimpipeError

if TYPE_CHECKING:
    import subprocess

__all__ = [
    "LOOPBACK",
    "InstallLog",
    "ServiceProcess",
    "free_loopback_port",
    "install_once",
    "log_tail",
    "pip_install",
    "print_progress",
    "run_service_command",
    "site_packages",
    "spawn",
    "venv_python",
]

#: The only interface the servers bind.
LOOPBACK = "127.0.0.1"

_S = TypeVar("_S", bound="ServiceProcess")


def print_progress(message: str) -> None:
    """Write ``nimpipe: <message>`` to stderr; the default progress reporter."""
    print(f"nimpipe: {message}", file=sys.stderr, flush=True)


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of the log at ``path``, or ``(no log)`` when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def free_loopback_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (another process may still take it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


# -- installation -------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    """The interpreter of the virtualenv ``venv``."""
    return venv / "bin" / "python"


def site_packages(venv: Path) -> Path | None:
    """The site-packages directory of the virtualenv ``venv``, or ``None`` when there is none."""
    found = sorted(venv.glob("lib/python*/site-packages"))
    return found[-1] if found else None


def pip_install(python: Path) -> list[str]:
    """The start of a quiet, non-interactive ``pip install`` with the interpreter ``python``."""
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check",
            "--no-input", "--progress-bar", "off"]  # fmt: skip


def install_once(
    lock_path: Path,
    is_installed: Callable[[], bool],
    install: Callable[[], None],
    *,
    what: str,
    progress: Callable[[str], None],
) -> None:
    """Call ``install()`` unless ``is_installed()``, holding an exclusive lock on ``lock_path``.

    Returns at once when already installed.  A process that finds the lock
    taken reports that it waits for the other install of ``what``, then
    checks again, so that it reuses that install instead of repeating it.
    """
    if is_installed():
        return
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"another process is installing {what}; waiting")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if is_installed():
                return
            install()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@attrs.define
class InstallLog:
    """An install log open for writing: runs the install's commands with their output in it.

    Open one with :meth:`open`.  A failed command raises
    :class:`~nimpipe.errors.NimpipeError` naming the log and quoting its end.
    """

    #: Where the log is.
    path: Path
    #: The open log file.
    file: IO[str]
    #: Receives progress messages.
    progress: Callable[[str], None]
    #: Seconds between heartbeat messages of a long command.
    interval: float = 30.0

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        path: Path,
        progress: Callable[[str], None],
        *,
        interval: float = 30.0,
        header: str | None = None,
    ) -> Iterator[InstallLog]:
        """Truncate ``path``, write ``header`` as its first line if given, and yield the log."""
        with open(path, "w", encoding="utf-8") as file:
            if header is not None:
                file.write(f"{header}\n")
                file.flush()
            yield cls(path, file, progress, interval)

    def run(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        heartbeat: str | None = None,
    ) -> None:
        """Run ``command`` with stdin closed, its output into the log; raise if it fails.

        With ``heartbeat``, reports ``"<heartbeat>, <seconds> s"`` every
        :attr:`interval` seconds while the command runs.  An interruption
        (Ctrl-C, or a signal turned into an exception) kills the command.
        """
        import subprocess

        self.file.write(f"$ {' '.join(command)}\n")
        self.file.flush()
        started = time.monotonic()
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=self.file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            while True:
                try:
                    code = process.wait(timeout=self.interval)
                    break
                except subprocess.TimeoutExpired:
                    if heartbeat:
                        self.progress(f"{heartbeat}, {time.monotonic() - started:.0f} s")
        except BaseException:
            process.kill()
            process.wait()
            raise
        self.file.write(f"# exit code {code} after {time.monotonic() - started:.0f} s\n")
        self.file.flush()
        if code != 0:
            raise NimpipeError(
                f"`{' '.join(command)}` failed with exit code {code}; see {self.path}:\n"
                f"{log_tail(self.path)}"
            )


# -- running servers ----------------------------------------------------------


def spawn(
    command: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    echo_command: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``command`` with stdin closed and its output in a fresh ``log_path``.

    ``echo_command`` writes the command line at the top of the log first.
    """
    import subprocess

    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        if echo_command:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
        return subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )


# Servers started by this process and not yet stopped; stopped at interpreter exit
# so that a forgotten server does not outlive the program that started it.
_LIVE: set[ServiceProcess] = set()
_LIVE_LOCK = threading.Lock()
_ATEXIT_REGISTERED = False


def _stop_live_servers() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        server.stop()


class ServiceProcess:
    """What every running-server handle has: a process on a loopback port, logging to a file.

    Subclasses are ``@attrs.define(eq=False)`` classes with the fields
    ``process``, ``port`` and ``log_path``.  Use one as a context manager, or
    call :meth:`stop` or :meth:`kill`; stopping twice is harmless.  After
    :meth:`wait_ready`, a server still running at interpreter exit is stopped.
    """

    __slots__ = ()

    #: How messages name the server, e.g. ``"the llama.cpp server"``.
    service_name: ClassVar[str] = "the server"

    #: The server process.
    process: subprocess.Popen[bytes]
    #: Loopback port the server listens on.
    port: int
    #: File that receives the server's stdout and stderr.
    log_path: Path

    @property
    def pid(self) -> int:
        """Process id of the server."""
        return self.process.pid

    def is_running(self) -> bool:
        """Whether the server process is still alive."""
        return self.process.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``grace`` seconds; wait for it to exit."""
        import subprocess

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

    def kill(self) -> None:
        """SIGKILL the server by its pid, as a crash would; wait for it to exit."""
        import signal

        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the server's log."""
        return log_tail(self.log_path, lines)

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_ready(self, url: str, timeout: float) -> None:
        """Wait until ``GET url`` answers 200; from now on the server is stopped at exit.

        Raises :class:`~nimpipe.errors.NimpipeError` quoting the server log,
        after stopping the server, when the process exits first or does not
        answer within ``timeout`` seconds.
        """
        global _ATEXIT_REGISTERED
        with _LIVE_LOCK:
            if not _ATEXIT_REGISTERED:
                atexit.register(_stop_live_servers)
                _ATEXIT_REGISTERED = True
            _LIVE.add(self)
        try:
            self._poll_until_ready(url, timeout)
        except BaseException:
            self.stop(grace=1.0)
            raise

    def _poll_until_ready(self, url: str, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while True:
                code = self.process.poll()
                if code is not None:
                    tail = self.log_tail()
                    raise self._early_exit_error(
                        f"{self.service_name} exited with code {code} before it was ready;"
                        f" log {self.log_path}:\n{tail}",
                        tail,
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise NimpipeError(
                        f"{self.service_name} (pid {self.pid}) did not answer {url} within"
                        f" {timeout:g} s; log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def _early_exit_error(self, message: str, tail: str) -> NimpipeError:
        """The error raised when the process exits before it is ready; ``tail`` ends its log."""
        return NimpipeError(message)


def run_service_command(
    command: str,
    *,
    install: Callable[[], object],
    start: Callable[[], _S],
    ready_line: Callable[[_S], str],
    others: Mapping[str, Callable[[], object]] | None = None,
) -> int:
    """Run the command-line command ``install``, ``serve`` or one of ``others``; return its status.

    ``serve`` calls ``install()`` (which returns at once when there is
    nothing to do), then ``start()``, prints ``ready_line(server)`` on stdout
    and keeps the server until SIGTERM or SIGINT.  It returns 1, with a
    message quoting the log, when the server exits by itself.  A
    :class:`~nimpipe.errors.NimpipeError` is reported on stderr and gives 1.
    """
    others = others or {}
    try:
        if command == "install":
            install()
            return 0
        if command in others:
            others[command]()
            return 0
        install()
        return _serve_until_signal(start, ready_line)
    except NimpipeError as exc:
        print_progress(f"error: {exc}")
        return 1


def _serve_until_signal(start: Callable[[], _S], ready_line: Callable[[_S], str]) -> int:
    import signal

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with start() as server:
            print(ready_line(server), flush=True)
            while not stop_requested.wait(0.5):
                if not server.is_running():
                    print_progress(
                        f"{server.service_name} exited with code {server.process.returncode};"
                        f" log {server.log_path}:\n{server.log_tail()}"
                    )
                    return 1
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
