"""Running a NIM test server in another process, and driving it through its admin API.

:class:`NimServerProcess` starts ``python -m nimpipe.testing.nim_server``
(:func:`main`), which prints ``READY http://127.0.0.1:PORT/v1`` once it
listens and serves until SIGTERM or SIGINT; :class:`RemoteNimServer` offers
the control methods of :class:`NimServer` for a server at any root URL.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nimpipe.testing.nim_server.faults import Fault
from nimpipe.testing.nim_server.records import RecordedRequest
from nimpipe.testing.nim_server.server import NimServer
from nimpipe.testing.nim_server.settings import CHAT_PATH, NimSettings

if TYPE_CHECKING:
    import subprocess

__all__ = ["NimServerProcess", "RemoteNimServer", "main"]


class RemoteNimServer:
    """Drives a server in another process through its admin endpoints.

    Offers the control methods of :class:`NimServer` (``configure``,
    ``inject``, ``clear_faults``, ``set_ready``, ``stats``, ``count``,
    ``requests``, ``reset``) for the server at ``root_url``
    (``http://127.0.0.1:PORT``).
    """

    def __init__(self, root_url: str, *, timeout: float = 10.0) -> None:
        self.root_url = root_url.rstrip("/")
        self.timeout = timeout

    @property
    def port(self) -> int:
        """The TCP port of ``root_url``."""
        return int(self.root_url.rsplit(":", 1)[1])

    @property
    def base_url(self) -> str:
        """``ROOT/v1``, the OpenAI-compatible base URL."""
        return f"{self.root_url}/v1"

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        import urllib.error
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode("utf-8")
        request = urllib.request.Request(
            f"{self.root_url}{path}",
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            exc.close()
            raise ValueError(f"{method} {path} failed with {exc.code}: {detail}") from None

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change settings; returns the new settings as a dict."""
        return dict(self._call("POST", "/_admin/config", settings)["settings"])

    def inject(
        self,
        kind: str,
        count: int | None = 1,
        path: str | None = CHAT_PATH,
        *,
        model: str | None = None,
        **params: Any,
    ) -> Fault:
        """Queue a fault (see :meth:`NimServer.inject`)."""
        fault = Fault(kind=kind, count=count, path=path, model=model, params=params)
        self._call("POST", "/_admin/fault", fault.to_dict())
        return fault

    def clear_faults(self) -> None:
        """Drop every queued and permanent fault."""
        self._call("DELETE", "/_admin/fault")

    def set_ready(self, ready: bool | None) -> None:
        """Force readiness (True/False) or restore the loading clock (None)."""
        self._call("POST", "/_admin/ready", {"ready": ready})

    def stats(self) -> dict[tuple[str, str], int]:
        """Number of requests received per ``(method, path)``."""
        counts = self._call("GET", "/_admin/stats")["counts"]
        result: dict[tuple[str, str], int] = {}
        for key, n in counts.items():
            method, _, path = key.partition(" ")
            result[(method, path)] = int(n)
        return result

    def count(self, path: str = CHAT_PATH, method: str | None = None) -> int:
        """Number of requests received for ``path`` (with any method unless ``method``)."""
        return sum(
            n for (m, p), n in self.stats().items() if p == path and (method is None or m == method)
        )

    @property
    def requests(self) -> list[RecordedRequest]:
        """The recorded requests, oldest first."""
        items = self._call("GET", "/_admin/requests")["requests"]
        return [RecordedRequest.from_dict(item) for item in items]

    def reset(self) -> None:
        """Restore start-up settings and clear faults, records, counts and metrics."""
        self._call("POST", "/_admin/reset", {})


class NimServerProcess(RemoteNimServer):
    """Runs ``python -m nimpipe.testing.nim_server`` as a child process.

    Takes ``port`` (0: a free one) and the fields of :class:`NimSettings` as
    keywords.  :meth:`start` returns once the child prints its ``READY`` line;
    :meth:`stop` sends SIGTERM (then SIGKILL after ``timeout``).  Use it as a
    context manager.  The child's stderr goes to this process's stderr.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        python: str | None = None,
        startup_timeout: float = 15.0,
        **settings: Any,
    ) -> None:
        NimSettings().evolve(**settings)  # fail early on unknown settings
        super().__init__("http://127.0.0.1:0")
        self._port = port
        self._python = python or sys.executable
        self._startup_timeout = startup_timeout
        self._settings = settings
        self.process: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        """Process id of the running child."""
        if self.process is None:
            raise RuntimeError("the server process has not been started")
        return self.process.pid

    def start(self) -> NimServerProcess:
        """Start the child and wait for its READY line."""
        import selectors
        import subprocess

        command = [
            self._python,
            "-m",
            "nimpipe.testing.nim_server",
            "--port",
            str(self._port),
            "--config",
            json.dumps(self._settings),
        ]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.process = process
        assert process.stdout is not None
        deadline = time.monotonic() + self._startup_timeout
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self.stop()
                    raise RuntimeError("the NIM test server process did not become ready")
                line = process.stdout.readline()
                if line.startswith("READY "):
                    break
                if not line:
                    code = process.wait()
                    self.stop()
                    raise RuntimeError(f"the NIM test server process exited with code {code}")
        base_url = line.split(" ", 1)[1].strip()
        self.root_url = base_url.removesuffix("/v1")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the child (SIGTERM, then SIGKILL) and wait for it."""
        import subprocess

        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
        self.process = None

    def __enter__(self) -> NimServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve in this process until SIGTERM/SIGINT; ``python -m nimpipe.testing.nim_server``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m nimpipe.testing.nim_server",
        description="Serve a NIM-shaped test API on 127.0.0.1; print 'READY <base url>' "
        "once listening.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--model", action="append", help="served model id; repeat for several")
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--latency", type=float, help="seconds before each reply")
    parser.add_argument("--token-delay", type=float, help="seconds between stream chunks")
    parser.add_argument("--ready-after", type=float, help="seconds of 'loading' after start")
    parser.add_argument("--reply", help="fixed reply text")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--metrics-prefix", help="'vllm:' for vLLM metric names")
    parser.add_argument("--config", help="JSON object of settings (applied before the flags)")
    args = parser.parse_args(argv)

    settings: dict[str, Any] = json.loads(args.config) if args.config else {}
    if args.model:
        if len(args.model) == 1:
            settings["model"] = args.model[0]
        else:
            settings["models"] = list(args.model)
    for flag in (
        "max_model_len",
        "latency",
        "token_delay",
        "ready_after",
        "reply",
        "api_key",
        "metrics_prefix",
    ):
        value = getattr(args, flag)
        if value is not None:
            settings[flag] = value
    try:
        server = NimServer(host=args.host, port=args.port, **settings)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    server.serve_forever(
        on_ready=lambda srv: print(f"READY {srv.base_url}", flush=True), handle_signals=True
    )
    return 0
