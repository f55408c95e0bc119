"""The regex PII redactor: alone, and as a guardrails provider through the checker hooks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from support.guardrails_fixtures import REFUSAL, decisions, make_pipeline, stage_of

from nimpipe import hookimpl
from nimpipe.errors import ConfigError
from nimpipe.testing.nim_server import NimServer
from nimpipe.types import ToolCall, ToolSpec, Turn, Verdict
from nimpipe_contrib.guardrails.checkers import HOOK_NAMES, declare_hooks
from nimpipe_contrib.guardrails.pii import (
    KINDS,
    PiiRedactor,
    PiiSettings,
    find_pii,
    luhn_valid,
    redact,
)
from nimpipe_contrib.guardrails.verdicts import UNAVAILABLE_RULE

pytestmark = pytest.mark.timeout(60)

SAMPLES = {
    "email": ["jane.doe@example.com", "ops+alerts@mail.example.co.uk"],
    "phone": ["+1 415 555 0100", "(415) 555-0100", "+44 20 7946 0958", "+4915112345678"],
    "card": ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"],
    "iban": ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432"],
    "ssn": ["123-45-6789"],
    # Built here, not written out, so that no credential-shaped literal is committed.
    "api_key": [
        "sk-proj-" + "x" * 28,
        "nvapi-" + "Fake" * 8,
        "ghp_" + "0" * 36,
        "AKIA" + "EXAMPLE0" * 2,
    ],
}

NOT_PII = [
    "on 2024-01-15 at 10:30",
    "server 10.0.0.1 and 192.168.1.100",
    "version 1.2.3, 42 items, pi is 3.14159",
    "order number 12345678",
    "4111 1111 1111 1112",  # fails the Luhn check
    "DE00 3704 0044 0532 0130 00",  # fails the IBAN check
    "sk-short",
]


@pytest.mark.parametrize(("kind", "text"), [(k, t) for k, ts in SAMPLES.items() for t in ts])
def test_each_kind_is_found_and_redacted(kind: str, text: str) -> None:
    found = find_pii(f"before {text} after")
    assert [f.kind for f in found] == [kind]
    assert redact(f"before {text} after")[0] == f"before [{kind.upper()}] after"


@pytest.mark.parametrize("text", NOT_PII)
def test_lookalikes_are_left_alone(text: str) -> None:
    assert find_pii(text) == []


def test_invalid_ssn_areas_are_not_ssns() -> None:
    for text in ("000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567"):
        assert "ssn" not in {f.kind for f in find_pii(text)}


def test_luhn() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_kinds_can_be_narrowed() -> None:
    text = "mail jane@example.com, card 4111 1111 1111 1111"
    assert redact(text, ["email"])[0] == "mail [EMAIL], card 4111 1111 1111 1111"
    assert set(KINDS) == set(SAMPLES)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"action": "shred"}, "stages.pii_redactor.action"),
        ({"kinds": ["email", "dna"]}, "stages.pii_redactor.kinds"),
        ({"check_input": "no"}, "stages.pii_redactor.check_input"),
        ({"mode": "x"}, "stages.pii_redactor.mode"),
    ],
)
def test_bad_settings_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        PiiSettings.from_table(table)
    assert caught.value.key == key


@pytest.fixture
def agent() -> Iterator[NimServer]:
    replies = {"contact": "Write to jane.doe@example.com or call +1 415 555 0100. Thanks."}
    rules = {"pay": {"name": "pay", "arguments": {"card": "4111 1111 1111 1111"}}}
    with NimServer(model="agent", replies=replies, tool_rules=rules) as server:
        yield server


def redactor_of(pipeline: Any) -> PiiRedactor:
    plugin = pipeline.plugins.pm.get_plugin("pii_redactor")
    assert isinstance(plugin, PiiRedactor)
    return plugin


# ----------------------------------------------------------------------
# alone
# ----------------------------------------------------------------------


def test_alone_it_redacts_input_before_the_model_sees_it_and_output(agent: NimServer) -> None:
    with make_pipeline(agent.base_url, {"pii_redactor": {}}) as pipeline:
        result = pipeline.run(Turn.create("my card is 4111 1111 1111 1111, contact me"))
        verdicts = redactor_of(pipeline).verdict_log.get(result.turn.id)
    sent = agent.requests[-1].body["messages"][-1]["content"]
    assert sent == "my card is [CARD], contact me"
    assert result.text == "Write to [EMAIL] or call [PHONE]. Thanks."
    assert decisions(verdicts) == [("pii:card", "rewrite"), ("pii:email,phone", "rewrite")]
    assert all("4111" not in v.detail and "@" not in v.detail for v in verdicts)
    assert result.verdicts == verdicts


def test_alone_with_block_it_blocks_input_and_output(agent: NimServer) -> None:
    with make_pipeline(agent.base_url, {"pii_redactor": {"action": "block"}}) as pipeline:
        blocked_in = pipeline.run(Turn.create("my SSN is 123-45-6789"))
        blocked_out = pipeline.run(Turn.create("contact details please"))
    assert blocked_in.blocked is not None and blocked_in.blocked.rule == "pii:ssn"
    assert blocked_out.blocked is not None and blocked_out.blocked.rule == "pii:email,phone"
    assert blocked_out.text == REFUSAL
    assert agent.count() == 1


@pytest.mark.parametrize("policy", ["buffer", "sentence"])
def test_alone_streamed_output_is_redacted_before_release(agent: NimServer, policy: str) -> None:
    agent.configure(token_delay=0.002)
    with make_pipeline(agent.base_url, {"pii_redactor": {}}, stream_policy=policy) as pipeline:
        stream = pipeline.stream(Turn.create("contact details please"))
        chunks = list(stream)
    seen = "".join(chunks)
    assert "jane.doe" not in seen and "555" not in seen
    assert seen == "Write to [EMAIL] or call [PHONE]. Thanks."


# ----------------------------------------------------------------------
# as a guardrails provider
# ----------------------------------------------------------------------


def test_as_a_provider_it_redacts_before_the_guardrails_backends_and_the_model(
    agent: NimServer,
) -> None:
    stages = {"guardrails": {"backends": []}, "pii_redactor": {}}
    with make_pipeline(agent.base_url, stages) as pipeline:
        assert not redactor_of(pipeline).standalone
        infos = {i.name: i.hooks for i in pipeline.plugins.info()}
        result = asyncio.run(
            pipeline.arun(Turn.create("IBAN DE89 3704 0044 0532 0130 00, contact"))
        )
        verdicts = stage_of(pipeline).verdicts(result.turn.id)
    assert "guardrails_check_input" in infos["pii_redactor"]
    assert infos["guardrails.checkers"] == ("pre_input",)
    assert agent.requests[-1].body["messages"][-1]["content"] == "IBAN [IBAN], contact"
    assert result.text == "Write to [EMAIL] or call [PHONE]. Thanks."
    assert decisions(verdicts) == [("pii:iban", "rewrite"), ("pii:email,phone", "rewrite")]
    assert {v.plugin for v in verdicts} == {"pii_redactor"}


def test_as_a_provider_with_block_it_blocks_tool_calls_carrying_pii(agent: NimServer) -> None:
    stages = {"guardrails": {"backends": []}, "pii_redactor": {"action": "block"}}
    with make_pipeline(agent.base_url, stages) as pipeline:
        result = pipeline.run(Turn.create("pay the bill", tools=[ToolSpec(name="pay")]))
        verdicts = stage_of(pipeline).verdicts(result.turn.id)
    assert result.blocked is not None and result.blocked.rule == "pii:card"
    assert result.tool_calls == ()
    assert decisions(verdicts) == [("pii:card", "block")]


def test_report_mode_records_provider_blocks_without_acting(agent: NimServer) -> None:
    stages = {"guardrails": {"backends": [], "mode": "report"}, "pii_redactor": {"action": "block"}}
    with make_pipeline(agent.base_url, stages) as pipeline:
        result = pipeline.run(Turn.create("contact details please"))
        verdicts = stage_of(pipeline).verdicts(result.turn.id)
    assert result.ok and "jane.doe@example.com" in result.text
    assert decisions(verdicts) == [("pii:email,phone", "block")]


# ----------------------------------------------------------------------
# the checker hooks, for any third-party provider
# ----------------------------------------------------------------------


class ShoutChecker:
    """A third-party provider: blocks answers in capitals, flags calls to ``format_disk``."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def addhooks(self, pluginmanager: Any) -> None:
        declare_hooks(pluginmanager)

    @hookimpl
    async def guardrails_check_input(self, turn: Turn, text: str) -> Verdict | None:
        self.seen.append(text)
        return Verdict(rule="shout:input", decision="pass")

    @hookimpl
    def guardrails_check_output(self, text: str) -> Verdict | None:
        if text.isupper():
            return Verdict(rule="shout:no-capitals", decision="block", detail="all capitals")
        return None

    @hookimpl
    def guardrails_check_tool_call(self, call: ToolCall) -> Verdict | None:
        if call.name == "format_disk":
            return Verdict(rule="shout:tool", decision="block")
        return None


class BrokenChecker:
    @hookimpl
    def guardrails_check_input(self, text: str) -> Verdict | None:
        raise RuntimeError("checker crashed")


def test_third_party_checkers_are_aggregated(make_pipeline_factory: Any) -> None:
    checker = ShoutChecker()
    with NimServer(
        model="agent", replies={"shout": "HELLO THERE"}, tool_rules={"disk": "format_disk"}
    ) as agent:
        pipeline = make_pipeline_factory(agent, plugins=[("shout", checker)])
        passed = pipeline.run(Turn.create("hello"))
        shouted = pipeline.run(Turn.create("shout at me"))
        tool = pipeline.run(Turn.create("wipe the disk", tools=[ToolSpec(name="format_disk")]))
        stage = stage_of(pipeline)
        assert decisions(stage.verdicts(passed.turn.id)) == [("shout:input", "pass")]
        assert shouted.blocked is not None and shouted.blocked.rule == "shout:no-capitals"
        assert tool.blocked is not None and tool.blocked.rule == "shout:tool"
        verdict = stage.verdicts(shouted.turn.id)[-1]
        assert (verdict.plugin, verdict.backend) == ("shout", "hook:shout")
    assert checker.seen == ["hello", "shout at me", "wipe the disk"]


def test_a_failing_checker_fails_closed(make_pipeline_factory: Any, nim_server: NimServer) -> None:
    pipeline = make_pipeline_factory(nim_server, plugins=[("broken", BrokenChecker())])
    result = pipeline.run(Turn.create("hello"))
    assert result.blocked is not None and result.blocked.rule == UNAVAILABLE_RULE
    assert "checker crashed" in result.blocked.reason and nim_server.count() == 0


def test_declaring_the_hooks_twice_is_harmless() -> None:
    import pluggy

    pm = pluggy.PluginManager("nimpipe")
    declare_hooks(pm)
    declare_hooks(pm)
    assert all(getattr(pm.hook, name).spec is not None for name in HOOK_NAMES)


@pytest.fixture
def make_pipeline_factory() -> Iterator[Any]:
    """Pipelines with the guardrails stage (no backend) and extra plugins."""
    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline
    from nimpipe.types import Route

    made: list[Pipeline] = []

    def make(agent: NimServer, plugins: Any = ()) -> Pipeline:
        config = Config.from_dict({"stages": {"guardrails": {"backends": []}}}, env={})
        config = config.with_routes(
            Route(name="agent", base_url=agent.base_url, model=agent.settings.model),
            default="agent",
        )
        pipeline = Pipeline.create(config, plugins=plugins, entrypoints=False)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.close()


def test_every_checker_hook_is_documented_with_its_signature() -> None:
    import inspect
    from pathlib import Path

    from nimpipe_contrib.guardrails.checkers import GuardrailsCheckerSpec

    docs = (Path(__file__).resolve().parents[2] / "docs" / "guardrails.md").read_text()
    for name in HOOK_NAMES:
        spec = getattr(GuardrailsCheckerSpec, name)
        params = [p for p in inspect.signature(spec).parameters if p != "self"]
        assert f"### `{name}({', '.join(params)})`" in docs
        doc = inspect.getdoc(spec) or ""
        assert all(f":param {p}:" in doc for p in params) and ":return:" in doc
        assert "*Collected*" in doc


def test_every_setting_is_documented() -> None:
    from pathlib import Path

    from nimpipe_contrib.guardrails.settings import KEYS as _KEYS

    docs = (Path(__file__).resolve().parents[2] / "docs" / "guardrails.md").read_text()
    for key in sorted(_KEYS):
        assert f"`{key}`" in docs or f"[stages.guardrails.{key}]" in docs, key


@pytest.mark.parametrize("policy", ["buffer", "sentence"])
def test_with_the_guardrails_stage_sentences_are_released_one_by_one(
    agent: NimServer, policy: str
) -> None:
    # The guardrails stage checks tool calls in on_response but declares that it
    # does not judge answers, so the sentence policy still releases sentence by sentence.
    agent.configure(token_delay=0.002)
    stages = {"guardrails": {"backends": []}, "pii_redactor": {}}
    with make_pipeline(agent.base_url, stages, stream_policy=policy) as pipeline:
        assert pipeline.plugins.has_impls("on_response")
        stream = pipeline.stream(Turn.create("contact details please"))
        chunks = list(stream)
    assert "".join(chunks) == "Write to [EMAIL] or call [PHONE]. Thanks."
    if policy == "sentence":
        assert chunks == ["Write to [EMAIL] or call [PHONE]. ", "Thanks."]
    else:
        assert chunks == ["Write to [EMAIL] or call [PHONE]. Thanks."]
