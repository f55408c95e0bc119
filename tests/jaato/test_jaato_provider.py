"""The ``nimpipe`` provider against jaato's own types and discovery, call by call."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("jaato_sdk")
pytest.importorskip("jaato_embedded")

pytest_plugins = ["jaato_fixtures"]

from jaato_helpers import MODEL, Counter  # noqa: E402
from jaato_sdk.plugins.model_provider.types import (  # noqa: E402
    FinishReason,
    FunctionCall,
    Message,
    Part,
    Role,
    ToolResult,
    ToolSchema,
    TurnOutcome,
)
from shared.plugins.model_provider.base import ProviderConfig  # noqa: E402

import nimpipe  # noqa: E402
from nimpipe import jaato as nimpipe_jaato  # noqa: E402
from nimpipe.jaato.provider import NimpipeProvider, create_provider  # noqa: E402
from nimpipe.testing.nim_server import NimServer  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _scratch(jaato_scratch: Path) -> None:
    """jaato runs with a scratch HOME and TMPDIR."""


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Any:
    with NimServer(model=MODEL) as srv:
        monkeypatch.setenv("JAATO_NIM_BASE_URL", srv.base_url)
        monkeypatch.setenv("JAATO_NIM_MODEL", MODEL)
        yield srv
    nimpipe_jaato.close_pipelines()


def connected(config: Any = None, model: str = MODEL) -> NimpipeProvider:
    provider = create_provider()
    provider.initialize(config)
    provider.connect(model, skip_model_test=False)
    return provider


# --------------------------------------------------------------------------
# discovery and imports
# --------------------------------------------------------------------------


def test_jaato_discovers_the_provider_by_entry_point() -> None:
    from shared.plugins.model_provider import discover_providers, load_provider

    assert "nimpipe" in discover_providers()
    provider = load_provider("nimpipe")
    assert isinstance(provider, NimpipeProvider)
    assert provider.name == "nimpipe"


def test_jaato_discovers_the_commands_plugin_at_runner_tier() -> None:
    import jaato

    registry = jaato.PluginRegistry(model_name=MODEL)
    registry._discover_via_entry_points("tool", tier_filter="runner")
    plugin = registry.get_plugin("nimpipe")
    assert plugin is not None
    assert {c.name for c in plugin.get_user_commands()} == {
        "nim-models",
        "nim-status",
        "nimpipe-cost",
    }


def test_importing_the_integration_loads_neither_jaato_nor_the_pipeline() -> None:
    code = textwrap.dedent(
        """
        import sys
        import nimpipe.jaato, nimpipe.jaato.provider, nimpipe.jaato.commands
        heavy = [m for m in ("jaato", "jaato_sdk", "shared", "nimpipe.pipeline", "openai")
                 if m in sys.modules]
        print(heavy)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------
# mapping
# --------------------------------------------------------------------------


def test_a_tool_round_maps_to_nimpipe_messages_and_back(server: Any) -> None:
    from nimpipe.jaato._convert import messages_from_jaato, tools_from_jaato

    history = [
        Message.from_text(Role.USER, "add them"),
        Message(
            role=Role.MODEL,
            parts=[
                Part(text="Adding."),
                Part(function_call=FunctionCall(id="c1", name="add", args={"a": 1, "b": 2})),
            ],
        ),
        Message(
            role=Role.TOOL,
            parts=[Part(function_response=ToolResult(call_id="c1", name="add", result={"sum": 3}))],
        ),
    ]
    messages = messages_from_jaato(history, "be brief")
    assert [m.role.value for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[2].content == "Adding."
    assert messages[2].tool_calls[0].name == "add"
    assert json.loads(messages[2].tool_calls[0].arguments) == {"a": 1, "b": 2}
    assert messages[3].tool_call_id == "c1"
    assert json.loads(messages[3].content or "") == {"sum": 3}
    tools = tools_from_jaato([ToolSchema(name="add", description="Add", parameters={})])
    assert tools[0].name == "add"


def test_tool_names_are_jaato_ids_on_the_wire_and_real_names_for_stages(server: Any) -> None:
    from shared.tool_id_map import name_to_id

    counter = Counter()
    nimpipe_jaato.register_plugin(counter, "counter")
    try:
        provider = connected()
        tools = [ToolSchema(name="calculate", description="Evaluate", parameters={})]
        result = provider.complete(
            [Message.from_text(Role.USER, 'call tool calculate {"expression": "1+1"}')],
            tools=tools,
        )
    finally:
        nimpipe_jaato.unregister_plugin("counter")
    call = result.response.get_function_calls()[0]
    assert call.name == "calculate"
    assert call.args == {"expression": "1+1"}
    assert result.finish_reason is FinishReason.TOOL_USE
    sent = server.requests[-1].body
    assert [t["function"]["name"] for t in sent["tools"]] == [name_to_id("calculate")]
    assert counter.inputs[0].tools[0].name == "calculate"


def test_a_blocked_input_is_a_safety_response_and_calls_no_model(server: Any) -> None:
    nimpipe_jaato.register_plugin(Counter(block_input="forbidden"), "counter")
    try:
        result = connected().complete([Message.from_text(Role.USER, "something forbidden")])
    finally:
        nimpipe_jaato.unregister_plugin("counter")
    assert result.outcome is TurnOutcome.SAFETY
    assert result.finish_reason is FinishReason.SAFETY
    assert "Blocked by nimpipe" in result.text
    assert server.count() == 0


def test_usage_and_token_counts_are_real(server: Any) -> None:
    provider = connected()
    result = provider.complete([Message.from_text(Role.USER, "hello there")])
    usage = result.response.usage
    assert usage.prompt_tokens == 5
    assert usage.output_tokens == 5
    assert provider.get_token_usage() is usage
    assert usage.cost_usd is None
    text = "hello world, " * 20
    # tiktoken's count, not jaato's len // 4.
    assert provider.count_tokens(text) == 61
    assert provider.count_tokens(text) != len(text) // 4


# --------------------------------------------------------------------------
# errors and retries
# --------------------------------------------------------------------------


def test_transient_errors_are_raised_and_classified_for_the_failing_route(server: Any) -> None:
    provider = connected()
    server.inject("rate_limit", retry_after=0.01, count=3)
    with pytest.raises(nimpipe.RateLimitError) as caught:
        provider.complete([Message.from_text(Role.USER, "hi")])
    assert caught.value.route is not None and caught.value.route.name == "nim"
    assert server.count() == 3  # the route's own retries: max_retries = 2
    assert provider.classify_error(caught.value) == {
        "transient": True,
        "rate_limit": True,
        "infra": False,
    }
    assert provider.get_retry_after(caught.value) == 0.01

    server.inject("status", status=503, count=3)
    with pytest.raises(nimpipe.UnavailableError) as unavailable:
        provider.complete([Message.from_text(Role.USER, "hi")])
    assert provider.classify_error(unavailable.value) == {
        "transient": True,
        "rate_limit": False,
        "infra": True,
    }
    assert provider.classify_error(ValueError("not ours")) is None


def test_jaato_with_retry_retries_a_transient_failure(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.retry_utils import RetryConfig, with_retry

    provider = connected()
    server.inject("status", status=503, count=4)
    config = RetryConfig(max_attempts=3, base_delay=0.001, silent=True)
    result, stats = with_retry(
        lambda: provider.complete([Message.from_text(Role.USER, "hi")]),
        config=config,
        provider=provider,
    )
    assert result.text == "NIM reply to: hi"
    assert stats.attempts == 2
    assert server.count() == 5


def test_a_retry_by_jaato_does_not_check_the_input_again(server: Any) -> None:
    from shared.retry_utils import RetryConfig, with_retry

    counter = Counter()
    nimpipe_jaato.register_plugin(counter, "counter")
    try:
        provider = connected()
        server.inject("status", status=503, count=4)
        config = RetryConfig(max_attempts=3, base_delay=0.001, silent=True)
        result, stats = with_retry(
            lambda: provider.complete([Message.from_text(Role.USER, "hi")]),
            config=config,
            provider=provider,
        )
    finally:
        nimpipe_jaato.unregister_plugin("counter")
    assert result.text == "NIM reply to: hi" and stats.attempts == 2
    assert len(counter.inputs) == 1, "pre_input ran once across jaato's retries"
    assert len(counter.records) == 5, "every model call is still recorded"
    assert len(counter.outputs) == 1


def test_fatal_errors_are_returned_as_jaato_expects(server: Any) -> None:
    provider = connected()
    server.inject("auth", count=1)
    result = provider.complete([Message.from_text(Role.USER, "hi")])
    assert result.outcome is TurnOutcome.ERROR
    assert isinstance(result.error, nimpipe.AuthenticationError)
    assert server.count() == 1


def test_cancelling_a_streamed_call_returns_what_was_released(server: Any) -> None:
    from jaato_sdk.plugins.model_provider.types import CancelToken

    server.configure(reply="one two three four five six", token_delay=0.05)
    provider = connected()
    token = CancelToken()
    chunks: list[str] = []

    def on_chunk(chunk: str) -> None:
        chunks.append(chunk)
        if len(chunks) == 2:
            token.cancel()

    result = provider.complete(
        [Message.from_text(Role.USER, "count")], cancel_token=token, on_chunk=on_chunk
    )
    assert result.outcome is TurnOutcome.CANCELLED
    assert result.text.startswith("".join(chunks))
    assert len(chunks) == 2


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------


def test_plugin_configs_set_the_endpoint_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAATO_NIM_BASE_URL", raising=False)
    monkeypatch.delenv("JAATO_NIM_MODEL", raising=False)
    with NimServer(model=MODEL, api_key="k-123") as srv:
        config = ProviderConfig(api_key="k-123", extra={"base_url": srv.base_url})
        provider = connected(config)
        try:
            result = provider.complete([Message.from_text(Role.USER, "hello")])
        finally:
            nimpipe_jaato.close_pipelines()
    assert result.text == "NIM reply to: hello"
    assert "k-123" not in repr(provider._settings)


def test_workspace_nimpipe_toml_adds_routes(server: Any, tmp_path: Path) -> None:
    (tmp_path / "nimpipe.toml").write_text(
        textwrap.dedent(
            f"""
            default_route = "local"

            [routes.local]
            base_url = "{server.base_url}"
            model = "{MODEL}"
            context_length = 4096
            max_output_tokens = 256
            """
        )
    )
    provider = connected(ProviderConfig(extra={"workspace_path": str(tmp_path)}), model="local")
    assert provider.get_context_limit() == 4096
    assert provider.get_max_output_tokens() == 256
    assert {"local", "nim"} <= set(provider.list_models())
    assert provider.list_models(prefix="lo") == ["local"]
    result = provider.complete([Message.from_text(Role.USER, "hello")])
    assert result.text == "NIM reply to: hello"
    assert server.requests[-1].body["max_tokens"] == 256


def test_list_models_and_nim_models_show_the_catalog_stage(tmp_path: Path) -> None:
    from nimpipe.jaato.commands import NimpipeCommands

    other = "nvidia/llama-3.1-nemotron-70b-instruct"
    with NimServer(models=[MODEL, {"id": other, "max_model_len": 65536}]) as srv:
        (tmp_path / "nimpipe.toml").write_text(
            textwrap.dedent(
                f"""
                [routes.local]
                base_url = "{srv.base_url}"
                model = "{MODEL}"

                [stages.nim_catalog]
                cache_dir = "{tmp_path / "catalog"}"
                refresh_on_start = false
                fetch_hosted = false
                """
            )
        )
        try:
            provider = connected(ProviderConfig(extra={"workspace_path": str(tmp_path)}))
            models = provider.list_models()
            report = NimpipeCommands().nim_models({"args": ["--search", "nemotron"]})
        finally:
            nimpipe_jaato.close_pipelines()
    assert {MODEL, other, "local"} <= set(models)
    assert "NIM catalog (1 models):" in report
    assert other in report and "65536" in report


def test_jaato_nim_model_is_optional_as_with_jaatos_own_provider(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JAATO_NIM_MODEL")
    provider = connected(model=MODEL)
    result = provider.complete([Message.from_text(Role.USER, "hello")])
    assert result.text == "NIM reply to: hello"
    assert server.requests[-1].body["model"] == MODEL


def test_context_limit_follows_jaato_settings(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAATO_NIM_CONTEXT_LENGTH", "65536")
    assert connected().get_context_limit() == 65536
    config = ProviderConfig(extra={"context_length": 8192})
    assert connected(config).get_context_limit() == 8192


def test_verify_auth_needs_a_key_only_for_hosted_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAATO_NIM_BASE_URL", raising=False)
    monkeypatch.delenv("JAATO_NIM_API_KEY", raising=False)
    monkeypatch.setenv("JAATO_NIM_MODEL", MODEL)
    provider = NimpipeProvider()
    with pytest.raises(nimpipe.AuthenticationError, match="JAATO_NIM_API_KEY"):
        provider.verify_auth(allow_interactive=False, on_message=None, config=None)
    assert provider.verify_auth(allow_interactive=True) is False
    assert provider.verify_auth(config=ProviderConfig(extra={"api_key": "nvapi-x"}))
    local = ProviderConfig(extra={"base_url": "http://127.0.0.1:9/v1"})
    messages: list[str] = []
    assert provider.verify_auth(config=local, on_message=messages.append)
    assert "nim" in messages[0]


def test_verify_auth_reads_the_active_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jaato verifies with only plugin_configs: nimpipe.toml comes from jaato's active workspace."""
    for name in ("JAATO_NIM_BASE_URL", "JAATO_NIM_API_KEY", "JAATO_NIM_MODEL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "nimpipe.toml").write_text(
        '[routes.local]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n'
    )
    monkeypatch.setenv("JAATO_WORKSPACE_ROOT", str(tmp_path))
    messages: list[str] = []
    assert NimpipeProvider().verify_auth(config=ProviderConfig(), on_message=messages.append)
    assert messages == ["nimpipe: routes ready to call: local"]


# --------------------------------------------------------------------------
# agents and threads
# --------------------------------------------------------------------------


def test_subagent_attribution() -> None:
    provider = NimpipeProvider()
    assert provider._attributed_agent_id() == "main"
    provider.set_agent_context(agent_type="subagent", agent_name="reviewer", agent_id="main")
    assert provider._attributed_agent_id() == "reviewer"
    provider.set_agent_context(agent_type="subagent", agent_name="reviewer", agent_id="sub-7")
    assert provider._attributed_agent_id() == "sub-7"
    provider.set_agent_context(agent_type="subagent", agent_name=None, agent_id="main")
    anonymous = provider._attributed_agent_id()
    assert anonymous.startswith("subagent-")
    assert provider._attributed_agent_id() == anonymous


def test_instances_on_threads_share_one_pipeline_and_attribute_every_call(server: Any) -> None:
    counter = Counter()
    nimpipe_jaato.register_plugin(counter, "counter")
    server.configure(latency=0.2)
    try:
        providers = []
        for i in range(4):
            provider = connected()
            provider.set_agent_context("subagent", f"agent{i}", "main")
            providers.append(provider)
        barrier = threading.Barrier(4)

        def work(i: int) -> None:
            barrier.wait()
            for n in range(3):
                providers[i].complete([Message.from_text(Role.USER, f"agent{i} call {n}")])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        nimpipe_jaato.unregister_plugin("counter")
    assert len(nimpipe_jaato.active_pipelines()) == 1
    assert server.count() == len(counter.records) == 12
    for i in range(4):
        mine = [r for r in counter.records if r.agent_id == f"agent{i}"]
        assert len(mine) == 3
        assert {r.agent_type for r in mine} == {"subagent"}


def test_nim_status_says_offline_mode_is_on(tmp_path: Path) -> None:
    from nimpipe import offline
    from nimpipe.jaato.commands import NimpipeCommands

    with NimServer() as srv:
        (tmp_path / "nimpipe.toml").write_text(
            f'offline = true\n[routes.local]\nbase_url = "{srv.base_url}"\nmodel = "{MODEL}"\n'
        )
        try:
            provider = connected(ProviderConfig(extra={"workspace_path": str(tmp_path)}))
            assert (
                provider.complete([Message.from_text(Role.USER, "hi")]).text == "NIM reply to: hi"
            )
            report = NimpipeCommands().nim_status({"args": []})
        finally:
            nimpipe_jaato.close_pipelines()
            offline.disable()
    assert report.splitlines()[0].startswith("Offline mode: on")
