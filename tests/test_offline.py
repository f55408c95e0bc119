"""Offline mode: enforced at the socket level, counted, never a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nimpipe import Route, Turn, offline
from nimpipe.config import Config
from nimpipe.errors import NoRouteError, OfflineError
from nimpipe.pipeline import Pipeline

MODEL = "meta/llama-3.1-8b-instruct"


@pytest.fixture
def offline_mode() -> Iterator[None]:
    offline.reset_stats()
    yield
    offline.disable()


def test_offline_turns_reach_only_loopback(nim_server: Any, offline_mode: None) -> None:
    local = Route(name="local", base_url=nim_server.base_url, model=MODEL)
    hosted = Route(
        name="hosted", base_url="https://integrate.api.nvidia.com/v1", model=MODEL, tier=1
    )
    config = Config.from_dict({"offline": True}, env={}).with_routes(
        local, hosted, default="hosted"
    )
    with Pipeline.create(config, entrypoints=False) as pipeline:
        assert offline.is_enforced()
        for i in range(5):
            result = pipeline.run(Turn.create(f"q{i}"))
            assert result.route.name == "local", "the hosted route is not used offline"
    counts = offline.stats()
    assert counts and all(key.startswith("allowed:127.0.0.1") for key in counts), counts


def test_other_hosts_fail_at_once_naming_host_and_caller(offline_mode: None) -> None:
    import httpx

    offline.enforce()
    started = time.monotonic()
    with pytest.raises(OfflineError) as info:
        httpx.get("https://integrate.api.nvidia.com/v1/models", timeout=30)
    assert time.monotonic() - started < 1.0
    assert info.value.host == "integrate.api.nvidia.com"
    assert "integrate.api.nvidia.com" in str(info.value)
    assert "caller: test_offline.test_other_hosts_fail_at_once_naming_host_and_caller" in str(
        info.value
    )
    assert offline.stats() == {"refused:integrate.api.nvidia.com": 1}


def test_route_to_other_host_is_an_offline_error_not_a_retry(offline_mode: None) -> None:
    remote = Route(
        name="remote", base_url="http://nim.example.internal:8000/v1", model=MODEL, self_hosted=True
    )
    offline.enforce()  # the route is self-hosted by config but its host is not allowed here
    config = Config.from_dict({}, env={}).with_routes(remote, default="remote")
    with Pipeline.create(config, entrypoints=False) as pipeline:
        started = time.monotonic()
        with pytest.raises(OfflineError, match=r"nim\.example\.internal"):
            pipeline.run(Turn.create("x"))
        assert time.monotonic() - started < 1.0


def test_no_local_route_is_a_clear_error(offline_mode: None) -> None:
    hosted = Route(name="hosted", base_url="https://integrate.api.nvidia.com/v1", model=MODEL)
    config = Config.from_dict({"offline": True}, env={}).with_routes(hosted, default="hosted")
    with (
        Pipeline.create(config, entrypoints=False) as pipeline,
        pytest.raises(NoRouteError, match="offline mode"),
    ):
        pipeline.run(Turn.create("x"))


class NeedsNetwork:
    needs_network = True

    def pre_input(self) -> None:
        return None


def test_plugins_that_need_the_network_are_skipped(nim_server: Any, offline_mode: None) -> None:
    local = Route(name="local", base_url=nim_server.base_url, model=MODEL)
    config = Config.from_dict({"offline": True}, env={}).with_routes(local, default="local")
    with Pipeline.create(
        config, plugins=[("price_refresh", NeedsNetwork())], entrypoints=False
    ) as pipeline:
        assert "price_refresh" not in {i.name for i in pipeline.plugins.info()}
        assert pipeline.plugins.skipped == {"price_refresh": "needs the network (offline mode)"}


def test_cli_offline_flag(nim_server: Any, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "NIMPIPE_BASE_URL": nim_server.base_url,
        "NIMPIPE_MODEL": MODEL,
        "XDG_CONFIG_HOME": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-m", "nimpipe.cli", "--offline", "chat", "hi"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "offline mode is on" in done.stderr
    assert done.stdout.strip() == "NIM reply to: hi"
    done = subprocess.run(
        [sys.executable, "-m", "nimpipe.cli", "config", "--json"],
        capture_output=True,
        text=True,
        env={**env, "NIMPIPE_OFFLINE": "1"},
        cwd=tmp_path,
        timeout=60,
    )
    assert json.loads(done.stdout)["offline"] is True


def test_offline_process_counts_zero_foreign_attempts(nim_server: Any, tmp_path: Path) -> None:
    """A whole process under NIMPIPE_OFFLINE: turns run, a foreign call fails, counts prove it."""
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent("""
        import json
        from nimpipe import Pipeline, Turn, offline
        from nimpipe.config import Config
        from nimpipe.errors import OfflineError
        config = Config.load()
        with Pipeline.create(config, entrypoints=False) as pipeline:
            texts = [pipeline.run(Turn.create(f"t{i}")).text for i in range(3)]
            stream = pipeline.stream(Turn.create("streamed"))
            texts.append("".join(stream))
        try:
            import urllib.request
            urllib.request.urlopen("http://example.com/", timeout=30)
        except OfflineError as exc:
            refused = exc.host
        print(json.dumps({"texts": texts, "refused": refused, "stats": offline.stats()}))
    """)
    )
    env = {
        **os.environ,
        "NIMPIPE_OFFLINE": "1",
        "NIMPIPE_BASE_URL": nim_server.base_url,
        "NIMPIPE_MODEL": MODEL,
        "XDG_CONFIG_HOME": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout.strip().splitlines()[-1])
    assert data["texts"][0] == "NIM reply to: t0" and data["texts"][3] == "NIM reply to: streamed"
    assert data["refused"] == "example.com"
    foreign = {k: v for k, v in data["stats"].items() if not k.startswith("allowed:127.0.0.1")}
    assert foreign == {"refused:example.com": 1}


def test_full_stages_offline_reach_only_loopback(tmp_path: Path) -> None:
    """Catalog, health, guardrails, cascade and ledger in one offline process: every
    connection attempt and DNS lookup is counted, and all of them are loopback."""
    from nimpipe.testing.nim_server import NimServer

    cheap, big = MODEL, "meta/llama-3.1-70b-instruct"
    models = [
        {
            "id": cheap,
            "max_model_len": 8192,
            "replies": {"poem": "I'm sorry, but I can't help with that."},
        },
        {"id": big, "max_model_len": 131072, "replies": {"poem": "Roses are red, GPUs are fast."}},
    ]
    with NimServer(models=models) as server:
        (tmp_path / "nimpipe.toml").write_text(
            textwrap.dedent(f"""
                offline = true
                default_route = "local"
                [routes.local]
                base_url = "{server.base_url}"
                model = "{cheap}"
                [routes.big]
                base_url = "{server.base_url}"
                model = "{big}"
                tier = 1
                [routes.hosted]
                base_url = "https://integrate.api.nvidia.com/v1"
                model = "{big}"
                tier = 2
                [stages.nim_catalog]
                cache_dir = "{tmp_path / "catalog"}"
                [stages.nim_health]
                interval = 0.2
                [stages.guardrails]
                backends = []
                [stages.pii_redactor]
                action = "block"
                [stages.cascade]
                [stages.ledger]
                path = "{tmp_path / "ledger.sqlite"}"
            """)
        )
        script = tmp_path / "run.py"
        script.write_text(
            textwrap.dedent("""
                import json, time
                from nimpipe import Pipeline, Turn, offline
                from nimpipe.config import Config
                with Pipeline.create(Config.load(), entrypoints=False) as pipeline:
                    time.sleep(0.5)  # let the health and catalog stages probe in the background
                    results = [pipeline.run(Turn.create(p)) for p in (
                        "hello", "write a poem", "my card is 4111 1111 1111 1111")]
                    pipeline.plugins.pm.get_plugin("ledger").ledger.flush()
                    rows = pipeline.plugins.pm.get_plugin("ledger").ledger.report("route")
                print(json.dumps({
                    "routes": [r.route.name if r.route else None for r in results],
                    "blocked": [r.blocked is not None for r in results],
                    "ledger_calls": sum(row.calls for row in rows),
                    "stats": offline.stats(),
                }))
            """)
        )
        env = {
            **os.environ,
            "XDG_CONFIG_HOME": str(tmp_path),
            "NIMPIPE_HOME": str(tmp_path / "home"),
        }
        env.pop("NIMPIPE_LOAD_PLUGINS", None)
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout.strip().splitlines()[-1])
    assert data["routes"] == ["local", "big", None], (
        "the poem escalates; the hosted route is never used"
    )
    assert data["blocked"] == [False, False, True]
    assert data["ledger_calls"] == 3
    assert data["stats"] and all(key.startswith("allowed:127.0.0.1") for key in data["stats"]), (
        data["stats"]
    )
