"""Real jaato sessions with the provider ``nimpipe``, driven as a user's program drives them.

Each test builds a ``jaato.JaatoClient`` (jaato-server 0.15.0) whose model
provider is ``nimpipe`` and sends it messages.  The model is the NIM-shaped
test server (or the real llama.cpp server); a counting stage in the pipeline
checks that ``pre_input`` and ``post_output`` run once per turn and
``record_cost`` once per model call.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("jaato_sdk")
pytest.importorskip("jaato_embedded")

pytest_plugins = ["jaato_fixtures"]

from jaato_helpers import MODEL, CostOnly, Counter, Transcript, wait_until  # noqa: E402

import nimpipe  # noqa: E402
from nimpipe import jaato as nimpipe_jaato  # noqa: E402


def test_plain_turn(nim_env: Any, stages: Any, make_client: Any, transcript: Transcript) -> None:
    counter = stages(Counter(), "counter")
    client = make_client()
    assert client.provider_name == "nimpipe"

    answer = client.send_message("hello there", on_output=transcript)

    assert answer == "NIM reply to: hello there"
    assert "".join(transcript.model_chunks()) == answer
    assert len(counter.inputs) == len(counter.outputs) == len(counter.records) == 1
    assert nim_env.count() == 1
    record = counter.records[0]
    assert (record.agent_id, record.agent_type, record.outcome) == ("main", "main", "ok")
    assert record.route == "nim" and record.model == MODEL
    assert record.usage_source == "server"
    assert record.prompt_tokens > 0 and record.completion_tokens == 5
    assert counter.inputs[0].last_user_text == "hello there"


def test_switching_needs_only_jaato_provider(
    nim_env: Any, stages: Any, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A jaato user with JAATO_NIM_* set switches with JAATO_PROVIDER=nimpipe alone."""
    counter = stages(Counter(), "counter")
    monkeypatch.setenv("JAATO_PROVIDER", "nimpipe")
    client = make_client(provider=None)
    assert client.provider_name == "nimpipe"
    assert client.send_message("hi") == "NIM reply to: hi"
    assert len(counter.records) == 1
    assert nim_env.requests[-1].headers["authorization"] == "Bearer ***"


def test_tool_round(nim_env: Any, stages: Any, make_client: Any) -> None:
    from shared.tool_id_map import name_to_id

    counter = stages(Counter(), "counter")
    client = make_client()

    answer = client.send_message('call tool calculate {"expression": "6*7"}')

    # Two model calls: the tool call, then the answer from the tool's result.
    assert nim_env.count() == 2
    assert len(counter.records) == 2
    assert len(counter.inputs) == 1
    assert len(counter.outputs) == 1
    assert counter.outputs[0][1].text == answer
    assert '"result": 42' in answer
    first, second = (r.body for r in nim_env.requests)
    assert name_to_id("calculate") in [t["function"]["name"] for t in first["tools"]]
    assert second["messages"][-2]["tool_calls"][0]["function"]["name"] == name_to_id("calculate")
    assert second["messages"][-1]["role"] == "tool"
    assert [r.outcome for r in counter.records] == ["ok", "ok"]


def test_streamed_turn_holds_output_while_output_stages_run(
    nim_env: Any, stages: Any, make_client: Any, transcript: Transcript
) -> None:
    counter = stages(Counter(), "counter")
    client = make_client()
    nim_env.configure(reply="one two three four five six seven")

    answer = client.send_message("count", on_output=transcript)

    assert nim_env.requests[-1].body["stream"] is True
    assert answer == "one two three four five six seven"
    # post_output had to pass the answer before any of it was shown.
    assert transcript.model_chunks() == [answer]
    assert len(counter.outputs) == 1 and len(counter.records) == 1
    assert counter.records[0].stream is True


def test_streamed_turn_streams_live_without_output_stages(
    nim_env: Any, stages: Any, make_client: Any, transcript: Transcript
) -> None:
    costs = stages(CostOnly(), "costs")
    client = make_client()
    nim_env.configure(reply="one two three four five six seven")

    answer = client.send_message("count", on_output=transcript)

    chunks = transcript.model_chunks()
    assert len(chunks) == 7
    assert "".join(chunks) == answer
    assert len(costs.records) == 1 and costs.records[0].stream is True


def test_blocked_output_never_reaches_the_user(
    nim_env: Any, stages: Any, make_client: Any, transcript: Transcript
) -> None:
    stages(Counter(block_output="secret"), "counter")
    client = make_client()
    nim_env.configure(reply="the secret is 1234")

    answer = client.send_message("tell me", on_output=transcript)

    assert "1234" not in "".join(text for _, text, _ in transcript.events)
    assert transcript.model_chunks() == ["Blocked by nimpipe: output withheld."]
    assert answer.startswith("Blocked by nimpipe: output withheld.")
    assert "SAFETY" in answer


def test_blocked_turn(nim_env: Any, stages: Any, make_client: Any, transcript: Transcript) -> None:
    counter = stages(Counter(block_input="forbidden"), "counter")
    client = make_client()

    answer = client.send_message("do the forbidden thing", on_output=transcript)

    assert nim_env.count() == 0
    assert counter.records == []
    assert len(counter.inputs) == 1 and counter.outputs == []
    assert answer.startswith("Blocked by nimpipe: input not allowed.")
    assert "SAFETY" in answer
    assert any(source == "system" and "safety" in text for source, text, _ in transcript.events)

    # The session goes on after a block.
    assert client.send_message("hello again") == "NIM reply to: hello again"
    assert len(counter.records) == 1


def test_transient_failures_are_retried_by_nimpipe_then_jaato(
    nim_env: Any, stages: Any, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AI_RETRY_BASE_DELAY", "0.01")
    counter = stages(Counter(), "counter")
    client = make_client()
    nim_env.inject("status", status=503, count=3)

    answer = client.send_message("retry me")

    assert answer == "NIM reply to: retry me"
    # nimpipe tried three times (max_retries = 2) and raised; jaato's with_retry
    # called again; every attempt has its record.
    assert nim_env.count() == 4
    assert [r.outcome for r in counter.records] == ["retried", "retried", "error", "ok"]
    assert len(counter.outputs) == 1


def test_fatal_errors_end_the_turn_without_retries(
    nim_env: Any, stages: Any, make_client: Any
) -> None:
    counter = stages(Counter(), "counter")
    client = make_client()
    nim_env.inject("auth", count=1)

    with pytest.raises(nimpipe.AuthenticationError):
        client.send_message("hi")

    assert nim_env.count() == 1
    assert [r.outcome for r in counter.records] == ["error"]


def test_four_subagents_at_once(nim_env: Any, stages: Any, make_client: Any) -> None:
    """jaato's subagent plugin spawns four subagents; each call is recorded once, for its agent."""
    counter = stages(Counter(), "counter")
    client = make_client(
        plugins=("calculator", "nimpipe", "subagent"),
        preloaded=("calculator", "subagent"),
        plugin_configs={"subagent": {"allow_inline": True}},
    )
    nim_env.configure(latency=0.5)
    workers = [f"worker{i}" for i in range(1, 5)]
    spawn = " ".join(
        f'call tool spawn_subagent {{"name": "{w}", "task": "task for {w}"}}' for w in workers
    )

    client.send_message(spawn)

    def settled() -> bool:
        seen = {r.agent_id for r in counter.records}
        return set(workers) <= seen and nim_env.count() == len(counter.records)

    wait_until(settled, timeout=120, settle=2.0)

    requests = nim_env.requests
    assert len(counter.records) == len(requests)

    def asker(body: dict[str, Any]) -> str:
        first_user = next(m for m in body["messages"] if m["role"] == "user")["content"]
        return first_user.removeprefix("task for ") if first_user.startswith("task for") else "main"

    expected: dict[str, int] = {}
    for request in requests:
        expected[asker(request.body)] = expected.get(asker(request.body), 0) + 1
    recorded: dict[str, int] = {}
    for record in counter.records:
        recorded[record.agent_id] = recorded.get(record.agent_id, 0) + 1
        assert record.agent_type == ("main" if record.agent_id == "main" else "subagent")
    assert recorded == expected
    assert set(recorded) == {"main", *workers}

    # The four subagents ran at once: their first calls were all in flight together.
    firsts = [min(r.time for r in requests if asker(r.body) == worker) for worker in workers]
    assert max(firsts) - min(firsts) < 0.5
    # One pipeline served the main agent and the four subagents.
    assert len(nimpipe_jaato.active_pipelines()) == 1

    report, _ = client.execute_user_command("nimpipe-cost", {"args": []})
    for worker in workers:
        assert f"{worker}  subagent  {recorded[worker]}" in report


def test_user_commands_are_listed_and_answer(nim_env: Any, stages: Any, make_client: Any) -> None:
    stages(Counter(), "counter")
    client = make_client()
    commands = client.get_user_commands()
    assert {"nim-models", "nim-status", "nimpipe-cost"} <= set(commands)

    client.send_message("hello")

    models, shared = client.execute_user_command("nim-models", {"args": ["--search", "llama"]})
    assert shared is False
    assert "NIM catalog: not available" in models
    assert MODEL in models and nim_env.base_url in models
    status, _ = client.execute_user_command("nim-status", {"args": ["--watch"]})
    assert "Route status: not available" in status
    assert "--watch needs the health stage" in status
    cost, _ = client.execute_user_command("nimpipe-cost", {"args": []})
    assert "main   main  1      0" in cost


def test_plain_turn_on_the_real_local_model(
    llama_server: Any,
    stages: Any,
    make_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    transcript: Transcript,
) -> None:
    """SmolLM2 on llama.cpp: a real model answers through jaato and the pipeline."""
    monkeypatch.setenv("JAATO_NIM_BASE_URL", llama_server.base_url)
    monkeypatch.setenv("JAATO_NIM_MODEL", llama_server.model)
    monkeypatch.delenv("JAATO_NIM_API_KEY", raising=False)
    counter = stages(Counter(), "counter")
    client = make_client(model=llama_server.model, plugins=(), preloaded=())

    answer = client.send_message("Say hello in one short sentence.", on_output=transcript)

    # The model's words differ by CPU: check the turn's shape, never its text.
    assert len(counter.inputs) == len(counter.outputs) == len(counter.records) == 1
    record = counter.records[0]
    assert record.outcome == "ok"
    # llama.cpp sends no usage on a stream: nimpipe counts the tokens itself.
    assert record.prompt_tokens > 0 and record.completion_tokens > 0
    assert record.route == "nim" and record.model == llama_server.model
    assert "".join(transcript.model_chunks()) == answer
