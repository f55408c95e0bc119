"""Cassette replay: offline, matched on the body, secrets scrubbed; the demo replays."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nimpipe import FinishReason, Route, Turn

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"temperature": 0.0, "max_tokens": 24, "seed": 7}

#: The fixed address cassettes were recorded against (the ``live`` session serves llama.cpp here).
CASSETTE_PORT = 18080
CASSETTE_BASE_URL = f"http://127.0.0.1:{CASSETTE_PORT}/v1"


@pytest.fixture(scope="module")
def cassette_route(request: pytest.FixtureRequest) -> Iterator[Route]:
    """The route cassettes were recorded against; recording serves llama.cpp at its port."""
    route = Route(name="llama", base_url=CASSETTE_BASE_URL, model="smollm2", self_hosted=True)
    if request.config.getoption("--nimpipe-record") == "none":
        yield route
        return
    from nimpipe.embedded import EmbeddedModel

    with EmbeddedModel().start(port=CASSETTE_PORT):
        yield route


@pytest.mark.live
@pytest.mark.nimpipe_cassette("llama-chat")
def test_replayed_chat(nimpipe_cassette: Any, cassette_route: Route, make_pipeline: Any) -> None:
    pipeline = make_pipeline(routes=[cassette_route])
    # Recorded live (nox -s live): the words differ by CPU, so check the shape.
    ended = (FinishReason.STOP, FinishReason.LENGTH)
    result = pipeline.run(Turn.create("What colour is the sky?", params=PARAMS))
    assert result.ok and result.response.finish_reason in ended
    assert result.response.usage.source == "server"
    assert result.response.usage.completion_tokens > 0
    stream = pipeline.stream(Turn.create("Name a fruit.", params=PARAMS))
    assert "".join(stream) == stream.result.text
    assert stream.result.response.finish_reason in ended


@pytest.mark.nimpipe_cassette("llama-chat")
def test_unrecorded_prompt_fails_instead_of_reaching_the_network(
    nimpipe_cassette: Any, cassette_route: Route, make_pipeline: Any
) -> None:
    from vcr.errors import CannotOverwriteExistingCassetteException

    from nimpipe.errors import UnavailableError

    pipeline = make_pipeline(routes=[cassette_route])
    # A different prompt never gets a recorded answer and never reaches the
    # network: vcrpy's error comes through (or, wrapped by a transport, as a
    # connection error that nimpipe reports with the cause).
    with pytest.raises((CannotOverwriteExistingCassetteException, UnavailableError)) as info:
        pipeline.run(Turn.create("A prompt that was never recorded", params=PARAMS))
    assert "no recorded interaction matches" in str(info.value)
    assert "differ in body" in str(info.value)


def test_cassettes_hold_no_secrets() -> None:
    files = list((ROOT / "cassettes").glob("*.yaml"))
    assert files
    for file in files:
        text = file.read_text().lower()
        for needle in ("authorization", "nvapi-", "bearer ", "api-key"):
            assert needle not in text, f"{file.name} contains {needle!r}"


def test_recording_scrubs_the_key(nim_server: Any, tmp_path: Path, make_pipeline: Any) -> None:
    import vcr

    from nimpipe.cassettes import vcr_settings

    nim_server.configure(api_key="nvapi-very-secret")
    settings = vcr_settings(tmp_path, "all")
    settings.pop("cassette_library_dir")
    key_env = "NIMPIPE_TEST_RECORD_KEY"
    os.environ[key_env] = "nvapi-very-secret"
    try:
        from nimpipe.config import Config

        config = Config.from_dict(
            {
                "routes": {
                    "r": {
                        "base_url": nim_server.base_url,
                        "model": "meta/llama-3.1-8b-instruct",
                        "api_key_env": key_env,
                    }
                }
            }
        )
        pipeline = make_pipeline(routes=config.routes.values())
        with vcr.VCR(**settings).use_cassette(str(tmp_path / "keyed.yaml")):
            assert pipeline.run(Turn.create("hi")).ok
    finally:
        del os.environ[key_env]
    written = (tmp_path / "keyed.yaml").read_text()
    assert "very-secret" not in written
    assert "code: 200" in written and "/v1/chat/completions" in written


def test_recording_scrubs_keys_a_server_echoes_and_still_replays(
    tmp_path: Path, make_pipeline: Any
) -> None:
    """Response bodies and headers that quote the key are masked; the cassette replays."""
    import base64
    import secrets
    from urllib.parse import quote

    import vcr
    import yaml
    from support.echo_servers import EchoServer

    from nimpipe.cassettes import vcr_settings
    from nimpipe.errors import AuthenticationError
    from nimpipe.types import Secret

    key = "echo-" + secrets.token_hex(16)  # not key-shaped: only the registry masks it
    cassette = str(tmp_path / "echo.yaml")

    def run(record_mode: str, base: str) -> tuple[str, str]:
        settings = vcr_settings(tmp_path, record_mode)
        settings.pop("cassette_library_dir")
        routes = [
            Route(
                name=name,
                base_url=f"{base}/{mode}/v1",
                model="m",
                api_key=Secret(key),
                max_retries=0,
            )
            for name, mode in (("ok", "ok"), ("denied", "401"))
        ]
        pipeline = make_pipeline(routes=routes)
        with vcr.VCR(**settings).use_cassette(cassette):
            text = pipeline.run(Turn.create("hi", route="ok")).text
            with pytest.raises(AuthenticationError) as denied:
                pipeline.run(Turn.create("hi", route="denied"))
        return text, str(denied.value)

    with EchoServer() as echo:
        recorded = run("all", echo.url)
        base = echo.url
    written = Path(cassette).read_text()
    for needle in (key, quote(key, safe=""), base64.b64encode(key.encode()).decode()[:-4]):
        assert needle not in written
    interactions = yaml.safe_load(written)["interactions"]
    assert len(interactions) == 2
    headers = interactions[1]["response"]["headers"]
    assert headers["x-request-id"] == ["***"] and headers["x-echo-authorization"] == ["Bearer ***"]
    assert "Incorrect API key provided: ***" in interactions[1]["response"]["body"]["string"]
    assert "authorization" not in {h.lower() for h in interactions[0]["request"]["headers"]}
    # The server is gone: the scrubbed cassette answers alike, offline.
    assert run("none", base) == recorded
    assert "***" in recorded[1] and key not in recorded[1]


def test_demo_replays_offline() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nimpipe.cli", "demo", "--replay"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "NIM at http://127.0.0.1:18081/v1 is ready" in out
    assert "meta/llama-3.1-8b-instruct  131072   server" in out
    assert "guardrails: block: input blocked by pii:card" in out
    assert "output blocked by pii:phone" in out
    assert "cascade: escalate: truncated" in out
    assert "6/6" in out and "cost table (ledger stage, by route)" in out
    assert "connections to anything but loopback: 0" in out
    # Replayed, the wait for the loading NIM is one line; cut answers end in an ellipsis.
    assert out.count("loading model") == 1
    assert "…" in out
