"""The guardrails stage against a real NeMo Guardrails server (its own venv, on 127.0.0.1).

Two NIM-shaped servers play the models: the *judge* is the self-check rails'
model (it answers "Yes", block, when the prompt it judges holds a scripted
word), the *agent* is the model the pipeline calls, where model calls are
counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.guardrails_fixtures import (
    BLOCKED_PART,
    JUDGE_REPLIES,
    LEAK_REPLY,
    REFUSAL,
    TOOL_RULES,
    ScriptedHTTPServer,
    decisions,
    make_pipeline,
    require_guardrails,
    stage_of,
    write_rails,
)

from nimpipe.errors import ConfigError
from nimpipe.testing import guardrails_server
from nimpipe.testing.nim_server import NimServer
from nimpipe.types import Turn
from nimpipe_contrib.guardrails.backends.microservice import MicroserviceBackend
from nimpipe_contrib.guardrails.settings import GuardrailsSettings
from nimpipe_contrib.guardrails.verdicts import UNAVAILABLE_RULE

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def judge() -> Iterator[NimServer]:
    with NimServer(model="judge", reply="No", replies=JUDGE_REPLIES) as server:
        yield server


@pytest.fixture(scope="module")
def agent_server() -> Iterator[NimServer]:
    with NimServer(model="agent", replies={"leak": LEAK_REPLY}, tool_rules=TOOL_RULES) as server:
        yield server


@pytest.fixture
def agent(agent_server: NimServer) -> NimServer:
    agent_server.reset()
    return agent_server


@pytest.fixture(scope="module")
def rails(judge: NimServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rails(tmp_path_factory.mktemp("rails") / "selfcheck", judge.base_url)


@pytest.fixture(scope="module")
def server(rails: Path) -> Iterator[guardrails_server.RunningGuardrailsServer]:
    if not guardrails_server.is_installed():
        require_guardrails(
            "the NeMo Guardrails server (python -m nimpipe.testing.guardrails_server install)"
        )
    with guardrails_server.start(rails) as running:
        yield running


def settings_for(server: Any, **extra: Any) -> dict[str, Any]:
    return {"url": server.url, "config_id": server.config_id, "model": "judge", **extra}


# ----------------------------------------------------------------------
# input
# ----------------------------------------------------------------------


def test_sequential_mode_makes_zero_model_calls_for_blocked_inputs(
    server: Any, agent: NimServer
) -> None:
    stages = {"guardrails": settings_for(server, input_mode="sequential")}
    with make_pipeline(agent.base_url, stages) as pipeline:
        results = [pipeline.run(Turn.create(f"how to build a BOMB, take {i}")) for i in range(3)]
        results.append(asyncio.run(pipeline.arun(Turn.create("a BOMB please"))))
        stage = stage_of(pipeline)
        for result in results:
            assert result.blocked is not None and result.blocked.rule == "self check input"
            assert result.text == REFUSAL and result.records == ()
            [verdict] = stage.verdicts(result.turn.id)
            assert (verdict.rule, verdict.decision, verdict.backend) == (
                "self check input",
                "block",
                "microservice",
            )
            assert verdict.latency > 0 and verdict.plugin == "guardrails"
        assert agent.count() == 0
        ok = pipeline.run(Turn.create("hello there"))
    assert ok.ok and ok.text == "NIM reply to: hello there"
    assert agent.count() == 1


def test_concurrent_mode_cancels_every_call_for_a_blocked_input(
    server: Any, agent: NimServer
) -> None:
    agent.configure(latency=5.0)
    stages = {"guardrails": settings_for(server)}

    async def turns(pipeline: Any) -> list[Any]:
        prompts = [f"a BOMB recipe, take {i}" for i in range(3)]
        return await asyncio.gather(*(timed(pipeline, p) for p in prompts))

    async def timed(pipeline: Any, prompt: str) -> tuple[Any, float]:
        started = time.monotonic()
        result = await pipeline.arun(Turn.create(prompt))
        return result, time.monotonic() - started

    with make_pipeline(agent.base_url, stages) as pipeline:
        outcomes = asyncio.run(turns(pipeline))
        stage = stage_of(pipeline)
        for result, elapsed in outcomes:
            assert elapsed < 4.0, "the block did not cancel the 5 s model call"
            assert result.blocked is not None and result.blocked.rule == "self check input"
            assert result.text == REFUSAL and "NIM reply" not in result.text
            [record] = result.records
            assert record.outcome == "cancelled" and record.reason == "input blocked"
            assert record.prompt_tokens > 0, "the cancelled call's tokens are recorded as spent"
            assert decisions(stage.verdicts(result.turn.id)) == [("self check input", "block")]
            # The verdict reaches the result and the ledger's record of the cancelled call.
            assert decisions(result.verdicts) == [("self check input", "block")]
            assert decisions(record.verdicts) == [("self check input", "block")]
    # Every blocked turn's call reached the model server and was cancelled there.
    assert agent.count() == 3


def test_concurrent_mode_blocks_a_streamed_turn_without_showing_model_text(
    server: Any, agent: NimServer
) -> None:
    agent.configure(latency=0.5, token_delay=0.01)
    stages = {"guardrails": settings_for(server)}

    async def consume(pipeline: Any) -> tuple[list[str], Any]:
        stream = pipeline.astream(Turn.create("a BOMB now"))
        chunks = [chunk async for chunk in stream]
        return chunks, stream.result

    with make_pipeline(agent.base_url, stages) as pipeline:
        chunks, result = asyncio.run(consume(pipeline))
    assert chunks == [REFUSAL]
    assert result.blocked.rule == "self check input"
    assert [r.outcome for r in result.records] == ["cancelled"]


def test_concurrent_mode_passes_clean_input(server: Any, agent: NimServer) -> None:
    agent.configure(latency=0.3)
    stages = {"guardrails": settings_for(server)}
    with make_pipeline(agent.base_url, stages) as pipeline:
        result = asyncio.run(pipeline.arun(Turn.create("tell me about trees")))
        verdicts = stage_of(pipeline).verdicts(result.turn.id)
    assert result.ok and result.text == "NIM reply to: tell me about trees"
    assert decisions(verdicts) == [("input rails", "pass"), ("output rails", "pass")]
    assert [r.outcome for r in result.records] == ["ok"]
    assert result.verdicts == verdicts
    # The accepted call's record carries the input and the output verdicts.
    assert decisions(result.records[0].verdicts) == decisions(verdicts)


# ----------------------------------------------------------------------
# output
# ----------------------------------------------------------------------


def test_blocked_output_never_reaches_the_caller(server: Any, agent: NimServer) -> None:
    stages = {"guardrails": settings_for(server)}
    with make_pipeline(agent.base_url, stages) as pipeline:
        result = pipeline.run(Turn.create("please leak"))
        verdicts = stage_of(pipeline).verdicts(result.turn.id)
    assert result.blocked is not None and result.blocked.rule == "self check output"
    assert result.text == REFUSAL and "SECRET" not in result.text
    assert decisions(verdicts)[-1] == ("self check output", "block")
    assert result.verdicts == verdicts
    assert decisions(result.records[-1].verdicts)[-1] == ("self check output", "block")


@pytest.mark.parametrize("policy", ["buffer", "sentence"])
@pytest.mark.parametrize("way", ["stream", "astream"])
def test_zero_blocked_characters_reach_a_streaming_consumer(
    server: Any, agent: NimServer, policy: str, way: str
) -> None:
    agent.configure(token_delay=0.005)
    # Sentence-by-sentence release needs the input checked first and no tool-call judge.
    settings = settings_for(server, input_mode="sequential", check_tool_calls=False)
    with make_pipeline(agent.base_url, {"guardrails": settings}, stream_policy=policy) as pipeline:
        if way == "stream":
            stream = pipeline.stream(Turn.create("please leak"))
            chunks = list(stream)
        else:

            async def consume() -> tuple[list[str], Any]:
                s = pipeline.astream(Turn.create("please leak"))
                return [c async for c in s], s

            chunks, stream = asyncio.run(consume())
    seen = "".join(chunks)
    assert stream.result is not None and stream.result.blocked.rule == "self check output"
    assert "SECRET" not in seen
    # Not one word of the blocked sentences, nor a piece of one (chunks are words).
    assert not any(word in seen for word in BLOCKED_PART.split() if len(word) > 2)
    if policy == "buffer":
        assert chunks == [REFUSAL]
    else:
        # The first sentence passed its check and was released; the rest never was.
        assert chunks == ["First sentence is fine. ", REFUSAL]


# ----------------------------------------------------------------------
# tool calls
# ----------------------------------------------------------------------


def test_a_proposed_tool_call_is_checked_before_the_agent_gets_it(
    server: Any, agent: NimServer
) -> None:
    from nimpipe.types import ToolSpec

    tools = [ToolSpec(name=n) for n in ("shell", "clock", "drop_database")]
    settings = settings_for(server, denied_tools=["drop_database"])
    with make_pipeline(agent.base_url, {"guardrails": settings}) as pipeline:
        risky = pipeline.run(Turn.create("please clean up the disk", tools=tools))
        denied = pipeline.run(Turn.create("drop it now", tools=tools))
        harmless = pipeline.run(Turn.create("what time is it", tools=tools))
        stage = stage_of(pipeline)
        risky_verdicts = decisions(stage.verdicts(risky.turn.id))
    assert risky.blocked is not None and risky.blocked.rule == "self check output"
    assert risky.tool_calls == () and risky.records[0].outcome == "blocked"
    assert ("self check output", "block") in risky_verdicts
    assert denied.blocked is not None and denied.blocked.rule == "guardrails:denied-tool"
    assert harmless.ok and [c.name for c in harmless.tool_calls] == ["clock"]


# ----------------------------------------------------------------------
# failures: down, slow, garbage
# ----------------------------------------------------------------------


def test_killing_the_guardrails_server_mid_run_fails_closed(
    rails: Path, agent: NimServer, tmp_path: Path
) -> None:
    if not guardrails_server.is_installed():
        require_guardrails("the NeMo Guardrails server")
    running = guardrails_server.start(rails)
    try:
        closed = make_pipeline(agent.base_url, {"guardrails": settings_for(running, timeout=3.0)})
        opened = make_pipeline(
            agent.base_url, {"guardrails": settings_for(running, timeout=3.0, fail_open=True)}
        )
        with closed, opened:
            before = closed.run(Turn.create("hello before the crash"))
            assert before.ok
            running.kill()  # SIGKILL by pid, mid-run
            calls = agent.count()
            after = [
                closed.run(Turn.create("hello after the crash")),
                asyncio.run(closed.arun(Turn.create("hello again"))),
            ]
            for result in after:
                assert result.blocked is not None and result.blocked.rule == UNAVAILABLE_RULE
                assert result.text == REFUSAL
                [verdict] = stage_of(closed).verdicts(result.turn.id)
                assert verdict.decision == "error" and verdict.backend == "microservice"
            assert agent.count() - calls <= 1, "at most the concurrent call started, then cancelled"

            passed = opened.run(Turn.create("hello with fail_open"))
            assert passed.ok and passed.text == "NIM reply to: hello with fail_open"
            verdicts = stage_of(opened).verdicts(passed.turn.id)
            assert decisions(verdicts) == [(UNAVAILABLE_RULE, "unchecked")] * 2
            assert decisions(passed.records[0].verdicts) == decisions(verdicts)
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("answer", "delay", "reason"),
    [
        ((200, "<html>this is no verdict"), 0.0, "HTTP 200"),
        ((200, {"verdict": "maybe"}), 0.0, "HTTP 200"),
        ((200, {"status": "perhaps"}), 0.0, "unknown rails status"),
        ((503, {"error": {"message": "overloaded"}}), 0.0, "overloaded"),
        ((200, {"status": "passed"}), 2.0, "no verdict within 0.5 s"),
    ],
)
def test_garbage_errors_and_slowness_fail_closed(
    agent: NimServer, answer: tuple[int, Any], delay: float, reason: str
) -> None:
    with ScriptedHTTPServer(lambda path, body: answer, delay) as bad:
        settings = {"url": bad.url, "timeout": 0.5, "input_mode": "sequential"}
        with make_pipeline(agent.base_url, {"guardrails": settings}) as pipeline:
            result = pipeline.run(Turn.create("hello"))
            [verdict] = stage_of(pipeline).verdicts(result.turn.id)
    assert result.blocked is not None and result.blocked.rule == UNAVAILABLE_RULE
    assert reason in result.blocked.reason and verdict.decision == "error"
    assert agent.count() == 0


# ----------------------------------------------------------------------
# report-only mode, guarded generation
# ----------------------------------------------------------------------


def test_report_mode_checks_and_records_without_blocking(server: Any, agent: NimServer) -> None:
    with make_pipeline(
        agent.base_url, {"guardrails": settings_for(server, mode="report")}
    ) as pipeline:
        bad_input = pipeline.run(Turn.create("a BOMB please"))
        bad_output = pipeline.run(Turn.create("please leak"))
        stage = stage_of(pipeline)
        input_verdicts = stage.verdicts(bad_input.turn.id)
        output_verdicts = stage.verdicts(bad_output.turn.id)
    assert bad_input.ok and bad_output.ok and bad_output.text == LEAK_REPLY
    assert ("self check input", "block") in decisions(input_verdicts)
    assert ("self check output", "block") in decisions(output_verdicts)
    assert all(v.detail.startswith("report only") for v in input_verdicts if v.decision == "block")


def test_guarded_generation_returns_the_rails_verdicts(server: Any) -> None:
    backend = MicroserviceBackend(url=server.url, config_id=server.config_id)

    async def both() -> list[Any]:
        try:
            return [
                await backend.guarded_completion([{"role": "user", "content": m}], "judge")
                for m in ("hello", "a BOMB")
            ]
        finally:
            await backend.aclose()

    allowed, blocked = asyncio.run(both())
    assert not allowed.blocked and allowed.text == "No"  # the judge is also the main model here
    assert [(v.rule, v.decision) for v in allowed.verdicts][:1] == [("self check input", "pass")]
    assert blocked.blocked and blocked.text == REFUSAL
    assert (blocked.verdicts[0].rule, blocked.verdicts[0].decision) == ("self check input", "block")


# ----------------------------------------------------------------------
# settings and providers
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"mode": "loud", "url": "http://x"}, "stages.guardrails.mode"),
        ({"input_mode": "parallel", "url": "http://x"}, "stages.guardrails.input_mode"),
        ({"timeout": 0, "url": "http://x"}, "stages.guardrails.timeout"),
        ({"fail_open": "yes", "url": "http://x"}, "stages.guardrails.fail_open"),
        ({"backends": ["magic"], "url": "http://x"}, "stages.guardrails.backends"),
        ({}, "stages.guardrails.url"),
        ({"url": "ftp://x"}, "stages.guardrails.url"),
        ({"colour": "red", "url": "http://x"}, "stages.guardrails.colour"),
        ({"backends": ["inprocess"]}, "stages.guardrails.config_path"),
        ({"backends": ["jailbreak"]}, "stages.guardrails.jailbreak.url"),
        (
            {"backends": ["content_safety"], "content_safety": {"base_url": "http://x"}},
            "stages.guardrails.content_safety.model",
        ),
    ],
)
def test_bad_settings_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        GuardrailsSettings.from_table(table, environ={})
    assert caught.value.key == key


def test_bad_settings_fail_pipeline_creation(nim_server: NimServer) -> None:
    # A stage's config error reaches the caller as it is, naming the key (not wrapped).
    with pytest.raises(ConfigError) as caught:
        make_pipeline(nim_server.base_url, {"guardrails": {"mode": "loud", "url": "http://x"}})
    assert caught.value.key == "stages.guardrails.mode"
    assert "stages.guardrails.mode" in str(caught.value)


def test_a_rails_server_that_echoes_its_key_never_shows_it(
    agent: NimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rail names, rewrites and errors that quote the key reach rules and reasons masked."""
    import secrets

    from support.echo_servers import EchoServer

    key = "rails-" + secrets.token_hex(16)  # not key-shaped: the stage registers it
    monkeypatch.setenv("RAILS_TEST_KEY", key)
    with EchoServer() as echo:
        outcomes = {}
        for mode in ("nemo-block", "nemo-500", "nemo-rewrite"):
            settings = {
                "url": f"{echo.url}/{mode}",
                "api_key_env": "RAILS_TEST_KEY",
                "input_mode": "sequential",
            }
            with make_pipeline(agent.base_url, {"guardrails": settings}) as pipeline:
                result = pipeline.run(Turn.create("hello"))
                outcomes[mode] = (result, stage_of(pipeline).verdicts(result.turn.id))
    blocked, failed, rewritten = outcomes.values()
    assert blocked[0].blocked is not None and blocked[0].blocked.rule == "self check ***"
    assert failed[0].blocked is not None and failed[0].blocked.rule == UNAVAILABLE_RULE
    assert rewritten[0].ok, "the rewritten input reached the model"
    assert "Incorrect API key provided: ***" in agent.requests[-1].body["messages"][-1]["content"]
    for result, verdicts in outcomes.values():
        assert key not in repr(result) and key not in repr(verdicts)
    assert key not in repr([r.body for r in agent.requests])


def test_jaato_environment_variables_are_honoured() -> None:
    env = {
        "JAATO_NIM_GUARDRAILS_URL": "http://guard:7331",
        "JAATO_NIM_GUARDRAILS_CONFIG": "corp",
    }
    settings = GuardrailsSettings.from_table({}, environ=env)
    assert (settings.url, settings.config_id, settings.backends) == (
        "http://guard:7331",
        "corp",
        ("microservice",),
    )
    explicit = GuardrailsSettings.from_table({"url": "http://other:1"}, environ=env)
    assert explicit.url == "http://other:1" and explicit.config_id == "corp"
