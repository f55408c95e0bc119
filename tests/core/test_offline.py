"""Offline mode: enforced at the socket level, counted, never a hang."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
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
            assert result.route is not None and result.route.name == "local", (
                "the hosted route is not used offline"
            )
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


#: A child process in offline mode that tries every way of sending a datagram,
#: connecting and resolving a name, and reports what happened to each attempt.
_ATTEMPTS = textwrap.dedent("""
    import asyncio, json, socket, sys, time
    from nimpipe import offline
    from nimpipe.errors import OfflineError

    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    offline.enforce()

    def udp(family=socket.AF_INET):
        return socket.socket(family, socket.SOCK_DGRAM)

    def connected_udp(address):
        sock = udp()
        sock.connect(address)
        return sock.send(b"connected:" + address[0].encode())

    async def datagram_transport():
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        transport.sendto(b"transport:8.8.4.4", ("8.8.4.4", 53))  # refused inside asyncio
        await asyncio.sleep(0)
        transport.close()

    async def asyncio_lookup(host):
        return await asyncio.get_running_loop().getaddrinfo(host, 53)

    async def asyncio_datagram(remote):
        await asyncio.get_running_loop().create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=remote)

    refused = {
        "sendto public": lambda: udp().sendto(b"8.8.8.8", ("8.8.8.8", 53)),
        "sendto flags": lambda: udp().sendto(b"1.1.1.1", 0, ("1.1.1.1", 53)),
        "sendto v6": lambda: udp(socket.AF_INET6).sendto(b"v6", ("2001:4860:4860::8888", 53)),
        "sendto mapped": lambda: udp(socket.AF_INET6).sendto(b"m", ("::ffff:8.8.8.8", 53)),
        "sendto name": lambda: udp().sendto(b"example.com", ("example.com", 53)),
        "sendto x.localhost": lambda: udp().sendto(b"x.localhost", ("x.localhost", port)),
        "sendmsg public": lambda: udp().sendmsg([b"9.9.9.9"], [], 0, ("9.9.9.9", 53)),
        "sendmsg name": lambda: udp().sendmsg([b"example.org"], [], 0, ("example.org", 53)),
        "udp connect public": lambda: connected_udp(("8.8.8.8", 53)),
        "udp connect name": lambda: connected_udp(("example.net", 53)),
        "udp connect x.localhost": lambda: connected_udp(("x.localhost", port)),
        "udp connect_ex": lambda: udp().connect_ex(("8.8.8.8", 53)),
        "tcp connect name": lambda: socket.socket().connect(("example.com", 443)),
        "tcp create_connection": lambda: socket.create_connection(("example.com", 443), 30),
        "bind name": lambda: udp().bind(("example.com", 0)),
        "getaddrinfo": lambda: socket.getaddrinfo("example.com", 443),
        "getaddrinfo bytes": lambda: socket.getaddrinfo(b"example.com", 443),
        "getaddrinfo x.localhost": lambda: socket.getaddrinfo("x.localhost", 80),
        "getaddrinfo a.b.localhost": lambda: socket.getaddrinfo("a.b.localhost", 80),
        "gethostbyname": lambda: socket.gethostbyname("example.com"),
        "gethostbyname x.localhost": lambda: socket.gethostbyname("x.localhost"),
        "gethostbyname_ex": lambda: socket.gethostbyname_ex("example.com"),
        "gethostbyaddr": lambda: socket.gethostbyaddr("8.8.8.8"),
        "gethostbyaddr name": lambda: socket.gethostbyaddr("example.com"),
        "gethostbyaddr unlisted loopback": lambda: socket.gethostbyaddr("127.0.0.99"),
        "getnameinfo": lambda: socket.getnameinfo(("8.8.8.8", 53), 0),
        "getfqdn": lambda: socket.getfqdn("example.com"),
        "asyncio getaddrinfo": lambda: asyncio.run(asyncio_lookup("example.com")),
        "asyncio datagram": lambda: asyncio.run(asyncio_datagram(("8.8.8.8", 53))),
    }
    allowed = {
        "sendto 127.0.0.1": lambda: udp().sendto(b"127.0.0.1", ("127.0.0.1", port)),
        "sendto localhost": lambda: udp().sendto(b"localhost", ("localhost", port)),
        "sendmsg 127.0.0.1": lambda: udp().sendmsg([b"sendmsg"], [], 0, ("127.0.0.1", port)),
        "udp connect 127.0.0.1": lambda: connected_udp(("127.0.0.1", port)),
        "getaddrinfo localhost": lambda: socket.getaddrinfo("localhost", port),
        "gethostbyaddr 127.0.0.1": lambda: socket.gethostbyaddr("127.0.0.1"),
    }
    results = {}
    for name, attempt in refused.items():
        started = time.monotonic()
        try:
            attempt()
            results[name] = {"outcome": "allowed"}
        except OfflineError as exc:
            results[name] = {"outcome": "refused", "host": exc.host, "message": str(exc)}
        except Exception as exc:
            results[name] = {"outcome": f"{type(exc).__name__}: {exc}"}
        results[name]["seconds"] = time.monotonic() - started
    for name, attempt in allowed.items():
        attempt()
    asyncio.run(datagram_transport())
    received = []
    while True:
        try:
            received.append(listener.recv(100).decode())
        except TimeoutError:
            break
    print(json.dumps({"results": results, "received": sorted(received),
                      "stats": offline.stats()}))
""")


def _run_attempts(tmp_path: Path, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "attempts.py"
    script.write_text(_ATTEMPTS)
    return subprocess.run(
        [*prefix, sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)},
        cwd=tmp_path,
        timeout=120,
    )


def test_udp_and_every_resolver_call_are_refused_at_once(tmp_path: Path) -> None:
    """Datagrams, connects (UDP too) and every lookup: refused naming host and caller;
    the loopback listener receives only what was sent to loopback."""
    done = _run_attempts(tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in data["results"].items():
        assert result["outcome"] == "refused", (name, result)
        assert result["host"] and result["host"] in result["message"], (name, result)
        if name.startswith("asyncio getaddrinfo"):  # resolved in an executor thread
            assert "caller: unknown, in thread asyncio_" in result["message"], result
        else:
            assert "caller: __main__." in result["message"], (name, result)
        assert result["seconds"] < 1.0, (name, result)  # at once: no DNS timeout, no hang
    by_name = data["results"]
    assert by_name["sendto name"]["host"] == "example.com"
    assert by_name["sendto mapped"]["host"] == "::ffff:8.8.8.8"
    assert by_name["getaddrinfo x.localhost"]["host"] == "x.localhost"
    assert "is not in" in by_name["getaddrinfo x.localhost"]["message"]
    assert by_name["gethostbyaddr unlisted loopback"]["host"] == "127.0.0.99"
    # What reached the listener: the loopback sends and nothing else.
    assert data["received"] == sorted(["127.0.0.1", "localhost", "sendmsg", "connected:127.0.0.1"])
    stats = data["stats"]
    allowed = {key for key in stats if key.startswith("allowed:")}
    assert allowed == {"allowed:127.0.0.1", "allowed:localhost"}, stats
    for host in ("8.8.8.8", "8.8.4.4", "9.9.9.9", "example.com", "x.localhost", "127.0.0.99"):
        assert stats.get(f"refused:{host}", 0) >= 1, (host, stats)


_STRACE_ADDRESS = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')


def test_no_packet_leaves_at_the_os_level(tmp_path: Path) -> None:
    """The same attempts under strace: every connect/sendto/sendmsg the kernel sees goes to
    loopback (the DNS server included: not one query leaves)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    trace = tmp_path / "strace.txt"
    done = _run_attempts(
        tmp_path, [strace, "-f", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-o", str(trace)]
    )
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(r["outcome"] == "refused" for r in data["results"].values()), data["results"]
    addresses = []
    for line in trace.read_text().splitlines():
        for v4, v6 in _STRACE_ADDRESS.findall(line):
            addresses.append(v4 or v6)
    # The trace sees traffic: the datagrams sent to the loopback listener are in it.
    assert addresses.count("127.0.0.1") >= 3, trace.read_text()[-2000:]
    leaving = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
    assert leaving == [], leaving


def test_addresses_of_allowed_names_are_allowed(offline_mode: None, monkeypatch: Any) -> None:
    """A self-hosted route named by DNS: the addresses its name resolved to may be reached,
    other addresses may not (audit events raised by hand: nothing is sent)."""
    import socket

    offline.enforce(["nim.internal"])
    answer = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", 8000))]
    monkeypatch.setattr(offline, "_real_getaddrinfo", lambda *args, **kwargs: answer)
    assert socket.getaddrinfo("nim.internal", 8000) == answer
    sys.audit("socket.connect", None, ("10.1.2.3", 8000))
    with pytest.raises(OfflineError, match=r"10\.1\.2\.4"):
        sys.audit("socket.connect", None, ("10.1.2.4", 8000))
    assert offline.stats() == {"allowed:10.1.2.3": 1, "refused:10.1.2.4": 1}
    offline.enforce()  # a new allowed set forgets what the old one resolved to
    with pytest.raises(OfflineError):
        sys.audit("socket.connect", None, ("10.1.2.3", 8000))
