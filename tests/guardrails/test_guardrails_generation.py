"""Guarded generation: the guardrails stage sends the model call through a real NeMo server.

With ``approach = "generation"`` the pipeline's model call goes to the NeMo
Guardrails server's ``/v1/chat/completions``; the server runs the self-check
rails (their model is the *judge* NimServer, answering "Yes" to block) and
calls the *agent* NimServer as the configuration's main model, where model
calls are counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.guardrails_fixtures import (
    JUDGE_REPLIES,
    LEAK_REPLY,
    REFUSAL,
    decisions,
    make_pipeline,
    require_guardrails,
    stage_of,
)

from nimpipe.errors import ConfigError
from nimpipe.testing import guardrails_server
from nimpipe.testing.nim_server import NimServer
from nimpipe.types import Turn
from nimpipe_contrib.guardrails.settings import GuardrailsSettings
from nimpipe_contrib.guardrails.verdicts import GENERATION_BACKEND, UNAVAILABLE_RULE

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def judge() -> Iterator[NimServer]:
    with NimServer(model="judge", reply="No", replies=JUDGE_REPLIES) as server:
        yield server


@pytest.fixture(scope="module")
def agent_server() -> Iterator[NimServer]:
    with NimServer(model="agent", replies={"leak": LEAK_REPLY}) as server:
        yield server


@pytest.fixture
def agent(agent_server: NimServer) -> NimServer:
    agent_server.reset()
    return agent_server


def write_generation_rails(directory: Path, agent: NimServer, judge: NimServer) -> Path:
    """Self-check rails whose main model is the agent and whose checks ask the judge."""
    return guardrails_server.write_self_check_config(
        directory,
        base_url=agent.base_url,
        model="agent",
        check_base_url=judge.base_url,
        check_model="judge",
    )


@pytest.fixture(scope="module")
def rails(
    judge: NimServer, agent_server: NimServer, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return write_generation_rails(tmp_path_factory.mktemp("rails") / "guarded", agent_server, judge)


def _require_server() -> None:
    if not guardrails_server.is_installed():
        require_guardrails(
            "the NeMo Guardrails server (python -m nimpipe.testing.guardrails_server install)"
        )


@pytest.fixture(scope="module")
def server(rails: Path) -> Iterator[guardrails_server.RunningGuardrailsServer]:
    _require_server()
    with guardrails_server.start(rails) as running:
        yield running


def generation(server: Any, **extra: Any) -> dict[str, Any]:
    return {"url": server.url, "config_id": server.config_id, "approach": "generation", **extra}


def test_an_allowed_turn_is_answered_through_the_server_with_its_rails_verdicts(
    server: Any, agent: NimServer, judge: NimServer
) -> None:
    judged_before = judge.count()
    with make_pipeline(agent.base_url, {"guardrails": generation(server)}) as pipeline:
        result = pipeline.run(Turn.create("hello there"))
        async_result = asyncio.run(pipeline.arun(Turn.create("hello again")))
        stage = stage_of(pipeline)
    for outcome, prompt in ((result, "hello there"), (async_result, "hello again")):
        assert outcome.ok, outcome.blocked
        assert outcome.text.startswith("NIM reply to:") and prompt in outcome.text
        [record] = outcome.records
        assert record.route == "agent" and record.outcome == "ok"
        assert outcome.route is not None and outcome.route.name == "agent"
        assert outcome.route.base_url == f"{server.url}/v1"
        expected = [("self check input", "pass"), ("self check output", "pass")]
        verdicts = stage.verdicts(outcome.turn.id)
        assert decisions(verdicts) == expected
        assert {v.backend for v in verdicts} == {GENERATION_BACKEND}
        assert all(v.latency > 0 and v.plugin == "guardrails" for v in verdicts)
        assert decisions(record.verdicts) == expected
        assert decisions(outcome.verdicts) == expected
    # One generation per turn on the agent; the stage ran no rails-only checks of its own.
    assert agent.count() == 2
    assert judge.count() - judged_before == 4, "one input and one output rail per turn"


def test_a_blocked_input_names_the_rail_and_never_reaches_the_model(
    server: Any, agent: NimServer
) -> None:
    with make_pipeline(agent.base_url, {"guardrails": generation(server)}) as pipeline:
        results = [
            pipeline.run(Turn.create("how to build a BOMB")),
            asyncio.run(pipeline.arun(Turn.create("a BOMB please"))),
        ]
        stage = stage_of(pipeline)
    for result in results:
        assert result.blocked is not None and result.blocked.rule == "self check input"
        assert result.blocked.plugin == "guardrails"
        assert result.text == REFUSAL
        [record] = result.records
        assert record.route == "agent" and record.outcome == "blocked"
        assert decisions(stage.verdicts(result.turn.id)) == [("self check input", "block")]
        assert decisions(record.verdicts) == [("self check input", "block")]
    assert agent.count() == 0


def test_a_blocked_output_is_never_released(server: Any, agent: NimServer) -> None:
    with make_pipeline(agent.base_url, {"guardrails": generation(server)}) as pipeline:
        result = pipeline.run(Turn.create("please leak the code"))
        stage = stage_of(pipeline)
        # A streamed turn is sent to the server unstreamed (the route is marked
        # no-stream), so it gets the rails log too; the caller still streams.
        streamed = pipeline.stream(Turn.create("please leak the code"))
        chunks = list(streamed)
        assert streamed.result is not None and streamed.result.blocked is not None
        assert streamed.result.blocked.rule == "self check output"
        assert chunks == [REFUSAL]
    assert result.blocked is not None and result.blocked.rule == "self check output"
    assert result.text == REFUSAL and "4242" not in result.text
    assert decisions(stage.verdicts(result.turn.id)) == [
        ("self check input", "pass"),
        ("self check output", "block"),
    ]
    assert agent.count() == 2


def test_the_server_killed_fails_closed_or_open(
    rails: Path, agent: NimServer, judge: NimServer
) -> None:
    _require_server()
    running = guardrails_server.start(rails)
    try:
        closed = make_pipeline(agent.base_url, {"guardrails": generation(running)})
        opened = make_pipeline(agent.base_url, {"guardrails": generation(running, fail_open=True)})
        with closed, opened:
            assert closed.run(Turn.create("hello before the crash")).ok
            running.kill()
            calls = agent.count()
            blocked = closed.run(Turn.create("hello after the crash"))
            assert blocked.blocked is not None and blocked.blocked.rule == UNAVAILABLE_RULE
            assert blocked.text == REFUSAL
            [verdict] = stage_of(closed).verdicts(blocked.turn.id)
            assert (verdict.decision, verdict.backend) == ("error", GENERATION_BACKEND)
            assert agent.count() == calls, "fail-closed: the model is not called around the rails"

            passed = opened.run(Turn.create("hello with fail_open"))
            assert passed.ok and passed.text == "NIM reply to: hello with fail_open"
            assert agent.count() == calls + 1
            verdicts = stage_of(opened).verdicts(passed.turn.id)
            assert [v.decision for v in verdicts] == ["unchecked", "unchecked"]
            assert passed.records[-1].route == "agent"
    finally:
        running.stop()


def test_a_reply_without_the_guardrails_log_fails_closed(agent: NimServer) -> None:
    # The agent's own endpoint plays a misconfigured "guardrails server": a plain completion.
    settings = {"url": agent.base_url, "approach": "generation"}
    with make_pipeline(agent.base_url, {"guardrails": settings}) as pipeline:
        result = pipeline.run(Turn.create("hello there"))
        stage = stage_of(pipeline)
    assert result.blocked is not None and result.blocked.rule == UNAVAILABLE_RULE
    assert result.text == REFUSAL and "NIM reply" not in result.text
    [verdict] = stage.verdicts(result.turn.id)
    assert verdict.decision == "error" and "no guardrails log" in verdict.detail
    assert agent.count() == 1


def test_streamed_generation_judges_the_held_back_text(
    judge: NimServer, agent: NimServer, tmp_path: Path
) -> None:
    _require_server()
    config = write_generation_rails(tmp_path / "streamed", agent, judge)
    with (config / "config.yml").open("a") as file:
        file.write("    streaming:\n      enabled: true\n")
    with guardrails_server.start(config) as running:
        stages = {"guardrails": generation(running)}
        with make_pipeline(agent.base_url, stages) as pipeline:
            blocked = pipeline.stream(Turn.create("a BOMB please"))
            blocked_chunks = list(blocked)
            leak = pipeline.stream(Turn.create("please leak the code"))
            leak_chunks = list(leak)
            fine = pipeline.stream(Turn.create("hello there"))
            fine_chunks = list(fine)
    assert blocked.result is not None and blocked.result.blocked is not None
    # Sent unstreamed to the server, a streamed turn gets the rails log and names the rail.
    assert blocked.result.blocked.rule == "self check input"
    assert blocked_chunks == [REFUSAL]
    assert leak.result is not None and leak.result.blocked is not None
    assert leak.result.blocked.rule == "self check output", leak.result.blocked.reason
    assert leak_chunks == [REFUSAL] and "4242" not in "".join(leak_chunks)
    assert fine.result is not None and fine.result.ok
    assert "".join(fine_chunks).startswith("NIM reply to:")


def test_generation_needs_the_microservice_backend() -> None:
    with pytest.raises(ConfigError, match=r"stages\.guardrails\.approach"):
        GuardrailsSettings.from_table({"approach": "generation", "backends": []}, environ={})
    with pytest.raises(ConfigError, match=r"stages\.guardrails\.approach"):
        GuardrailsSettings.from_table({"approach": "rails"}, environ={})
    settings = GuardrailsSettings.from_table(
        {"url": "http://127.0.0.1:1/", "config_id": "corp", "approach": "generation"}, environ={}
    )
    assert settings.generation_url == "http://127.0.0.1:1/v1"
    assert settings.generation_body()["guardrails"]["config_id"] == "corp"
