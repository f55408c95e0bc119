"""The pipeline against the real llama.cpp server with SmolLM2 (what llama.cpp exposes)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nimpipe import CallRecord, Route, Turn, hookimpl
from nimpipe.errors import ContextOverflowError

pytestmark = pytest.mark.llama

PARAMS = {"temperature": 0.0, "max_tokens": 24, "seed": 7}


class Ledger:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    @hookimpl
    def record_cost(self, record: CallRecord) -> None:
        self.records.append(record)


@pytest.fixture
def llama(llama_server: Any, make_pipeline: Any) -> tuple[Any, Ledger]:
    ledger = Ledger()
    route = Route(name="llama", base_url=llama_server.base_url, model="smollm2", self_hosted=True)
    return make_pipeline(routes=[route], plugins=[ledger]), ledger


def test_plain_turn_has_server_usage(llama: tuple[Any, Ledger]) -> None:
    pipeline, ledger = llama
    result = pipeline.run(Turn.create("What is 2 + 2?", params=PARAMS, timeout=120))
    assert result.ok and result.text.strip()
    usage = result.response.usage
    assert usage.source == "server" and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert [r.usage_source for r in ledger.records] == ["server"]


def test_stream_without_server_usage_is_estimated_not_zero(llama: tuple[Any, Ledger]) -> None:
    pipeline, ledger = llama
    stream = pipeline.stream(Turn.create("Name a colour.", params=PARAMS, timeout=120))
    text = "".join(stream)
    assert text.strip() and text == stream.result.text
    (record,) = ledger.records
    # llama.cpp ignores stream_options.include_usage: the tokens are counted, and say so.
    assert record.usage_source == "estimated"
    assert record.prompt_tokens > 0 and record.completion_tokens > 0
    assert stream.result.response.ttft is not None


def test_concurrent_async_turns(llama: tuple[Any, Ledger]) -> None:
    pipeline, ledger = llama

    async def main() -> list[Any]:
        turns = [Turn.create(f"Say the number {i}.", params=PARAMS, timeout=120) for i in range(4)]
        return await asyncio.gather(*(pipeline.arun(t) for t in turns))

    results = asyncio.run(main())
    assert all(r.ok and r.text.strip() for r in results)
    assert len(ledger.records) == 4


def test_context_overflow_is_typed(llama: tuple[Any, Ledger]) -> None:
    pipeline, ledger = llama
    with pytest.raises(ContextOverflowError, match="maximum context length"):
        pipeline.run(Turn.create("word " * 3000, params=PARAMS, timeout=120))
    assert [r.outcome for r in ledger.records] == ["error"]
    assert ledger.records[0].error == "context_overflow"
