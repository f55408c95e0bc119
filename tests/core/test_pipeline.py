"""The turn pipeline against the NIM-shaped server: phases, decisions, streaming, records."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import attrs
import pytest

import nimpipe
from nimpipe import (
    Block,
    CallRecord,
    Deferred,
    Escalate,
    Message,
    Output,
    Price,
    Retry,
    Rewrite,
    Route,
    RouteChoice,
    ToolSpec,
    Turn,
    hookimpl,
)
from nimpipe.errors import HookError, NimpipeError, NoRouteError, PluginLoadError


def route_for(server: Any, name: str = "local", **kw: Any) -> Route:
    return Route(name=name, base_url=server.base_url, model="meta/llama-3.1-8b-instruct", **kw)


class Ledger:
    """Collects every record_cost call."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.lock = threading.Lock()

    @hookimpl
    def record_cost(self, record: CallRecord) -> None:
        with self.lock:
            self.records.append(record)


def chat_count(server: Any) -> int:
    return sum(n for (method, path), n in server.stats().items() if path == "/v1/chat/completions")


# ----------------------------------------------------------------------
# plain turns
# ----------------------------------------------------------------------


def test_run_returns_answer_usage_and_one_record(nim_server: Any, make_pipeline: Any) -> None:
    ledger = Ledger()
    pipeline = make_pipeline(
        routes=[route_for(nim_server, price=Price(input_per_1k=1.0, output_per_1k=2.0))],
        plugins=[ledger],
    )
    result = pipeline.run(Turn.create("hello there", agent_id="sub-1", agent_type="explorer"))
    assert result.ok
    assert result.text == "NIM reply to: hello there"
    assert result.response is not None and result.response.usage.source == "server"
    (record,) = ledger.records
    assert record.route == "local" and record.outcome == "ok"
    assert record.agent_id == "sub-1" and record.agent_type == "explorer"
    assert record.prompt_tokens == result.response.usage.prompt_tokens > 0
    assert record.completion_tokens == result.response.usage.completion_tokens > 0
    assert record.cost_usd == pytest.approx(
        (record.prompt_tokens * 1.0 + record.completion_tokens * 2.0) / 1000
    )
    assert result.records == (record,)


def test_arun_matches_run(nim_server: Any, make_pipeline: Any) -> None:
    pipeline = make_pipeline(routes=[route_for(nim_server)])
    sync_text = pipeline.run(Turn.create("same")).text
    async_text = asyncio.run(pipeline.arun(Turn.create("same"))).text
    assert sync_text == async_text == "NIM reply to: same"


def test_stream_counts_usage_from_last_chunk(nim_server: Any, make_pipeline: Any) -> None:
    ledger = Ledger()
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[ledger])
    stream = pipeline.stream(Turn.create("one two three four"))
    chunks = list(stream)
    assert len(chunks) > 1, "no hook is active, so text must flow chunk by chunk"
    assert "".join(chunks) == stream.result.text == "NIM reply to: one two three four"
    (record,) = ledger.records
    assert record.stream and record.usage_source == "server" and record.completion_tokens > 0
    assert stream.result.response.ttft is not None


def test_astream(nim_server: Any, make_pipeline: Any) -> None:
    pipeline = make_pipeline(routes=[route_for(nim_server)])

    async def main() -> tuple[list[str], Any]:
        stream = pipeline.astream(Turn.create("a b c"))
        return [c async for c in stream], stream.result

    chunks, result = asyncio.run(main())
    assert "".join(chunks) == result.text == "NIM reply to: a b c"


def test_tool_calls_round_trip(nim_server: Any, make_pipeline: Any) -> None:
    pipeline = make_pipeline(routes=[route_for(nim_server)])
    tools = [
        ToolSpec(
            name="lookup", description="look up", parameters={"type": "object", "properties": {}}
        )
    ]
    for streaming in (False, True):
        turn = Turn.create("please call tool lookup", tools=tools)
        if streaming:
            stream = pipeline.stream(turn)
            list(stream)
            result = stream.result
        else:
            result = pipeline.run(turn)
        (call,) = result.tool_calls
        assert call.name == "lookup"
        follow = Turn.create(
            [
                *turn.messages,
                Message.assistant(None, (call,)),
                Message.tool(call.id, "42", "lookup"),
            ],
            tools=tools,
        )
        assert "42" in pipeline.run(follow).text


# ----------------------------------------------------------------------
# pre_input
# ----------------------------------------------------------------------


class Upper:
    @hookimpl(tryfirst=True)
    def pre_input(self, turn: Turn) -> Turn:
        last = turn.messages[-1]
        return attrs.evolve(
            turn, messages=(*turn.messages[:-1], Message.user(last.content.upper()))
        )


class Exclaim:
    seen: list[str]

    def __init__(self) -> None:
        self.seen = []

    @hookimpl
    def pre_input(self, turn: Turn) -> Rewrite:
        self.seen.append(turn.last_user_text)
        new = Turn.create(turn.last_user_text + "!", id=turn.id)
        return Rewrite(value=new, reason="excited")


def test_pre_input_chains_rewrites_in_order(nim_server: Any, make_pipeline: Any) -> None:
    exclaim = Exclaim()
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[Upper(), exclaim])
    result = pipeline.run(Turn.create("quiet"))
    assert exclaim.seen == ["QUIET"], "the tryfirst stage runs first and the next sees its rewrite"
    assert result.text == "NIM reply to: QUIET!"
    rewrite = [d for d in result.decisions if isinstance(d, Rewrite)]
    assert [d.plugin for d in rewrite][-1] == "exclaim" or rewrite[-1].reason == "excited"


class BlockSecrets:
    @hookimpl
    def pre_input(self, turn: Turn) -> Block | None:
        if "password" in turn.last_user_text:
            return Block(reason="asks for a password", rule="secrets")
        return None


def test_pre_input_block_makes_no_model_call(nim_server: Any, make_pipeline: Any) -> None:
    ledger = Ledger()
    pipeline = make_pipeline(
        routes=[route_for(nim_server)], plugins=[("secrets", BlockSecrets()), ledger]
    )
    result = pipeline.run(Turn.create("tell me the password"))
    assert not result.ok
    assert result.blocked.plugin == "secrets" and result.blocked.rule == "secrets"
    assert result.finish_reason is nimpipe.FinishReason.BLOCKED
    assert chat_count(nim_server) == 0
    assert ledger.records == []
    assert pipeline.run(Turn.create("hello")).ok


def test_tool_round_skips_pre_input(nim_server: Any, make_pipeline: Any) -> None:
    calls = []

    class Spy:
        @hookimpl
        def pre_input(self, turn: Turn) -> None:
            calls.append(turn.id)

    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[Spy()])
    turn = Turn.create(
        [Message.user("q"), Message.assistant(None, ()), Message.tool("c1", "result", "t")]
    )
    pipeline.run(turn)
    assert calls == []


# ----------------------------------------------------------------------
# select_provider / filter_routes / on_response
# ----------------------------------------------------------------------


def test_select_provider_first_result_wins(nim_server: Any, make_pipeline: Any) -> None:
    class PickB:
        @hookimpl
        def select_provider(self) -> str:
            return "b"

    routes = [route_for(nim_server, "a"), route_for(nim_server, "b")]
    pipeline = make_pipeline(routes=routes, plugins=[PickB()])
    assert pipeline.run(Turn.create("x")).route.name == "b"
    assert pipeline.run(Turn.create("x", route="a")).route.name == "b", (
        "a plugin outranks the trylast default"
    )


def test_default_route_honours_turn_route_and_model(nim_server: Any, make_pipeline: Any) -> None:
    nim_server.configure(models=["meta/llama-3.1-8b-instruct", "other/model"])
    routes = [
        route_for(nim_server, "a"),
        Route(name="b", base_url=nim_server.base_url, model="other/model"),
    ]
    pipeline = make_pipeline(routes=routes)
    assert pipeline.run(Turn.create("x", route="b")).route.name == "b"
    assert pipeline.run(Turn.create("x", model="other/model")).route.name == "b"
    assert pipeline.run(Turn.create("x")).route.name == "a"
    with pytest.raises(NoRouteError, match="asks for route 'zzz'"):
        pipeline.run(Turn.create("x", route="zzz"))


def test_filter_routes_narrows_candidates(nim_server: Any, make_pipeline: Any) -> None:
    class OnlyB:
        @hookimpl
        def filter_routes(self, routes: tuple[Route, ...]) -> tuple[Route, ...]:
            return tuple(r for r in routes if r.name == "b")

    pipeline = make_pipeline(
        routes=[route_for(nim_server, "a"), route_for(nim_server, "b")], plugins=[OnlyB()]
    )
    assert pipeline.run(Turn.create("x")).route.name == "b"


class EscalateShort:
    """Escalates answers from tier 0."""

    @hookimpl
    def on_response(self, route: Route, response: Any) -> Escalate | None:
        if response is not None and route.tier == 0:
            return Escalate(reason="cheap answer", score=0.1)
        return None


def test_escalation_moves_to_next_tier_and_records_both(
    nim_server: Any, make_pipeline: Any
) -> None:
    ledger = Ledger()
    routes = [route_for(nim_server, "cheap", tier=0), route_for(nim_server, "big", tier=1)]
    pipeline = make_pipeline(routes=routes, plugins=[EscalateShort(), ledger])
    result = pipeline.run(Turn.create("hard question"))
    assert result.route.name == "big"
    assert [(r.route, r.outcome, r.attempt) for r in ledger.records] == [
        ("cheap", "escalated", 1),
        ("big", "ok", 2),
    ]
    assert "cheap answer" in ledger.records[0].reason
    escalations = [d for d in result.decisions if isinstance(d, Escalate)]
    assert (escalations and escalations[0].plugin == "escalateshort") or escalations[0].plugin


def test_escalation_with_no_higher_tier_keeps_last_answer(
    nim_server: Any, make_pipeline: Any
) -> None:
    pipeline = make_pipeline(
        routes=[route_for(nim_server, "only", tier=0)], plugins=[EscalateShort()]
    )
    result = pipeline.run(Turn.create("q"))
    assert result.ok and result.route.name == "only"


def test_retry_loop_is_bounded(nim_server: Any, make_pipeline: Any) -> None:
    class AlwaysRetry:
        @hookimpl
        def on_response(self) -> Retry:
            return Retry(reason="again")

    ledger = Ledger()
    pipeline = make_pipeline(
        routes=[route_for(nim_server)], plugins=[AlwaysRetry(), ledger], max_attempts=3
    )
    result = pipeline.run(Turn.create("q"))
    assert result.ok
    assert chat_count(nim_server) == 3
    assert [r.outcome for r in ledger.records] == ["retried", "retried", "retried"]


def test_on_response_block_beats_accept(nim_server: Any, make_pipeline: Any) -> None:
    class Accepts:
        @hookimpl
        def on_response(self) -> nimpipe.Accept:
            return nimpipe.Accept(reason="fine")

    class Blocks:
        @hookimpl
        def on_response(self) -> Block:
            return Block(reason="bad tool call")

    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[Accepts(), Blocks()])
    result = pipeline.run(Turn.create("q"))
    assert result.blocked is not None and result.blocked.reason == "bad tool call"


def test_failover_on_error(nim_server: Any, make_pipeline: Any) -> None:
    from nimpipe.testing.nim_server import closed_port_url

    class Failover:
        @hookimpl
        def on_response(self, error: Any) -> Escalate | None:
            return Escalate(reason=f"failed: {error.kind}") if error is not None else None

    ledger = Ledger()
    dead = Route(name="dead", base_url=closed_port_url(), model="m", tier=0, max_retries=0)
    pipeline = make_pipeline(
        routes=[dead, route_for(nim_server, "live", tier=1)], plugins=[Failover(), ledger]
    )
    result = pipeline.run(Turn.create("q"))
    assert result.route.name == "live"
    assert [(r.route, r.outcome, r.error) for r in ledger.records] == [
        ("dead", "error", "unavailable"),
        ("live", "ok", None),
    ]


# ----------------------------------------------------------------------
# post_output and streaming hold-back
# ----------------------------------------------------------------------


class Redact:
    @hookimpl
    def post_output(self, output: Output) -> str | None:
        return output.text.replace("secret", "[redacted]") if "secret" in output.text else None


class BlockWord:
    def __init__(self, word: str) -> None:
        self.word = word
        self.seen: list[Output] = []

    @hookimpl
    def post_output(self, output: Output) -> Block | None:
        self.seen.append(output)
        if self.word in output.text:
            return Block(reason=f"contains {self.word}", rule="word")
        return None


def test_post_output_rewrites(nim_server: Any, make_pipeline: Any) -> None:
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[Redact()])
    assert pipeline.run(Turn.create("the secret plan")).text == "NIM reply to: the [redacted] plan"


def test_streamed_block_leaks_nothing(nim_server: Any, make_pipeline: Any) -> None:
    nim_server.configure(token_delay=0.005)
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[BlockWord("forbidden")])
    stream = pipeline.stream(Turn.create("say the forbidden words now"))
    chunks = list(stream)
    assert stream.result.blocked is not None
    assert chunks == [stream.result.blocked.message]
    assert "forbidden" not in "".join(chunks) and "NIM reply" not in "".join(chunks)


def test_buffer_policy_releases_checked_text_once(nim_server: Any, make_pipeline: Any) -> None:
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[Redact()])
    stream = pipeline.stream(Turn.create("a secret here"))
    assert list(stream) == ["NIM reply to: a [redacted] here"]


def test_sentence_policy_releases_checked_sentences(nim_server: Any, make_pipeline: Any) -> None:
    nim_server.configure(replies={"story": "First part is fine. Second part is bad. Third part."})
    checker = BlockWord("bad")
    pipeline = make_pipeline(
        routes=[route_for(nim_server)], plugins=[checker], stream_policy="sentence"
    )
    stream = pipeline.stream(Turn.create("tell a story"))
    chunks = list(stream)
    assert chunks[0].startswith("First part is fine.")
    assert "bad" not in "".join(chunks[:-1])
    assert chunks[-1] == stream.result.blocked.message
    assert [o.final for o in checker.seen] == [False, False]


# ----------------------------------------------------------------------
# async hooks, deferred checks, errors from hooks
# ----------------------------------------------------------------------


class AsyncStage:
    @hookimpl
    async def pre_input(self, turn: Turn) -> Turn:
        await asyncio.sleep(0)
        return attrs.evolve(turn, messages=[Message.user(turn.last_user_text + " (checked)")])

    @hookimpl
    async def post_output(self, output: Output) -> str:
        await asyncio.sleep(0)
        return output.text + " [ok]"


def test_async_hooks_work_in_run_and_arun(nim_server: Any, make_pipeline: Any) -> None:
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[AsyncStage()])
    assert pipeline.run(Turn.create("hi")).text == "NIM reply to: hi (checked) [ok]"
    assert asyncio.run(pipeline.arun(Turn.create("hi"))).text == "NIM reply to: hi (checked) [ok]"


class SlowInputCheck:
    def __init__(self, delay: float, block: bool) -> None:
        self.delay = delay
        self.block = block

    @hookimpl
    def pre_input(self) -> Deferred:
        async def check() -> Block | None:
            await asyncio.sleep(self.delay)
            return Block(reason="unsafe input", rule="self check input") if self.block else None

        return Deferred(check=check, name="input-rail")


def test_deferred_check_runs_alongside_the_call(nim_server: Any, make_pipeline: Any) -> None:
    nim_server.configure(latency=2.0)
    seen_by_server_during_check: list[int] = []

    class Overlap:
        @hookimpl
        def pre_input(self) -> Deferred:
            async def check() -> None:
                # Wait (bounded) for the model call to reach the server while
                # the check is still running.
                for _ in range(100):
                    if nim_server.in_flight:
                        break
                    await asyncio.sleep(0.01)
                seen_by_server_during_check.append(nim_server.in_flight)

            return Deferred(check=check, name="input-rail")

    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[Overlap()])
    result = asyncio.run(pipeline.arun(Turn.create("fine")))
    assert result.ok and result.text == "NIM reply to: fine"
    assert seen_by_server_during_check == [1]
    # Under the synchronous run the check goes first: no call yet while it runs.
    seen_by_server_during_check.clear()
    nim_server.reset()
    assert pipeline.run(Turn.create("fine")).ok
    assert seen_by_server_during_check == [0]


def test_deferred_block_cancels_the_call_and_records_it(
    nim_server: Any, make_pipeline: Any
) -> None:
    nim_server.configure(latency=1.0)
    ledger = Ledger()
    pipeline = make_pipeline(
        routes=[route_for(nim_server)], plugins=[SlowInputCheck(0.05, block=True), ledger]
    )

    async def main() -> tuple[Any, list[str]]:
        stream = pipeline.astream(Turn.create("bad input"))
        return None, [c async for c in stream]

    result = asyncio.run(pipeline.arun(Turn.create("bad input")))
    assert result.blocked is not None and result.blocked.rule == "self check input"
    assert "NIM reply" not in result.text
    (record,) = ledger.records
    assert (
        record.outcome == "cancelled"
        and record.prompt_tokens > 0
        and record.usage_source == "estimated"
    )
    _, chunks = asyncio.run(main())
    assert "NIM reply" not in "".join(chunks)


def test_hook_error_names_plugin_and_hook(nim_server: Any, make_pipeline: Any) -> None:
    class Broken:
        @hookimpl
        def post_output(self) -> None:
            raise ValueError("boom")

    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[("broken", Broken())])
    with pytest.raises(HookError) as info:
        pipeline.run(Turn.create("x"))
    assert info.value.plugin == "broken" and info.value.hook == "post_output"
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(HookError, match="'broken' failed in hook 'post_output'"):
        asyncio.run(pipeline.arun(Turn.create("x")))


def test_wrappers_are_refused_on_pipeline_hooks(make_pipeline: Any) -> None:
    class Wraps:
        @hookimpl(wrapper=True)
        def pre_input(self) -> Any:
            return (yield)

    with pytest.raises(PluginLoadError, match="wraps pipeline hook 'pre_input'"):
        make_pipeline(plugins=[Wraps()])


def test_bad_return_value_is_a_clear_error(nim_server: Any, make_pipeline: Any) -> None:
    class Odd:
        @hookimpl
        def pre_input(self) -> int:
            return 42

    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[("odd", Odd())])
    with pytest.raises(NimpipeError, match="'odd': pre_input returned int"):
        pipeline.run(Turn.create("x"))


def test_run_inside_event_loop_is_refused(nim_server: Any, make_pipeline: Any) -> None:
    pipeline = make_pipeline(routes=[route_for(nim_server)])

    async def main() -> None:
        pipeline.run(Turn.create("x"))

    with pytest.raises(NimpipeError, match=r"use 'await pipeline\.arun"):
        asyncio.run(main())


# ----------------------------------------------------------------------
# concurrency
# ----------------------------------------------------------------------


def test_threads_share_one_pipeline(nim_server: Any, make_pipeline: Any) -> None:
    ledger = Ledger()
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[ledger, AsyncStage()])
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(10):
                result = pipeline.run(Turn.create(f"w{n} t{i}", agent_id=f"agent-{n}"))
                assert result.text == f"NIM reply to: w{n} t{i} (checked) [ok]"
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ledger.records) == 80
    assert sorted({r.agent_id for r in ledger.records}) == [f"agent-{n}" for n in range(8)]


def test_64_concurrent_arun(nim_server: Any, make_pipeline: Any) -> None:
    nim_server.configure(latency=0.05)
    ledger = Ledger()
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[ledger])

    async def main() -> list[Any]:
        return await asyncio.gather(*(pipeline.arun(Turn.create(f"q{i}")) for i in range(64)))

    results = asyncio.run(main())
    assert sorted(r.text for r in results) == sorted(f"NIM reply to: q{i}" for i in range(64))
    assert len(ledger.records) == 64


def test_cancel_token_stops_a_stream(nim_server: Any, make_pipeline: Any) -> None:
    nim_server.configure(token_delay=0.05)
    ledger = Ledger()
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[ledger])
    token = nimpipe.CancelToken()
    stream = pipeline.stream(Turn.create("w " * 40), cancel=token)
    got = []
    with pytest.raises(nimpipe.CancelledError):
        for chunk in stream:
            got.append(chunk)
            if len(got) == 2:
                token.cancel()
    assert len(got) == 2
    assert [r.outcome for r in ledger.records] == ["cancelled"]


def test_cancel_token_cancels_arun(nim_server: Any, make_pipeline: Any) -> None:
    nim_server.configure(latency=10.0)
    pipeline = make_pipeline(routes=[route_for(nim_server)])
    token = nimpipe.CancelToken()

    async def main() -> None:
        asyncio.get_running_loop().call_later(0.1, token.cancel)
        await pipeline.arun(Turn.create("slow"), cancel=token)

    started = time.perf_counter()
    with pytest.raises(nimpipe.CancelledError):
        asyncio.run(main())
    assert time.perf_counter() - started < 8.0, "cancelled long before the server answers"


class Budget:
    """Downgrades to the free route once, then refuses."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def before_call(self, route: Route, pipeline: Any) -> Route | Block | None:
        self.calls += 1
        if self.calls == 1 and route.name == "paid":
            return pipeline.config.route("free")
        if self.calls > 1:
            return Block(reason="budget exhausted", rule="daily")
        return None


def test_before_call_downgrades_and_refuses(nim_server: Any, make_pipeline: Any) -> None:
    ledger = Ledger()
    routes = [route_for(nim_server, "paid"), route_for(nim_server, "free")]
    pipeline = make_pipeline(routes=routes, plugins=[Budget(), ledger])
    first = pipeline.run(Turn.create("q"))
    assert first.route.name == "free"
    assert [r.route for r in ledger.records] == ["free"]
    second = pipeline.run(Turn.create("q"))
    assert second.blocked is not None and second.blocked.rule == "daily"
    assert chat_count(nim_server) == 1


class Picks:
    """Chooses route ``a`` with a reason, then ``b`` on a retry."""

    @hookimpl
    def select_provider(self, attempt: Any, pipeline: Any) -> RouteChoice:
        name = "a" if attempt.number == 1 else "b"
        return RouteChoice(pipeline.config.route(name), f"attempt {attempt.number} on {name}")


class Moves:
    """Keeps attempt 1 on its route with a reason; moves attempt 2 to ``c``."""

    @hookimpl
    def before_call(self, route: Route, attempt: Any, pipeline: Any) -> RouteChoice:
        if attempt.number == 1:
            return RouteChoice(route, f"{route.name} is in budget")
        return RouteChoice(pipeline.config.route("c"), f"{route.name} over budget")


class RetryOnce:
    @hookimpl
    def on_response(self, attempt: Any) -> Retry | None:
        return Retry(reason="again") if attempt.number == 1 else None


def test_route_choice_reasons_reach_every_record_of_their_call(
    nim_server: Any, make_pipeline: Any
) -> None:
    ledger = Ledger()
    routes = [route_for(nim_server, name) for name in ("a", "b", "c")]
    pipeline = make_pipeline(
        routes=routes,
        plugins=[("picks", Picks()), ("moves", Moves()), ("again", RetryOnce()), ledger],
    )
    result = pipeline.run(Turn.create("q"))
    assert result.route.name == "c"
    first, second = result.records
    assert (first.route, first.attempt) == ("a", 1)
    assert first.routing_reason == "picks: attempt 1 on a; moves: a is in budget"
    assert (second.route, second.attempt) == ("c", 2)
    assert second.routing_reason == "picks: attempt 2 on b; moves: b over budget"
    assert [r.routing_reason for r in ledger.records] == [
        first.routing_reason,
        second.routing_reason,
    ]
    # Keeping the route with a reason is no rewrite; moving it is one.
    rewrites = [d for d in result.decisions if isinstance(d, Rewrite)]
    assert [(d.value, d.plugin) for d in rewrites] == [("c", "moves")]


def test_a_plain_route_gives_no_routing_reason(nim_server: Any, make_pipeline: Any) -> None:
    pipeline = make_pipeline(routes=[route_for(nim_server)])
    (record,) = pipeline.run(Turn.create("q")).records
    assert record.routing_reason == ""


@pytest.mark.parametrize("hook", ["select_provider", "before_call"])
def test_a_wrong_route_answer_is_a_clear_error(
    nim_server: Any, make_pipeline: Any, hook: str
) -> None:
    class Odd:
        pass

    setattr(Odd, hook, hookimpl(lambda self: 42))
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[("odd", Odd())])
    with pytest.raises(NimpipeError, match=f"'odd': {hook} returned int"):
        pipeline.run(Turn.create("x"))
    bad = RouteChoice(42, "no route")  # type: ignore[arg-type]
    setattr(Odd, hook, hookimpl(lambda self: bad))
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[("odd", Odd())])
    with pytest.raises(NimpipeError, match=f"'odd': {hook} returned int"):
        pipeline.run(Turn.create("x"))


class Rails:
    """Attaches a verdict from each phase, one from inside a deferred check."""

    @hookimpl
    def pre_input(self, pipeline: Any) -> Deferred:
        pipeline.add_verdict(nimpipe.Verdict(rule="input-regex", decision="pass", plugin="rails"))

        async def check() -> None:
            await asyncio.sleep(0)
            pipeline.add_verdict(
                nimpipe.Verdict(rule="input-rail", decision="pass", backend="test")
            )

        return Deferred(check=check, name="input-rail")

    @hookimpl
    def post_output(self, output: Output, pipeline: Any) -> Block | None:
        blocked = "forbidden" in output.text
        pipeline.add_verdict(
            nimpipe.Verdict(rule="output-rail", decision="block" if blocked else "pass")
        )
        return Block(reason="output rail", rule="output-rail") if blocked else None


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_verdicts_reach_the_record_and_the_result(
    nim_server: Any, make_pipeline: Any, mode: str
) -> None:
    ledger = Ledger()
    pipeline = make_pipeline(routes=[route_for(nim_server)], plugins=[Rails(), ledger])
    run = pipeline.run if mode == "sync" else (lambda t: asyncio.run(pipeline.arun(t)))
    result = run(Turn.create("fine"))
    assert [v.rule for v in result.verdicts] == ["input-regex", "input-rail", "output-rail"]
    (record,) = ledger.records
    assert record.verdicts == result.verdicts and record.outcome == "ok"
    blocked = run(Turn.create("forbidden"))
    assert blocked.blocked is not None
    assert ledger.records[-1].outcome == "blocked"
    assert [v.decision for v in ledger.records[-1].verdicts][-1] == "block"


def test_add_verdict_outside_a_turn_is_an_error(make_pipeline: Any) -> None:
    with pytest.raises(NimpipeError, match="outside a running turn"):
        make_pipeline().add_verdict(nimpipe.Verdict(rule="x", decision="pass"))


def test_route_extra_body_reaches_the_server(nim_server: Any, make_pipeline: Any) -> None:
    extra = {"nvext": {"priority": 3}}
    pipeline = make_pipeline(routes=[route_for(nim_server, extra_body=extra)])
    assert pipeline.run(Turn.create("a")).ok
    assert "".join(pipeline.stream(Turn.create("b")))
    bodies = [r.body for r in nim_server.requests]
    assert [b["nvext"] for b in bodies] == [{"priority": 3}, {"priority": 3}]


def test_reply_fields_beyond_openai_are_kept() -> None:
    from nimpipe.provider import parse_completion

    reply = {
        "id": "x",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "guardrails": {"config_id": "self_check", "log": {"activated_rails": []}},
    }
    response = parse_completion(
        reply, Route(name="r", base_url="http://127.0.0.1:1/v1", model="m"), 0.1
    )
    assert response.text == "hi"
    assert response.extra == {
        "guardrails": {"config_id": "self_check", "log": {"activated_rails": []}}
    }


def test_streamed_turn_blocked_by_deferred_check_does_not_wait_for_the_model(
    nim_server: Any, make_pipeline: Any
) -> None:
    nim_server.configure(latency=30.0)  # the first token would come after 30 s
    ledger = Ledger()
    pipeline = make_pipeline(
        routes=[route_for(nim_server)], plugins=[SlowInputCheck(0.05, block=True), ledger]
    )

    async def main() -> tuple[list[str], Any]:
        stream = pipeline.astream(Turn.create("bad input"))
        return [c async for c in stream], stream.result

    started = time.perf_counter()
    chunks, result = asyncio.run(main())
    assert time.perf_counter() - started < 10.0, "the block raced the model's first token"
    assert result.blocked is not None and chunks == [result.blocked.message]
    assert [r.outcome for r in ledger.records] == ["cancelled"]


def test_no_stream_route_still_streams_to_the_caller(nim_server: Any, make_pipeline: Any) -> None:
    from nimpipe.stage import NO_STREAM

    ledger = Ledger()
    pipeline = make_pipeline(routes=[route_for(nim_server, flags={NO_STREAM})], plugins=[ledger])
    stream = pipeline.stream(Turn.create("one two three"))
    assert list(stream) == ["NIM reply to: one two three"]
    assert [r.body.get("stream") for r in nim_server.requests] == [None]
    assert ledger.records[0].usage_source == "server"


def test_a_retried_turn_skips_the_input_checks_it_passed(
    nim_server: Any, make_pipeline: Any
) -> None:
    seen: list[str] = []

    class Redactor:
        @hookimpl
        def pre_input(self, turn: Turn) -> Turn:
            seen.append(turn.last_user_text)
            return attrs.evolve(
                turn, messages=[Message.user(turn.last_user_text.replace("4111", "[card]"))]
            )

    pipeline = make_pipeline(routes=[route_for(nim_server, max_retries=0)], plugins=[Redactor()])
    nim_server.inject("status", count=1, status=503)
    with pytest.raises(nimpipe.UnavailableError) as info:
        pipeline.run(Turn.create("card 4111"))
    checked = info.value.checked_turn
    assert checked is not None and checked.last_user_text == "card [card]"
    result = pipeline.run(checked, input_checked=True)
    assert result.text == "NIM reply to: card [card]"
    assert seen == ["card 4111"], "the input was checked once"
