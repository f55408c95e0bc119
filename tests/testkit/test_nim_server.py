"""Tests of the NIM-shaped test server, through real sockets and real clients."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from nimpipe.testing.nim_server import (
    DEFAULT_MODEL,
    FAULT_KINDS,
    NimServer,
    NimServerProcess,
    closed_port_url,
    count_prompt_tokens,
)

MODEL = DEFAULT_MODEL
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


@pytest.fixture(scope="module")
def server() -> Iterator[NimServer]:
    with NimServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh_server(server: NimServer) -> Iterator[None]:
    server.reset()
    yield
    server.reset()


@pytest.fixture
def client(server: NimServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=5) as c:
        yield c


@pytest.fixture
def http(server: NimServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.root_url, timeout=5) as c:
        yield c


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": user(text), **extra}


def parse_metrics(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            match = _SAMPLE.match(line)
            assert match, f"not a Prometheus sample line: {line!r}"
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def sample(samples: dict[str, float], name: str, model: str = MODEL, **labels: str) -> float:
    label_text = ",".join([f'model_name="{model}"', *(f'{k}="{v}"' for k, v in labels.items())])
    return samples[f"{name}{{{label_text}}}"]


def wait_until(predicate: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# --------------------------------------------------------------------------
# Chat completions
# --------------------------------------------------------------------------


def test_chat_completion_has_the_openai_shape_and_word_usage(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, *user("hello there world")],
    )
    assert result.id.startswith("chatcmpl-")
    assert result.object == "chat.completion"
    assert result.model == MODEL
    assert result.created > 0
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "NIM reply to: hello there world"
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.prompt_tokens == (2 + 3) + (3 + 3)
    assert result.usage.completion_tokens == 6
    assert result.usage.total_tokens == 17


def test_stream_sends_role_words_finish_then_usage(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model=MODEL,
        messages=user("stream me please"),
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) == 6
    assert "".join(pieces) == "NIM reply to: stream me please"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 6
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_wire_format_is_sse_ending_with_done(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=chat_body("hi", stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    assert "usage" not in json.loads(events[0][6:])


def test_max_tokens_truncates_with_finish_reason_length(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL, messages=user("a b c d"), max_tokens=2)
    assert result.choices[0].message.content == "NIM reply"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 2


def test_scripted_replies(server: NimServer, client: openai.OpenAI) -> None:
    server.configure(reply="fixed answer", replies={"capital of France": "Berlin"})
    first = client.chat.completions.create(model=MODEL, messages=user("capital of France?"))
    second = client.chat.completions.create(model=MODEL, messages=user("anything else"))
    assert first.choices[0].message.content == "Berlin"
    assert second.choices[0].message.content == "fixed answer"

    server.configure(models=[{"id": "cheap", "reply": "bad answer"}, {"id": "big"}])
    cheap = client.chat.completions.create(model="cheap", messages=user("question"))
    big = client.chat.completions.create(model="big", messages=user("question"))
    assert cheap.choices[0].message.content == "bad answer"
    assert big.choices[0].message.content == "fixed answer"


def test_tool_call_non_streaming(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model=MODEL, messages=user('please call tool get_weather {"city": "Paris"}'), tools=TOOLS
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_call_needs_tools_in_the_request(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model=MODEL, messages=user("call tool get_weather"))
    assert result.choices[0].message.tool_calls is None
    assert result.choices[0].message.content == "NIM reply to: call tool get_weather"


def test_tool_call_streaming_uses_openai_deltas(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model=MODEL,
        messages=user('call tool get_weather {"city": "San Francisco", "unit": "C"}'),
        tools=TOOLS,
        stream=True,
    ) as stream:
        chunks = list(stream)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0
    assert deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    fragments = [d.function.arguments for d in deltas[1:] if d.function and d.function.arguments]
    assert len(fragments) > 1
    assert json.loads("".join(fragments)) == {"city": "San Francisco", "unit": "C"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_rule_and_tool_result_reply(server: NimServer, client: openai.OpenAI) -> None:
    server.configure(tool_rules={"weather": {"name": "get_weather", "arguments": {"city": "Oslo"}}})
    first = client.chat.completions.create(model=MODEL, messages=user("weather?"), tools=TOOLS)
    calls = first.choices[0].message.tool_calls
    assert calls is not None
    assert isinstance(calls[0], ChatCompletionMessageFunctionToolCall)
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}

    history: list[Any] = [
        *user("weather?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": calls[0].id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C and sunny"},
    ]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "NIM reply to tool result: 18 C and sunny"


def test_unknown_model_is_404_with_openai_error_body(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no/such-model", messages=user("hi"))
    assert info.value.status_code == 404
    body = http.post("/v1/chat/completions", json={**chat_body("hi"), "model": "nope"}).json()
    assert set(body["error"]) >= {"message", "type", "code"}
    assert "nope" in body["error"]["message"]


def test_prompt_over_max_model_len_is_400(server: NimServer, client: openai.OpenAI) -> None:
    server.configure(max_model_len=10)
    assert client.chat.completions.create(model=MODEL, messages=user("one two three"))
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=user("word " * 8))
    assert "maximum context length" in str(info.value)
    assert info.value.status_code == 400


def test_latency_delays_the_reply(server: NimServer, client: openai.OpenAI) -> None:
    server.configure(latency=0.2)
    started = time.monotonic()
    client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert time.monotonic() - started >= 0.2


# --------------------------------------------------------------------------
# Models, health, metrics, tokenize, auth
# --------------------------------------------------------------------------


def test_models_list_with_max_model_len_and_lora_parent(
    server: NimServer, client: openai.OpenAI, http: httpx.Client
) -> None:
    server.configure(
        models=[
            {"id": "meta/llama-3.1-70b-instruct", "max_model_len": 8192},
            {"id": "my-lora", "parent": "meta/llama-3.1-70b-instruct", "max_model_len": 4096},
        ]
    )
    assert [m.id for m in client.models.list()] == ["meta/llama-3.1-70b-instruct", "my-lora"]
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    base, lora = body["data"]
    assert base["object"] == "model" and base["owned_by"] == "system"
    assert base["max_model_len"] == 8192 and base["parent"] is None
    assert base["root"] == base["id"] and base["permission"]
    assert lora["parent"] == "meta/llama-3.1-70b-instruct" and lora["max_model_len"] == 4096
    assert http.get("/v1/models/my-lora").json()["max_model_len"] == 4096


def test_health_goes_from_loading_to_ready() -> None:
    with NimServer(ready_after=0.4) as srv, httpx.Client(base_url=srv.root_url) as http:
        assert http.get("/v1/health/live").status_code == 200
        loading = http.get("/v1/health/ready")
        assert loading.status_code == 503
        assert loading.json()["object"] == "health.response"
        assert loading.json()["status"] == "loading"
        assert http.post("/v1/chat/completions", json=chat_body("hi")).status_code == 503
        wait_until(lambda: http.get("/v1/health/ready").status_code == 200)
        assert http.get("/v1/health/ready").json()["status"] == "ready"
        assert http.post("/v1/chat/completions", json=chat_body("hi")).status_code == 200
        srv.set_ready(False)
        assert http.get("/v1/health/ready").status_code == 503
        srv.set_ready(True)
        assert http.get("/v1/health/ready").status_code == 200


def test_metrics_report_running_requests_and_token_totals(
    server: NimServer, http: httpx.Client
) -> None:
    response = http.get("/v1/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "num_request_max",
        "gpu_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_finish_total",
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
    ):
        assert f"# TYPE {name} " in response.text
    samples = parse_metrics(response.text)
    assert sample(samples, "num_requests_running") == 0

    server.configure(latency=0.5)
    with httpx.Client(base_url=server.root_url, timeout=5) as other:
        worker = threading.Thread(
            target=other.post, args=("/v1/chat/completions",), kwargs={"json": chat_body("a b")}
        )
        worker.start()
        try:
            wait_until(lambda: server.in_flight == 1)
            running = parse_metrics(http.get("/v1/metrics").text)
            assert sample(running, "num_requests_running") == 1
        finally:
            worker.join()
    done = parse_metrics(http.get("/v1/metrics").text)
    assert sample(done, "num_requests_running") == 0
    assert sample(done, "prompt_tokens_total") == 5
    assert sample(done, "generation_tokens_total") == 5
    assert sample(done, "request_finish_total", finished_reason="stop") == 1
    assert sample(done, "e2e_request_latency_seconds_count") == 1
    assert sample(done, "e2e_request_latency_seconds_sum") >= 0.5
    assert sample(done, "time_to_first_token_seconds_bucket", le="+Inf") == 1


def test_metrics_overrides_and_vllm_names(server: NimServer, http: httpx.Client) -> None:
    server.configure(waiting_override=12, kv_cache_override=0.97)
    samples = parse_metrics(http.get("/metrics").text)
    assert sample(samples, "num_requests_waiting") == 12
    assert sample(samples, "gpu_cache_usage_perc") == 0.97

    server.configure(metrics_prefix="vllm:")
    vllm = parse_metrics(http.get("/v1/metrics").text)
    assert sample(vllm, "vllm:num_requests_waiting") == 12
    assert sample(vllm, "vllm:kv_cache_usage_perc") == 0.97
    assert not any(name.startswith("num_requests") for name in vllm)


def test_waiting_requests_are_real_when_over_num_request_max(
    server: NimServer, http: httpx.Client
) -> None:
    server.configure(num_request_max=1, latency=0.3)
    clients = [httpx.Client(base_url=server.root_url, timeout=5) for _ in range(2)]
    workers = [
        threading.Thread(
            target=c.post, args=("/v1/chat/completions",), kwargs={"json": chat_body("x")}
        )
        for c in clients
    ]
    try:
        for worker in workers:
            worker.start()

        def one_running_one_waiting() -> bool:
            samples = parse_metrics(http.get("/v1/metrics").text)
            running = sample(samples, "num_requests_running")
            return running == 1 and sample(samples, "num_requests_waiting") == 1

        wait_until(one_running_one_waiting)
    finally:
        for worker in workers:
            worker.join()
        for c in clients:
            c.close()
    assert server.count("/v1/chat/completions") == 2


def test_tokenize_count_equals_usage_prompt_tokens(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "How many tokens is this?"}]},
    ]
    usage = client.chat.completions.create(model=MODEL, messages=messages).usage
    assert usage is not None
    tokenized = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert tokenized["count"] == usage.prompt_tokens == count_prompt_tokens(messages) == 16
    assert len(tokenized["tokens"]) == tokenized["count"]
    assert tokenized["max_model_len"] == 131072
    prompt = http.post("/tokenize", json={"model": MODEL, "prompt": "three word prompt"}).json()
    assert prompt["count"] == 3


def test_api_key_is_required_when_configured(server: NimServer) -> None:
    server.configure(api_key="nvapi-secret")
    with (
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.chat.completions.create(model=MODEL, messages=user("hi"))
    with openai.OpenAI(base_url=server.base_url, api_key="nvapi-secret", max_retries=0) as good:
        assert good.chat.completions.create(model=MODEL, messages=user("hi")).choices
    assert httpx.get(f"{server.base_url}/health/ready").status_code == 200
    recorded = server.requests
    assert [r.headers["authorization"] for r in recorded[:2]] == ["Bearer ***", "Bearer ***"]
    assert "nvapi-secret" not in repr(recorded)


def test_requests_and_stats_are_recorded(server: NimServer, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=user("record me"), temperature=0.1)
    client.models.list()
    assert server.stats() == {("POST", "/v1/chat/completions"): 1, ("GET", "/v1/models"): 1}
    first = server.requests[0]
    assert first.method == "POST" and first.path == "/v1/chat/completions"
    assert first.body["messages"] == user("record me")
    assert first.body["temperature"] == 0.1
    assert first.headers["content-type"] == "application/json"
    server.reset()
    assert server.stats() == {} and server.requests == []


def test_bad_http_is_answered_400() -> None:
    with NimServer() as srv, socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 400 ")


def test_restart_keeps_the_port() -> None:
    srv = NimServer().start()
    port = srv.port
    srv.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{srv.base_url}/health/live")
    srv.start()
    try:
        assert srv.port == port
        assert httpx.get(f"{srv.base_url}/health/live").status_code == 200
    finally:
        srv.stop()


# --------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------


def test_status_fault_then_normal_answer(server: NimServer, client: openai.OpenAI) -> None:
    server.inject("status", count=2, status=503, message="overloaded")
    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=MODEL, messages=user("hi"))
        assert info.value.status_code == 503
        assert info.value.body == {
            "message": "overloaded",
            "type": "ServiceUnavailableError",
            "param": None,
            "code": 503,
        }
    assert client.chat.completions.create(model=MODEL, messages=user("hi")).choices
    assert server.faults == []


def test_rate_limit_fault_sends_retry_after(server: NimServer, client: openai.OpenAI) -> None:
    server.inject("rate_limit", retry_after=7)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.status_code == 429


def test_auth_fault_is_401(server: NimServer, client: openai.OpenAI) -> None:
    server.inject("auth")
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert info.value.status_code == 401


def test_malformed_faults(server: NimServer, http: httpx.Client) -> None:
    server.inject("malformed")
    response = http.post("/v1/chat/completions", json=chat_body("hi"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        response.json()

    server.inject("malformed_shape")
    shape = http.post("/v1/chat/completions", json=chat_body("hi"))
    assert shape.status_code == 200
    assert "choices" not in shape.json()


def test_malformed_fault_reaches_the_openai_client(
    server: NimServer, client: openai.OpenAI
) -> None:
    server.inject("malformed")
    with pytest.raises(json.JSONDecodeError):
        client.chat.completions.create(model=MODEL, messages=user("hi"))


def test_cut_stream_raises_after_some_chunks(server: NimServer, client: openai.OpenAI) -> None:
    server.inject("cut_stream", chunks=2)
    received: list[Any] = []
    # openai 3.x wraps the transport error in APIConnectionError; 2.x lets
    # httpx's RemoteProtocolError through.
    with (
        pytest.raises(Exception) as info,
        client.chat.completions.create(
            model=MODEL, messages=user("a long enough reply"), stream=True
        ) as stream,
    ):
        received.extend(stream)
    assert type(info.value).__name__ in {"APIConnectionError", "RemoteProtocolError"}
    assert len(received) == 2
    assert received[1].choices[0].delta.content == "NIM "


def test_cut_stream_on_a_plain_response_cuts_the_body(
    server: NimServer, http: httpx.Client
) -> None:
    server.inject("cut_stream")
    with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
        http.post("/v1/chat/completions", json=chat_body("hi"))


def test_stall_times_out_the_client(server: NimServer, client: openai.OpenAI) -> None:
    server.inject("stall")
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(model=MODEL, messages=user("x"))
    assert 0.3 <= time.monotonic() - started < 2
    assert server.count("/v1/chat/completions") == 1


def test_stall_after_chunks_times_out_mid_stream(server: NimServer) -> None:
    server.inject("stall", after_chunks=2)
    with httpx.Client(base_url=server.root_url, timeout=httpx.Timeout(5, read=0.3)) as http:
        lines: list[str] = []
        with (
            pytest.raises(httpx.ReadTimeout),
            http.stream("POST", "/v1/chat/completions", json=chat_body("hi", stream=True)) as r,
        ):
            assert r.status_code == 200
            lines.extend(line for line in r.iter_lines() if line)
    assert len(lines) == 2


def test_stall_seconds_ends_with_a_closed_connection(server: NimServer, http: httpx.Client) -> None:
    server.inject("stall", stall_seconds=0.2)
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/v1/chat/completions", json=chat_body("hi"))


def test_drop_closes_without_a_response(server: NimServer, http: httpx.Client) -> None:
    server.inject("drop")
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        http.post("/v1/chat/completions", json=chat_body("hi"))
    assert http.post("/v1/chat/completions", json=chat_body("hi")).status_code == 200


def test_delay_fault_slows_one_request(server: NimServer, http: httpx.Client) -> None:
    server.inject("delay", seconds=0.2)
    started = time.monotonic()
    assert http.post("/v1/chat/completions", json=chat_body("hi")).status_code == 200
    assert time.monotonic() - started >= 0.2


def test_permanent_and_filtered_faults(server: NimServer, http: httpx.Client) -> None:
    server.configure(models=["small", "big"])
    server.inject("status", count=None, model="big", status=502)
    server.inject("status", path="/v1/models", status=500)
    assert http.get("/v1/models").status_code == 500
    assert http.get("/v1/models").status_code == 200
    for _ in range(3):
        assert (
            http.post("/v1/chat/completions", json={**chat_body("x"), "model": "big"}).status_code
            == 502
        )
        assert (
            http.post("/v1/chat/completions", json={**chat_body("x"), "model": "small"}).status_code
            == 200
        )
    assert [f.kind for f in server.faults] == ["status"]
    server.clear_faults()
    assert (
        http.post("/v1/chat/completions", json={**chat_body("x"), "model": "big"}).status_code
        == 200
    )


def test_faults_are_validated(server: NimServer) -> None:
    assert set(FAULT_KINDS) >= {
        "status",
        "rate_limit",
        "malformed",
        "malformed_shape",
        "cut_stream",
        "stall",
        "drop",
        "auth",
    }
    with pytest.raises(ValueError, match="unknown fault kind"):
        server.inject("explode")
    with pytest.raises(ValueError, match="retry_afterr"):
        server.inject("rate_limit", retry_afterr=3)
    with pytest.raises(TypeError, match="latencyy"):
        server.configure(latencyy=1)


def test_closed_port_url_refuses_connections() -> None:
    url = closed_port_url()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/models", timeout=2)
    with (
        openai.OpenAI(base_url=url, api_key="x", max_retries=0) as c,
        pytest.raises(openai.APIConnectionError),
    ):
        c.models.list()


# --------------------------------------------------------------------------
# A server in another process
# --------------------------------------------------------------------------


def test_subprocess_server_is_driven_through_admin_endpoints() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nimpipe.testing.nim_server",
            "--port",
            "0",
            "--model",
            "m1",
            "--max-model-len",
            "2048",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("READY http://127.0.0.1:")
        base_url = line.split()[1]
        root = base_url.removesuffix("/v1")
        with httpx.Client(base_url=root, timeout=5) as http:
            assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 2048
            settings = http.post("/_admin/config", json={"reply": "scripted"}).json()["settings"]
            assert settings["reply"] == "scripted"
            body = {"model": "m1", "messages": user("hi")}
            reply = http.post("/v1/chat/completions", json=body).json()
            assert reply["choices"][0]["message"]["content"] == "scripted"

            queued = http.post("/_admin/fault", json={"kind": "rate_limit", "retry_after": 3})
            assert queued.json()["queued"] == 1
            limited = http.post("/v1/chat/completions", json=body)
            assert limited.status_code == 429 and limited.headers["retry-after"] == "3"

            stats = http.get("/_admin/stats").json()
            assert stats["counts"] == {"GET /v1/models": 1, "POST /v1/chat/completions": 2}
            recorded = http.get("/_admin/requests").json()["requests"]
            assert recorded[-1]["body"] == body
            assert http.post("/_admin/config", json={"bogus": 1}).status_code == 400

            assert http.post("/_admin/ready", json={"ready": False}).json() == {"ready": False}
            assert http.get("/v1/health/ready").status_code == 503
            assert http.post("/_admin/reset").json() == {"reset": True}
            assert http.get("/_admin/stats").json()["counts"] == {}
            assert http.get("/v1/health/ready").status_code == 200
            reply = http.post("/v1/chat/completions", json=body).json()
            assert reply["choices"][0]["message"]["content"] == "NIM reply to: hi"
    finally:
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=5) == 0
        if process.stdout is not None:
            process.stdout.close()


def test_nim_server_process_helper_mirrors_the_in_process_api() -> None:
    with NimServerProcess(latency=0.0, models=["a", "b"]) as proc:
        proc.inject("status", status=500, model="b")
        with openai.OpenAI(base_url=proc.base_url, api_key="x", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError):
                c.chat.completions.create(model="b", messages=user("hi"))
            assert c.chat.completions.create(model="a", messages=user("hi")).choices
        assert proc.count("/v1/chat/completions") == 2
        assert proc.stats() == {("POST", "/v1/chat/completions"): 2}
        assert [r.body["model"] for r in proc.requests] == ["b", "a"]
        assert proc.configure(reply="ok")["reply"] == "ok"
        proc.reset()
        assert proc.stats() == {}
        pid = proc.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
