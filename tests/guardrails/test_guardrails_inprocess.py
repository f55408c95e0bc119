"""The guardrails stage with NeMo Guardrails' LLMRails in this process.

The same semantics as the microservice (tests/guardrails/test_guardrails.py): the
self-check rails ask a judge NimServer, the agent's model is another
NimServer where model calls are counted.  Skipped when ``nemoguardrails`` is
not importable, unless ``NIMPIPE_REQUIRE_GUARDRAILS`` is set.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
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
    decisions,
    make_pipeline,
    require_guardrails,
    stage_of,
    write_rails,
)

from nimpipe.errors import ConfigError
from nimpipe.pipeline import Pipeline
from nimpipe.testing.nim_server import NimServer
from nimpipe.types import ToolSpec, Turn
from nimpipe_contrib.guardrails.backends.inprocess import nemoguardrails_available
from nimpipe_contrib.guardrails.settings import GuardrailsSettings
from nimpipe_contrib.guardrails.verdicts import UNAVAILABLE_RULE

pytestmark = [
    pytest.mark.timeout(120),
    # NeMo Guardrails 0.24 reads a deprecated field of its own config while loading.
    pytest.mark.filterwarnings("ignore:Use 'nim_base_url' instead:DeprecationWarning"),
]


@pytest.fixture(scope="module", autouse=True)
def _needs_nemoguardrails() -> None:
    if not nemoguardrails_available():
        require_guardrails('nemoguardrails (pip install "nimpipe[guardrails]")')


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
    return write_rails(tmp_path_factory.mktemp("inprocess") / "selfcheck", judge.base_url)


def _loaded(pipeline: Pipeline) -> Pipeline:
    stage_of(pipeline).wait_ready(120)
    return pipeline


@pytest.fixture(scope="module")
def concurrent(rails: Path, agent_server: NimServer) -> Iterator[Pipeline]:
    """Concurrent input checks, tool-call checks, buffered streams."""
    settings = {"backends": ["inprocess"], "config_path": str(rails)}
    with _loaded(make_pipeline(agent_server.base_url, {"guardrails": settings})) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def sequential(rails: Path, agent_server: NimServer) -> Iterator[Pipeline]:
    """Sequential input checks, no tool-call judge, sentence-by-sentence streams."""
    settings = {
        "config_path": str(rails),
        "input_mode": "sequential",
        "check_tool_calls": False,
    }
    stages = {"guardrails": settings}
    with _loaded(
        make_pipeline(agent_server.base_url, stages, stream_policy="sentence")
    ) as pipeline:
        yield pipeline


def test_config_path_alone_selects_the_inprocess_backend(rails: Path) -> None:
    settings = GuardrailsSettings.from_table({"config_path": str(rails)}, environ={})
    assert settings.backends == ("inprocess",)


def test_sequential_mode_makes_zero_model_calls_for_blocked_inputs(
    sequential: Pipeline, agent: NimServer
) -> None:
    results = [sequential.run(Turn.create(f"a BOMB, take {i}")) for i in range(3)]
    stage = stage_of(sequential)
    for result in results:
        assert result.blocked is not None and result.blocked.rule == "self check input"
        assert result.records == ()
        [verdict] = stage.verdicts(result.turn.id)
        assert (verdict.decision, verdict.backend) == ("block", "inprocess")
    assert agent.count() == 0


def test_concurrent_mode_cancels_the_call_of_a_blocked_input(
    concurrent: Pipeline, agent: NimServer
) -> None:
    agent.configure(latency=5.0)
    started = time.monotonic()
    result = asyncio.run(concurrent.arun(Turn.create("a BOMB recipe")))
    assert time.monotonic() - started < 4.0
    assert result.blocked is not None and result.blocked.rule == "self check input"
    assert result.text == REFUSAL
    assert [r.outcome for r in result.records] == ["cancelled"]
    assert result.records[0].prompt_tokens > 0
    assert agent.count() <= 1  # the check may win before the request is even sent


def test_clean_turn_passes_with_input_and_output_verdicts(
    concurrent: Pipeline, agent: NimServer
) -> None:
    result = asyncio.run(concurrent.arun(Turn.create("tell me about trees")))
    assert result.ok and result.text == "NIM reply to: tell me about trees"
    verdicts = stage_of(concurrent).verdicts(result.turn.id)
    assert decisions(verdicts) == [("input rails", "pass"), ("output rails", "pass")]
    assert all(v.backend == "inprocess" and v.latency > 0 for v in verdicts)


@pytest.mark.parametrize("policy", ["buffer", "sentence"])
def test_zero_blocked_characters_reach_a_streaming_consumer(
    concurrent: Pipeline, sequential: Pipeline, agent: NimServer, policy: str
) -> None:
    agent.configure(token_delay=0.005)
    pipeline = concurrent if policy == "buffer" else sequential
    stream = pipeline.stream(Turn.create("please leak"))
    chunks = list(stream)
    seen = "".join(chunks)
    assert stream.result is not None and stream.result.blocked.rule == "self check output"
    assert not any(word in seen for word in BLOCKED_PART.split() if len(word) > 2)
    expected = [REFUSAL] if policy == "buffer" else ["First sentence is fine. ", REFUSAL]
    assert chunks == expected


def test_a_proposed_tool_call_is_checked(concurrent: Pipeline, agent: NimServer) -> None:
    tools = [ToolSpec(name="shell"), ToolSpec(name="clock")]
    risky = concurrent.run(Turn.create("please clean up", tools=tools))
    harmless = concurrent.run(Turn.create("what time is it", tools=tools))
    assert risky.blocked is not None and risky.blocked.rule == "self check output"
    assert risky.tool_calls == ()
    assert harmless.ok and [c.name for c in harmless.tool_calls] == ["clock"]


def test_report_mode(rails: Path, agent: NimServer) -> None:
    settings = {"config_path": str(rails), "mode": "report", "input_mode": "sequential"}
    with _loaded(make_pipeline(agent.base_url, {"guardrails": settings})) as pipeline:
        result = pipeline.run(Turn.create("a BOMB please"))
        verdicts = stage_of(pipeline).verdicts(result.turn.id)
    assert result.ok and agent.count() == 1
    assert ("self check input", "block") in decisions(verdicts)


def test_judge_model_down_fails_closed_and_fail_open_records_unchecked(
    agent: NimServer, tmp_path: Path
) -> None:
    with NimServer(model="judge", reply="No") as doomed:
        rails = write_rails(tmp_path / "doomed", doomed.base_url)
        base = {"config_path": str(rails), "timeout": 3.0, "input_mode": "sequential"}
        closed = _loaded(make_pipeline(agent.base_url, {"guardrails": base}))
        opened = _loaded(make_pipeline(agent.base_url, {"guardrails": {**base, "fail_open": True}}))
        with closed, opened:
            assert closed.run(Turn.create("hello")).ok
            doomed.stop()
            blocked = closed.run(Turn.create("hello again"))
            passed = opened.run(Turn.create("hello, open"))
            closed_verdicts = stage_of(closed).verdicts(blocked.turn.id)
            open_verdicts = stage_of(opened).verdicts(passed.turn.id)
    assert blocked.blocked is not None and blocked.blocked.rule == UNAVAILABLE_RULE
    assert decisions(closed_verdicts) == [(UNAVAILABLE_RULE, "error")]
    assert passed.ok and passed.text == "NIM reply to: hello, open"
    assert decisions(open_verdicts) == [(UNAVAILABLE_RULE, "unchecked")] * 2


def test_missing_nemoguardrails_names_the_extra(
    rails: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "nemoguardrails", None)  # what a missing package looks like
    with pytest.raises(ConfigError, match=r'pip install "nimpipe\[guardrails\]"') as caught:
        GuardrailsSettings.from_table({"config_path": str(rails)}, environ={})
    assert caught.value.key == "stages.guardrails.backends"


def test_nemoguardrails_is_imported_only_by_the_inprocess_backend(
    rails: Path, agent: NimServer
) -> None:
    code = (
        "import sys\n"
        "import nimpipe_contrib.guardrails.stage, nimpipe_contrib.guardrails.demo\n"
        "import nimpipe_contrib.guardrails.pii\n"
        "assert 'nemoguardrails' not in sys.modules, 'imported at import time'\n"
        "assert 'httpx' not in sys.modules, 'httpx imported at import time'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_settings_with_any_extra_keys_are_refused(rails: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        GuardrailsSettings.from_table({"config_path": str(rails), "rails": "x"}, environ={})
    assert caught.value.key == "stages.guardrails.rails"


def test_stage_verdicts_are_kept_per_turn(concurrent: Pipeline, agent: NimServer) -> None:
    results: list[Any] = [concurrent.run(Turn.create(f"hello {i}")) for i in range(2)]
    stage = stage_of(concurrent)
    for result in results:
        assert {v.rule for v in stage.verdicts(result.turn.id)} == {"input rails", "output rails"}
