"""Every fault of the NIM-shaped server ends in a retried success or a typed error,
within the turn's deadline: never a hang, never a bare exception."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from nimpipe import Route, Turn, hookimpl
from nimpipe.errors import (
    AuthenticationError,
    ContextOverflowError,
    DeadlineExceededError,
    MalformedReplyError,
    ProviderError,
    RateLimitError,
    TimeoutError,
    UnavailableError,
)
from nimpipe.testing.nim_server import closed_port_url
from nimpipe.types import CallRecord

DEADLINE = 4.0

#: (fault, params, streaming) -> what a turn with retries must end in.
TRANSIENT = [
    ("status", {"status": 500}),
    ("status", {"status": 502}),
    ("status", {"status": 503}),
    ("rate_limit", {"retry_after": 0}),
    ("malformed", {}),
    ("malformed_shape", {}),
    ("cut_stream", {}),
    ("drop", {}),
    ("stall", {"stall_seconds": 30}),
]


class Ledger:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    @hookimpl
    def record_cost(self, record: CallRecord) -> None:
        self.records.append(record)


class CheckOutput:
    """Any post_output stage makes the pipeline hold streamed text back."""

    @hookimpl
    def post_output(self) -> None:
        return None


def make(make_pipeline: Any, server: Any, *plugins: Any, **route_kw: Any) -> tuple[Any, Ledger]:
    ledger = Ledger()
    route = Route(
        name="nim", base_url=server.base_url, model="meta/llama-3.1-8b-instruct", **route_kw
    )
    return make_pipeline(routes=[route], plugins=[ledger, *plugins]), ledger


def run_turn(pipeline: Any, streaming: bool, mode: str, text: str = "hello") -> Any:
    turn = Turn.create(text, timeout=DEADLINE)
    if mode == "async":
        if streaming:

            async def consume() -> Any:
                stream = pipeline.astream(turn)
                async for _ in stream:
                    pass
                return stream.result

            return asyncio.run(consume())
        return asyncio.run(pipeline.arun(turn))
    if streaming:
        stream = pipeline.stream(turn)
        for _ in stream:
            pass
        return stream.result
    return pipeline.run(turn)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("kind", "params"), TRANSIENT, ids=[f"{k}-{p.get('status', '')}" for k, p in TRANSIENT]
)
def test_transient_fault_is_retried_to_success(
    nim_server: Any,
    make_pipeline: Any,
    kind: str,
    params: dict[str, Any],
    streaming: bool,
    mode: str,
) -> None:
    # A stall is only detectable by the route's timeout: short, but long enough
    # that the retry's whole answer fits in it on a busy machine.  Output is
    # held back (CheckOutput), so a stream cut mid-way can be retried.
    pipeline, ledger = make(make_pipeline, nim_server, CheckOutput(), max_retries=2, timeout=1.0)
    nim_server.inject(kind, count=1, **params)
    started = time.monotonic()
    result = run_turn(pipeline, streaming, mode)
    assert time.monotonic() - started < DEADLINE
    assert result.ok and result.text == "NIM reply to: hello"
    outcomes = [r.outcome for r in ledger.records]
    assert outcomes == ["retried", "ok"], f"{kind}: every attempt is recorded ({outcomes})"
    assert ledger.records[0].error in {"unavailable", "rate_limit", "malformed_reply", "timeout"}


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("kind", "params", "error"),
    [
        ("status", {"status": 500}, UnavailableError),
        ("rate_limit", {"retry_after": 0}, RateLimitError),
        ("malformed", {}, MalformedReplyError),
        ("drop", {}, UnavailableError),
        ("stall", {"stall_seconds": 30}, TimeoutError),
    ],
)
def test_persistent_fault_ends_in_typed_error(
    nim_server: Any,
    make_pipeline: Any,
    kind: str,
    params: dict[str, Any],
    error: type,
    streaming: bool,
) -> None:
    pipeline, ledger = make(make_pipeline, nim_server, max_retries=2, timeout=0.5)
    nim_server.inject(kind, count=None, **params)
    started = time.monotonic()
    with pytest.raises(error) as info:
        run_turn(pipeline, streaming, "sync")
    assert time.monotonic() - started < DEADLINE
    assert info.value.route is not None and info.value.route.name == "nim"
    assert [r.outcome for r in ledger.records] == ["retried", "retried", "error"]


def test_auth_error_is_not_retried(
    nim_server: Any, make_pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    nim_server.configure(api_key="right-key")
    pipeline, ledger = make(make_pipeline, nim_server, api_key_env="NIM_TEST_KEY")
    with pytest.raises(AuthenticationError, match=r"HTTP 401.*NIM_TEST_KEY") as info:
        run_turn(pipeline, False, "sync")
    assert "right-key" not in str(info.value)
    assert [r.outcome for r in ledger.records] == ["error"]
    assert nim_server.count() == 1


def test_rate_limit_honours_retry_after(nim_server: Any, make_pipeline: Any) -> None:
    pipeline, _ = make(make_pipeline, nim_server, max_retries=1)
    nim_server.inject("rate_limit", count=1, retry_after=1)
    started = time.monotonic()
    result = run_turn(pipeline, False, "sync")
    assert result.ok
    assert time.monotonic() - started >= 0.95, "waited for Retry-After"


def test_retry_after_beyond_deadline_fails_fast(nim_server: Any, make_pipeline: Any) -> None:
    pipeline, _ = make(make_pipeline, nim_server, max_retries=3)
    nim_server.inject("rate_limit", count=1, retry_after=60)
    started = time.monotonic()
    with pytest.raises(RateLimitError) as info:
        run_turn(pipeline, False, "sync")
    assert time.monotonic() - started < 1.0
    assert info.value.retry_after == 60


def test_context_overflow_is_typed(nim_server: Any, make_pipeline: Any) -> None:
    nim_server.configure(max_model_len=50)
    pipeline, _ = make(make_pipeline, nim_server)
    with pytest.raises(ContextOverflowError):
        run_turn(pipeline, False, "sync", text="word " * 200)


def test_connection_refused_is_unavailable(make_pipeline: Any) -> None:
    route = Route(name="dead", base_url=closed_port_url(), model="m", max_retries=1)
    pipeline = make_pipeline(routes=[route])
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="cannot reach"):
        pipeline.run(Turn.create("x", timeout=DEADLINE))
    assert time.monotonic() - started < DEADLINE


def test_deadline_bounds_a_stall(nim_server: Any, make_pipeline: Any) -> None:
    pipeline, ledger = make(make_pipeline, nim_server, timeout=30, max_retries=5)
    nim_server.inject("stall", count=None, stall_seconds=30)
    started = time.monotonic()
    with pytest.raises((TimeoutError, DeadlineExceededError)):
        pipeline.run(Turn.create("x", timeout=1.0))
    assert time.monotonic() - started < 2.0
    with pytest.raises((TimeoutError, DeadlineExceededError)):
        asyncio.run(pipeline.arun(Turn.create("x", timeout=1.0)))
    assert ledger.records, "the stalled attempts are recorded"


def test_stream_cut_after_release_is_not_retried(nim_server: Any, make_pipeline: Any) -> None:
    pipeline, ledger = make(make_pipeline, nim_server, max_retries=3)
    nim_server.inject("cut_stream", count=1, chunks=3)
    stream = pipeline.stream(Turn.create("one two three four five", timeout=DEADLINE))
    got = []
    with pytest.raises(ProviderError, match="stream cut"):
        for chunk in stream:
            got.append(chunk)
    assert got, "text was already released, so retrying would duplicate it"
    assert [r.outcome for r in ledger.records] == ["error"]
    assert ledger.records[0].completion_tokens > 0 and ledger.records[0].usage_source == "estimated"
