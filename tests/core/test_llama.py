"""The pipeline against the real llama.cpp server with SmolLM2 (what llama.cpp exposes).

The model's words differ between llama.cpp builds (CPU, compiler), so these
tests check the structure of each answer: finish reason, token counts, that
a stream gives what the pipeline reports.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nimpipe import CallRecord, FinishReason, Route, Turn, hookimpl
from nimpipe.errors import ContextOverflowError

pytestmark = pytest.mark.llama

PARAMS = {"temperature": 0.0, "max_tokens": 24, "seed": 7}
#: The same with SmolLM2's end-of-turn tokens (<|endoftext|>, <|im_end|>) suppressed:
#: every answer runs to max_tokens, on any CPU.
FULL_LENGTH = {**PARAMS, "logit_bias": {"0": -100, "2": -100}}
ENDED = (FinishReason.STOP, FinishReason.LENGTH)


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
    assert result.ok and result.finish_reason in ENDED
    usage = result.response.usage
    assert usage.source == "server" and usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= PARAMS["max_tokens"]
    assert [r.usage_source for r in ledger.records] == ["server"]
    (record,) = ledger.records
    assert (record.prompt_tokens, record.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )


def test_an_answer_cut_at_max_tokens_says_length(llama: tuple[Any, Ledger]) -> None:
    pipeline, _ = llama
    result = pipeline.run(Turn.create("What is 2 + 2?", params=FULL_LENGTH, timeout=120))
    assert result.ok and result.finish_reason is FinishReason.LENGTH
    assert result.response.usage.completion_tokens == FULL_LENGTH["max_tokens"]


def test_stream_without_server_usage_is_estimated_not_zero(llama: tuple[Any, Ledger]) -> None:
    pipeline, ledger = llama
    stream = pipeline.stream(Turn.create("Name a colour.", params=FULL_LENGTH, timeout=120))
    text = "".join(stream)
    assert text == stream.result.text
    assert stream.result.finish_reason is FinishReason.LENGTH
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
    assert [r.ok and r.finish_reason in ENDED for r in results] == [True] * 4
    assert all(0 < r.response.usage.completion_tokens <= 24 for r in results)
    assert sorted(r.turn_id for r in ledger.records) == sorted(r.turn.id for r in results)
    assert [r.outcome for r in ledger.records] == ["ok"] * 4


def test_context_overflow_is_typed(llama: tuple[Any, Ledger]) -> None:
    pipeline, ledger = llama
    with pytest.raises(ContextOverflowError, match="maximum context length"):
        pipeline.run(Turn.create("word " * 3000, params=PARAMS, timeout=120))
    assert [r.outcome for r in ledger.records] == ["error"]
    assert ledger.records[0].error == "context_overflow"
