"""The router stage: rules on turn features, context fit, the cost optimiser, health, reasons."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nimpipe import Price, Route, ToolSpec, Turn
from nimpipe.errors import ConfigError
from nimpipe.testing.nim_server import NimServer
from nimpipe_contrib.routing.router import RouterStage, estimate_complexity, infer_tags

LOCAL = "meta/llama-3.1-8b-instruct"
CODER = "qwen/qwen2.5-coder-32b-instruct"
FRONTIER = "meta/llama-3.1-405b-instruct"
LONG = "meta/llama-3.1-70b-instruct"


@pytest.fixture(scope="module")
def server() -> Iterator[NimServer]:
    with NimServer(models=[LOCAL, CODER, FRONTIER, LONG]) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _reset(server: NimServer) -> None:
    server.reset()


def routes(server: NimServer) -> list[Route]:
    url = server.base_url
    return [
        Route(name="local", base_url=url, model=LOCAL, self_hosted=True, tier=0,
              context_length=8192),
        Route(name="coder", base_url=url, model=CODER, tier=1, context_length=32768,
              price=Price(input_per_1k=0.0008, output_per_1k=0.0008)),
        Route(name="long", base_url=url, model=LONG, tier=1, context_length=131072,
              price=Price(input_per_1k=0.00088, output_per_1k=0.00088)),
        Route(name="frontier", base_url=url, model=FRONTIER, tier=2, context_length=131072,
              price=Price(input_per_1k=0.0035, output_per_1k=0.0035)),
    ]  # fmt: skip


RULES = [
    {"match": {"agent_type": "orchestrator"}, "route": "frontier", "name": "orchestrator"},
    {"match": {"tools_min": 3}, "route": "local", "name": "tool-heavy"},
    {"match": {"tags": ["code"]}, "route": "coder"},
    {"match": {"tokens_min": 10000}, "tier": 1, "name": "long context"},
    {"match": {"agent_name": ["researcher"]}, "route": "long"},
]


def make(make_pipeline: Any, server: NimServer, tmp_path: Path, **router: Any) -> Any:
    router.setdefault("rules", RULES)
    return make_pipeline(
        routes=routes(server),
        stages={"router": router, "ledger": {"path": str(tmp_path / "l.sqlite")}},
    )


def reasons(pipeline: Any) -> dict[str, str]:
    rows = pipeline.plugins.pm.get_plugin("ledger").ledger.rows()
    return {row["turn_id"]: row["routing_reason"] for row in rows}


TOOLS = [ToolSpec(name=f"tool_{i}") for i in range(4)]


def test_rules_route_by_agent_tools_tags_tokens_and_name(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make(make_pipeline, server, tmp_path)
    cases = {
        "frontier": Turn.create("plan the work", agent_type="orchestrator"),
        "local": Turn.create("look around", agent_type="explorer", tools=TOOLS),
        "coder": Turn.create("fix this:\n```python\nprint(1\n```"),
        # too long for coder's 32k window: the cheapest tier-1 route that fits is "long"
        "long": Turn.create("summary please " + "word " * 40000),
    }
    researcher = Turn.create("find sources", metadata={"jaato": {"agent_name": "researcher"}})
    for expected, turn in cases.items():
        assert pipeline.run(turn).route.name == expected, expected
    assert pipeline.run(researcher).route.name == "long"
    # no rule matches: the default route (the first one) answers
    plain = pipeline.run(Turn.create("hello"))
    assert plain.route.name == "local"
    why = reasons(pipeline)
    assert why[cases["frontier"].id] == "router: orchestrator (agent type orchestrator) -> frontier"
    assert why[cases["local"].id] == "router: tool-heavy (4 tools >= 3) -> local"
    assert why[cases["coder"].id] == "router: rule 3 (tags ['code']) -> coder"
    assert why[cases["long"].id].startswith("router: long context (~400")
    assert "prompt tokens >= 10000) -> long, the cheapest tier-1 route" in why[cases["long"].id]
    assert why[researcher.id] == "router: rule 5 (agent researcher) -> long"
    assert why[plain.turn.id] == ""


def test_subagents_on_nim_orchestrator_on_the_frontier(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make(make_pipeline, server, tmp_path)
    plan = pipeline.run(Turn.create("split the task", agent_id="main", agent_type="orchestrator"))
    subs = [
        pipeline.run(
            Turn.create(
                f"explore part {i}", agent_id=f"sub-{i}", agent_type="explorer", tools=TOOLS
            )
        )
        for i in range(3)
    ]
    assert plan.route.name == "frontier"
    assert {s.route.name for s in subs} == {"local"}
    assert server.count() == 4


def test_context_fit_skips_routes_that_are_too_small(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make(make_pipeline, server, tmp_path, rules=[])
    # ~9000 tokens: too long for local's 8192 window, so the default route is skipped
    result = pipeline.run(Turn.create("word " * 9000))
    assert result.route.name == "coder"
    # a rule naming a route the prompt does not fit is skipped too
    small = make(
        make_pipeline,
        server,
        tmp_path,
        rules=[{"match": {"tools_min": 1}, "route": "local"}],
    )
    turn = Turn.create("word " * 9000, tools=TOOLS)
    assert small.run(turn).route.name == "coder"
    assert "rule 1 (4 tools >= 1): local unavailable" in reasons(small)[turn.id]


def test_when_nothing_fits_the_routes_are_left_alone(server: NimServer) -> None:
    stage = RouterStage()
    tiny = tuple(
        Route(name=f"r{i}", base_url=server.base_url, model=LOCAL, context_length=64)
        for i in range(2)
    )
    assert stage.filter_routes(Turn.create("word " * 500), tiny) is None


def test_cost_optimiser_matches_tier_to_complexity(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make(make_pipeline, server, tmp_path, rules=[], mode="cost")
    easy = pipeline.run(Turn.create("What is 2 + 2?"))
    medium = pipeline.run(
        Turn.create("Analyze and compare the trade-offs of these two designs, step by step.")
    )
    hard = pipeline.run(
        Turn.create(
            "Prove the bound, then derive and optimize the algorithm step by step.",
            tags={"hard"},
        )
    )
    assert easy.route.name == "local"  # tier 0 is enough and free
    assert medium.route.name == "coder"  # tier 1: the cheaper of coder and long
    assert hard.route.name == "frontier"
    why = reasons(pipeline)
    assert why[easy.turn.id].startswith("router: cost optimiser: complexity 0.00")
    assert "needs tier >= 1; cheapest is coder" in why[medium.turn.id]
    assert "needs tier >= 2; cheapest is frontier" in why[hard.turn.id]


def test_complexity_heuristic_and_inferred_tags() -> None:
    plain = estimate_complexity(Turn.create("hi"), 5, frozenset())
    assert plain.score == 0.0 and plain.why == ()
    easy = estimate_complexity(Turn.create("prove it step by step"), 10, frozenset({"easy"}))
    assert easy.score == 0.1
    assert infer_tags(Turn.create("def f(x):\n    return x")) == {"code"}
    assert infer_tags(Turn.create("no code here")) == frozenset()


def test_failing_route_is_taken_out_then_back(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    url = server.base_url
    a = Route(name="a", base_url=url, model=LOCAL, self_hosted=True, max_retries=0)
    b = Route(name="b", base_url=url, model=CODER, self_hosted=True, max_retries=0)
    pipeline = make_pipeline(
        routes=[a, b],
        stages={"router": {"unhealthy_after": 2, "cooldown": 0.5}},
    )
    stage = pipeline.plugins.pm.get_plugin("router")
    server.inject("status", count=2, status=503, model=LOCAL)
    for _ in range(2):
        with pytest.raises(Exception, match="503"):
            pipeline.run(Turn.create("x"))
    assert "a" in stage.health()
    assert pipeline.run(Turn.create("while a is out")).route.name == "b"
    import time

    time.sleep(0.6)
    assert pipeline.run(Turn.create("a is back")).route.name == "a"
    assert stage.health() == {}


def test_named_route_and_escalations_are_left_to_other_stages(
    server: NimServer, make_pipeline: Any, tmp_path: Path
) -> None:
    pipeline = make(make_pipeline, server, tmp_path)
    turn = Turn.create("plan", agent_type="orchestrator", route="local")
    assert pipeline.run(turn).route.name == "local"


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"mode": "smart"}, "stages.router.mode"),
        ({"rules": [{"match": {}, "route": "nowhere"}]}, "stages.router.rules[0].route"),
        ({"rules": [{"match": {"colour": "red"}, "route": "local"}]},
         "stages.router.rules[0].match.colour"),
        ({"rules": [{"match": {}}]}, "stages.router.rules[0].route"),
        ({"rules": [{"match": {"tools_min": "many"}, "route": "local"}]},
         "stages.router.rules[0].match.tools_min"),
        ({"thresholds": [0.8, 0.2]}, "stages.router.thresholds"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_key(
    server: NimServer, make_pipeline: Any, settings: dict[str, Any], key: str
) -> None:
    # A stage's bad setting reaches the caller as the ConfigError itself (exit 2).
    with pytest.raises(ConfigError) as info:
        make_pipeline(routes=routes(server), stages={"router": settings})
    assert info.value.key == key
