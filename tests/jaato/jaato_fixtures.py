"""Fixtures that drive real jaato sessions against local servers.

Test modules load them with ``pytest_plugins = ["jaato_fixtures"]`` (this is
not a ``conftest.py``: the suite's root ``conftest`` module is imported by
name elsewhere).  Nothing here imports jaato at import time, so collecting
``tests/`` without jaato works (the test modules skip themselves).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jaato_helpers import MODEL, Transcript


@pytest.fixture(scope="module")
def jaato_scratch() -> Iterator[Path]:
    """A scratch HOME, TMPDIR and workspace for jaato, and jaato's telemetry off."""
    from nimpipe.embedded import nimpipe_home

    root = Path(tempfile.mkdtemp(prefix="nimpipe-jaato-"))
    for name in ("home", "tmp", "ws"):
        (root / name).mkdir()
    saved_tempdir = tempfile.tempdir
    with pytest.MonkeyPatch.context() as mp:
        # The embedded model lives under the real home: pin it before HOME moves.
        mp.setenv("NIMPIPE_HOME", str(nimpipe_home()))
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("TMPDIR", str(root / "tmp"))
        mp.setenv("JAATO_TELEMETRY_ENABLED", "false")
        mp.setenv("AI_RETRY_LOG_SILENT", "1")
        mp.delenv("JAATO_PROVIDER", raising=False)
        mp.delenv("MODEL_NAME", raising=False)
        tempfile.tempdir = str(root / "tmp")
        try:
            yield root
        finally:
            tempfile.tempdir = saved_tempdir


@pytest.fixture(scope="module")
def jaato_server(jaato_scratch: Path) -> Iterator[Any]:
    """One NIM-shaped server for a module's jaato sessions, reset before each test."""
    from nimpipe.testing.nim_server import NimServer

    with NimServer(model=MODEL) as server:
        yield server


@pytest.fixture(scope="module")
def jaato_registry(jaato_scratch: Path) -> Any:
    """jaato's plugin registry, discovered once per module (discovery takes seconds).

    Exposes ``calculator``, ``subagent`` (inline spawning allowed) and
    nimpipe's own tool plugin.
    """
    import jaato

    registry = jaato.PluginRegistry(model_name=MODEL)
    registry.discover(tier_filter="runner")
    registry.set_workspace_path(str(jaato_scratch / "ws"))
    registry.expose_tool("calculator")
    registry.expose_tool("subagent", {"allow_inline": True})
    registry.expose_tool("nimpipe")
    return registry


@pytest.fixture
def nim_env(jaato_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A jaato user's NIM settings pointing at the test server; the server is reset."""
    jaato_server.reset()
    monkeypatch.setenv("JAATO_NIM_BASE_URL", jaato_server.base_url)
    monkeypatch.setenv("JAATO_NIM_API_KEY", "nvapi-test-key")
    monkeypatch.setenv("JAATO_NIM_MODEL", MODEL)
    monkeypatch.setenv("JAATO_NIM_CONTEXT_LENGTH", "32768")
    return jaato_server


@pytest.fixture
def stages() -> Iterator[Callable[..., Any]]:
    """Register stages in the pipelines the ``nimpipe`` provider builds during the test."""
    from nimpipe import jaato as nimpipe_jaato

    names: list[str] = []
    nimpipe_jaato.close_pipelines()

    def register(plugin: Any, name: str) -> Any:
        names.append(nimpipe_jaato.register_plugin(plugin, name))
        return plugin

    yield register
    for name in names:
        nimpipe_jaato.unregister_plugin(name)
    nimpipe_jaato.close_pipelines()


@pytest.fixture
def make_client(jaato_registry: Any, jaato_scratch: Path) -> Callable[..., Any]:
    """Build a jaato session the way a user's program does; returns the ``JaatoClient``."""

    def make(
        *,
        provider: str | None = "nimpipe",
        model: str = MODEL,
        plugins: tuple[str, ...] = ("calculator", "nimpipe"),
        preloaded: tuple[str, ...] = ("calculator",),
        plugin_configs: dict[str, dict[str, Any]] | None = None,
        workspace: Path | None = None,
    ) -> Any:
        import jaato

        ws = workspace or (jaato_scratch / "ws")
        client = jaato.JaatoClient(
            provider_name=provider, workspace_path=str(ws), config_root=str(ws / ".jaato")
        )
        client.connect(None, None, model)
        client.verify_auth(allow_interactive=False, plugin_configs=plugin_configs)
        session_kwargs: dict[str, Any] = {
            "plugins": list(plugins),
            "preloaded_plugins": set(preloaded),
        }
        if plugin_configs:
            session_kwargs["plugin_configs"] = plugin_configs
        client.configure_tools(jaato_registry, None, None, session_kwargs=session_kwargs)
        return client

    return make


@pytest.fixture
def transcript() -> Transcript:
    """An ``on_output`` callback that keeps what it was given."""
    return Transcript()
