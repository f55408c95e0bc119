"""Helpers shared by the guardrails tests: pipelines, scripted servers, the rails config."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from nimpipe.config import Config
from nimpipe.pipeline import Pipeline
from nimpipe.types import Route, Verdict
from nimpipe_contrib.guardrails.stage import GuardrailsStage

REFUSAL = "I'm sorry, I can't respond to that."

#: The judge (the self-check rails' model) answers "Yes" (block) when the
#: prompt it is asked about holds one of these, "No" otherwise.
JUDGE_REPLIES = {"BOMB": "Yes", "SECRET": "Yes", "rm -rf": "Yes"}

#: What the agent's model says to a prompt holding "leak": the second sentence must never show.
LEAK_REPLY = "First sentence is fine. The SECRET code 4242 unlocks vaults. Trailing remark follows."
BLOCKED_PART = "The SECRET code 4242 unlocks vaults. Trailing remark follows."

#: Tool calls the agent's model proposes.
TOOL_RULES = {
    "clean up": {"name": "shell", "arguments": {"cmd": "rm -rf /"}},
    "drop it": {"name": "drop_database", "arguments": {}},
    "what time": {"name": "clock", "arguments": {}},
}


def require_guardrails(what: str) -> None:
    """Skip (or fail under ``NIMPIPE_REQUIRE_GUARDRAILS``) when ``what`` is missing."""
    message = f"{what} is not available"
    if os.environ.get("NIMPIPE_REQUIRE_GUARDRAILS"):
        pytest.fail(message)
    pytest.skip(message)


def make_pipeline(
    agent_url: str, stages: Mapping[str, Any], *, stream_policy: str | None = None
) -> Pipeline:
    """A pipeline whose only route is the agent's model, with ``stages`` enabled."""
    data: dict[str, Any] = {"stages": dict(stages)}
    if stream_policy is not None:
        data["stream_policy"] = stream_policy
    config = Config.from_dict(data, env={}).with_routes(
        Route(name="agent", base_url=agent_url, model="agent"), default="agent"
    )
    return Pipeline.create(config, entrypoints=False)


def stage_of(pipeline: Pipeline) -> GuardrailsStage:
    stage = pipeline.plugins.pm.get_plugin("guardrails")
    assert isinstance(stage, GuardrailsStage)
    return stage


def decisions(verdicts: tuple[Verdict, ...]) -> list[tuple[str, str]]:
    return [(v.rule, v.decision) for v in verdicts]


Handler = Callable[[str, Any], "tuple[int, Any]"]


class ScriptedHTTPServer:
    """A real HTTP server on 127.0.0.1 whose answers a test scripts: ``answer(path, body)``.

    ``answer`` returns ``(status, body)``; a ``str`` body is sent as it is
    (garbage), anything else as JSON.  ``delay`` seconds pass before answering.
    """

    def __init__(self, answer: Handler, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.requests: list[tuple[str, Any]] = []
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                outer.requests.append((self.path, body))
                if outer.delay:
                    time.sleep(outer.delay)
                status, payload = outer.answer(self.path, body)
                data = (
                    payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                )
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ScriptedHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def scripted(answer: Handler, delay: float = 0.0) -> Iterator[ScriptedHTTPServer]:
    with ScriptedHTTPServer(answer, delay) as server:
        yield server


def write_rails(directory: Path, judge_url: str) -> Path:
    """The self-check rails configuration whose model is the judge NimServer."""
    from nimpipe.testing.guardrails_server import write_self_check_config

    return write_self_check_config(directory, base_url=judge_url, model="judge")
