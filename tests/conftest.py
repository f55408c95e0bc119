"""Shared fixtures: an isolated environment and the real local servers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Tests never load whatever plugins happen to be installed, never read the
# developer's config, and never see their keys.
_KEPT = (
    "NIMPIPE_REQUIRE_LLAMA",
    "NIMPIPE_REQUIRE_GUARDRAILS",
    "NIMPIPE_REQUIRE_POSTGRES",
    "NIMPIPE_POSTGRES_BINARIES",
)
for _name in list(os.environ):
    if _name.startswith(("NIMPIPE_", "JAATO_NIM_")) and _name not in _KEPT:
        del os.environ[_name]
os.environ["NIMPIPE_LOAD_PLUGINS"] = ""
os.environ["NEMO_GUARDRAILS_NO_USAGE_STATS"] = "1"



@pytest.fixture(autouse=True)
def _isolated_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No nimpipe.toml from the developer's home or working directory."""
    home = tmp_path_factory.getbasetemp() / "xdg-config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))


@pytest.fixture(scope="session")
def llama_server() -> Iterator[object]:
    """The real llama.cpp server with SmolLM2, started once per session on 127.0.0.1.

    Skips when the embedded model is not installed, unless
    ``NIMPIPE_REQUIRE_LLAMA`` is set (as in ``nox -s tests``), where it fails.
    """
    from nimpipe.embedded import EmbeddedModel

    model = EmbeddedModel()
    if not model.is_installed():
        message = "embedded llama.cpp server not installed (python -m nimpipe.embedded install)"
        if os.environ.get("NIMPIPE_REQUIRE_LLAMA"):
            pytest.fail(message)
        pytest.skip(message)
    with model.start() as server:
        yield server


@pytest.fixture
def vcr_config(nimpipe_vcr_config: dict[str, object]) -> dict[str, object]:
    """pytest-recording uses nimpipe's settings: replay-only, body-matched, scrubbed."""
    config = dict(nimpipe_vcr_config)
    config.pop("cassette_library_dir")
    return config


@pytest.fixture
def vcr_cassette_dir(request: pytest.FixtureRequest) -> str:
    return str(request.config.rootpath / "cassettes")
