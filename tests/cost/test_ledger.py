"""The ledger stage: one durable record per call, reports, SQLite and PostgreSQL, durability."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.pg_fixture import pg_url, postgres_server  # noqa: F401

from nimpipe import CallRecord, Price, Route, Secret, Turn, Verdict
from nimpipe.errors import ConfigError
from nimpipe.jaato import _reports
from nimpipe.testing.nim_server import NimServer
from nimpipe_contrib.cost import reports
from nimpipe_contrib.cost.ledger import Ledger
from nimpipe_contrib.cost.reports import parse_since

TESTS = Path(__file__).resolve().parents[1]
WRITER = TESTS / "support" / "ledger_writer.py"
MODEL = "meta/llama-3.1-8b-instruct"
PRICE = Price(input_per_1k=1.0, output_per_1k=2.0, source="test price")


def route_for(server: Any, name: str = "local", **kw: Any) -> Route:
    kw.setdefault("price", PRICE)
    return Route(name=name, base_url=server.base_url, model=MODEL, **kw)


def ledger_of(pipeline: Any) -> Ledger:
    stage = pipeline.plugins.pm.get_plugin("ledger")
    assert stage is not None and stage.ledger is not None
    return stage.ledger


def make_record(i: int, **kw: Any) -> CallRecord:
    values: dict[str, Any] = {
        "time": 1_750_000_000.0 + i,
        "turn_id": f"t-{i}",
        "agent_id": "main",
        "agent_type": "main",
        "route": "local",
        "provider": "127.0.0.1:1",
        "model": MODEL,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": 0.02,
        "price_source": "test",
        "latency": 0.1,
    }
    values.update(kw)
    return CallRecord(**values)


# ----------------------------------------------------------------------
# one record per call, through the pipeline
# ----------------------------------------------------------------------


def test_every_call_is_recorded_with_tokens_cost_and_outcome(
    make_pipeline: Any, tmp_path: Path
) -> None:
    db = tmp_path / "ledger.sqlite"
    with NimServer() as server:
        pipeline = make_pipeline(
            routes=[route_for(server, max_retries=1)],
            stages={"ledger": {"path": str(db), "flush_interval": 0.05}},
        )
        ok = pipeline.run(Turn.create("plain call", agent_id="sub-1", agent_type="explorer"))
        streamed = pipeline.stream(Turn.create("streamed call with several words"))
        assert streamed.text() == "NIM reply to: streamed call with several words"
        server.inject("status", count=2, status=503)
        with pytest.raises(Exception, match="503"):
            pipeline.run(Turn.create("this one fails"))
        rows = ledger_of(pipeline).rows()
    assert [r["outcome"] for r in rows] == ["ok", "ok", "retried", "error"]
    first = rows[0]
    (record,) = ok.records
    assert first["turn_id"] == ok.turn.id and first["agent_id"] == "sub-1"
    assert first["agent_type"] == "explorer" and first["route"] == "local"
    assert first["model"] == MODEL and first["provider"] == server.root_url.split("//")[1]
    assert first["prompt_tokens"] == record.prompt_tokens > 0
    assert first["completion_tokens"] == record.completion_tokens > 0
    assert first["usage_source"] == "server" and first["price_source"] == "test price"
    assert first["cost_nusd"] == round(record.cost_usd * 1e9)
    assert first["latency_us"] > 0 and first["ttft_us"] is None and first["stream"] == 0
    # a streamed call is counted from the final usage chunk, never as zero
    stream_row = rows[1]
    assert stream_row["stream"] == 1 and stream_row["usage_source"] == "server"
    assert stream_row["completion_tokens"] == 8 and stream_row["ttft_us"] > 0
    assert rows[2]["error"] == "unavailable" and "503" in rows[2]["reason"]
    assert len({r["record_id"] for r in rows}) == 4


def test_close_flushes_what_is_queued(make_pipeline: Any, tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite"
    with NimServer() as server:
        pipeline = make_pipeline(
            routes=[route_for(server)],
            stages={"ledger": {"path": str(db), "flush_interval": 60, "batch_size": 1000}},
        )
        for i in range(5):
            pipeline.run(Turn.create(f"call {i}"))
        ledger = ledger_of(pipeline)
        assert ledger.committed == 0
        pipeline.close()
    assert ledger.committed == 5
    assert len(Ledger.open(db).rows()) == 5


def test_interpreter_exit_flushes_the_queue(tmp_path: Path) -> None:
    db = tmp_path / "exit.sqlite"
    code = (
        "import sys\n"
        "sys.path[:0] = [sys.argv[1], sys.argv[3]]\n"
        "from test_ledger import make_record\n"
        "from nimpipe_contrib.cost.ledger import Ledger\n"
        "ledger = Ledger.open(sys.argv[2], flush_interval=60, batch_size=1000)\n"
        "for i in range(50):\n"
        "    ledger.record(make_record(i))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(db), str(TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert len(Ledger.open(db).rows()) == 50


def test_no_api_key_reaches_the_ledger(make_pipeline: Any, tmp_path: Path) -> None:
    key = "nvapi-SECRETKEY0123456789"
    with NimServer(api_key="the-right-key") as server:
        pipeline = make_pipeline(
            routes=[route_for(server, api_key=Secret(key), max_retries=0)],
            stages={"ledger": {"path": str(tmp_path / "l.sqlite")}},
        )
        server.inject("auth", message=f"Incorrect API key provided: {key}; Bearer {key}")
        with pytest.raises(Exception, match="401"):
            pipeline.run(Turn.create("hello"))
        pipeline.close()
    raw = (tmp_path / "l.sqlite").read_bytes()
    wal = tmp_path / "l.sqlite-wal"
    if wal.exists():
        raw += wal.read_bytes()
    assert b"SECRETKEY" not in raw
    (row,) = Ledger.open(tmp_path / "l.sqlite").rows()
    assert row["error"] == "authentication" and "***" in row["reason"]


def test_verdicts_and_estimated_usage_are_kept(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.sqlite", flush_interval=0.01)
    verdict = Verdict(rule="self check input", decision="pass", plugin="guardrails")
    ledger.record(make_record(1, usage_source="estimated", verdicts=(verdict,)))
    ledger.record(make_record(2, price_source="none", cost_usd=0.0))
    ledger.flush()
    first, _ = ledger.rows()
    assert json.loads(first["verdicts"]) == [
        {"rule": "self check input", "decision": "pass", "plugin": "guardrails", "backend": ""}
    ]
    (row,) = ledger.report("route")
    assert row.estimated == 1 and row.unpriced == 1 and row.calls == 2
    ledger.close()


# ----------------------------------------------------------------------
# reports: the API, nimpipe cost and jaato's nimpipe-cost
# ----------------------------------------------------------------------


def test_report_groups_and_since(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "l.sqlite", flush_interval=0.01)
    day = 86400.0
    start = 1_750_000_000.0 - (1_750_000_000.0 % day)
    ledger.record(make_record(1, time=start + 10, route="a", agent_id="x", cost_usd=0.5))
    ledger.record(make_record(2, time=start + 20, route="b", agent_id="x", cost_usd=0.25))
    ledger.record(
        make_record(3, time=start + day + 5, route="a", agent_id="y", outcome="escalated", ttft=0.2)
    )
    by_route = ledger.report("route")
    assert [(r.key, r.calls, r.cost_usd) for r in by_route] == [("a", 2, 0.52), ("b", 1, 0.25)]
    assert by_route[0].escalated == 1 and by_route[0].mean_ttft_ms == 200.0
    by_day = ledger.report("day")
    assert [r.key for r in by_day] == ["2025-06-15", "2025-06-16"]
    by_agent = ledger.report("agent")
    assert {(r.key, r.agent_type) for r in by_agent} == {("x", "main"), ("y", "main")}
    assert [r.key for r in ledger.report("route", since=start + day)] == ["a"]
    assert ledger.spend(start + day) == (pytest.approx(0.02), {"y": pytest.approx(0.02)})
    with pytest.raises(ValueError, match="by must be one of"):
        ledger.report("week")
    ledger.close()


def test_parse_since() -> None:
    now = 1_750_000_000.0
    assert parse_since("7d", now) == now - 7 * 86400
    assert parse_since("24h", now) == now - 86400
    assert parse_since("30m", now) == now - 1800
    assert parse_since("2025-06-01", now) == 1_748_736_000.0
    assert parse_since("today", now) == now - now % 86400
    with pytest.raises(ConfigError, match="--since"):
        parse_since("last tuesday", now)


def cost_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nimpipe.cli", "cost", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")},
    )


def test_cost_command(tmp_path: Path) -> None:
    db = tmp_path / "l.sqlite"
    (tmp_path / "nimpipe.toml").write_text(f'[stages.ledger]\npath = "{db}"\n')
    missing = cost_cli(tmp_path)
    assert missing.returncode == 1 and "no ledger at" in missing.stderr
    ledger = Ledger.open(db, flush_interval=0.01)
    now = time.time()
    ledger.record(make_record(1, time=now, route="local", cost_usd=0.125))
    ledger.record(make_record(2, time=now, route="frontier", model="big", cost_usd=1.5))
    ledger.record(make_record(3, time=now - 30 * 86400, route="frontier", cost_usd=7.0))
    ledger.close()

    table = cost_cli(tmp_path, "--by", "route", "--since", "7d")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("spend by route") and "since 7d" in lines[0]
    assert lines[2].split()[:2] == ["frontier", "1"] and "1.500000" in lines[2]
    assert lines[-1].split()[0] == "total" and "1.625000" in lines[-1]

    data = json.loads(cost_cli(tmp_path, "--by", "model", "--json").stdout)
    assert data["by"] == "model" and data["ledger"] == f"sqlite:{db}"
    assert {r["key"]: r["calls"] for r in data["rows"]} == {MODEL: 2, "big": 1}
    assert data["total"]["cost_usd"] == pytest.approx(8.625)

    rows = cost_cli(tmp_path, "--by", "agent", "--csv").stdout.splitlines()
    assert rows[0].startswith("agent,agent_type,calls,errors")
    assert rows[1].startswith("main,main,3,0")

    bad = cost_cli(tmp_path, "--since", "someday")
    assert bad.returncode == 2 and "--since" in bad.stderr


def test_jaato_cost_summary_hook(make_pipeline: Any, tmp_path: Path) -> None:
    with NimServer() as server:
        pipeline = make_pipeline(
            routes=[route_for(server)], stages={"ledger": {"path": str(tmp_path / "l.sqlite")}}
        )
        pipeline.run(Turn.create("hi", agent_id="planner", agent_type="plan"))
        pipeline.run(Turn.create("hi again", agent_id="planner", agent_type="plan"))
        rows = _reports.ask(pipeline, _reports.COST_HOOK)
    assert rows is not None
    (row,) = rows
    assert row["agent_id"] == "planner" and row["agent_type"] == "plan" and row["calls"] == 2
    assert row["cost_usd"] > 0


# ----------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"flush_interval": "soon"}, "stages.ledger.flush_interval"),
        ({"batch_size": 0}, "stages.ledger.batch_size"),
        ({"synchronous": "off"}, "stages.ledger.synchronous"),
        ({"colour": "blue"}, "stages.ledger.colour"),
        ({"url": "postgresql://u:hunter2@db/x"}, "stages.ledger.url"),
        ({"url": "mysql://db/x"}, "stages.ledger.url"),
        ({"url_env": "NO_SUCH_VARIABLE_HERE"}, "stages.ledger.url_env"),
        ({"url": "sqlite:///x", "path": "y"}, "stages.ledger.path"),
    ],
)
def test_bad_settings_name_the_key(make_pipeline: Any, settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_pipeline(stages={"ledger": settings})
    cause = info.value
    assert isinstance(cause, ConfigError) and cause.key == key
    assert "hunter2" not in str(cause)


def test_postgres_without_psycopg_names_the_extra(
    make_pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError) as info:
        make_pipeline(stages={"ledger": {"url": "postgresql://db.example/ledger"}})
    assert "pip install 'nimpipe[postgres]'" in str(info.value)


def test_opentelemetry_metrics_and_spans(make_pipeline: Any, tmp_path: Path) -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("nimpipe")
    with NimServer() as server:
        pipeline = make_pipeline(
            routes=[route_for(server)],
            stages={"ledger": {"path": str(tmp_path / "l.sqlite"), "opentelemetry": True}},
        )
        ledger = ledger_of(pipeline)
        assert ledger._telemetry is not None
        ledger._telemetry._tracer = tracer
        result = pipeline.run(Turn.create("trace me"))
        ledger.flush()
    (span,) = exporter.get_finished_spans()
    assert span.name == f"chat {MODEL}" and span.kind is trace.SpanKind.CLIENT
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.usage.input_tokens"] == result.records[0].prompt_tokens
    assert attributes["nimpipe.turn_id"] == result.turn.id


# ----------------------------------------------------------------------
# durability and concurrency
# ----------------------------------------------------------------------


def test_kill_9_loses_no_committed_record(tmp_path: Path) -> None:
    db = tmp_path / "kill.sqlite"
    child = subprocess.Popen(
        [sys.executable, str(WRITER), "turns", str(db)],
        stdout=subprocess.PIPE,
        text=True,
    )
    committed: list[str] = []
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 60
        while len(committed) < 40 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            if line.startswith("COMMITTED "):
                committed.extend(line.split()[1:])
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        committed.extend(
            word
            for line in child.stdout.read().splitlines()
            if line.startswith("COMMITTED ")
            for word in line.split()[1:]
        )
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert len(committed) >= 40
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0] for row in conn.execute("SELECT record_id FROM nimpipe_calls")}
    finally:
        conn.close()
    missing = set(committed) - stored
    assert not missing, f"{len(missing)} committed records lost"
    # the batching window: at most one batch (4 records) beyond what was reported
    assert len(stored) - len(set(committed)) <= 4
    print(f"\nkill -9: {len(committed)} committed records reported, {len(stored)} stored, 0 lost")


def run_writers(target: str, count: int, processes: int = 4) -> None:
    start_at = time.time() + 1.5
    children = [
        subprocess.Popen(
            [sys.executable, str(WRITER), "records", target, f"w{n}", str(count), str(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(processes)
    ]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        assert out.strip() == f"DONE {count}"


def test_four_processes_give_exact_counts_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite"
    run_writers(str(db), 400)
    ledger = Ledger.open(db)
    rows = ledger.report("agent")
    assert {(r.key, r.calls) for r in rows} == {(f"w{n}", 400) for n in range(4)}
    assert sum(r.calls for r in rows) == 1600
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_four_processes_give_exact_counts_postgres(pg_url: str) -> None:  # noqa: F811
    run_writers(pg_url, 400)
    rows = Ledger.open(pg_url).report("agent")
    assert {(r.key, r.calls) for r in rows} == {(f"w{n}", 400) for n in range(4)}


def test_writer_waits_out_a_locked_database(tmp_path: Path) -> None:
    db = tmp_path / "locked.sqlite"
    ledger = Ledger.open(db, flush_interval=0.01, busy_timeout=0.05)
    ledger.record(make_record(0))
    assert ledger.flush(10)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    for i in range(1, 20):
        ledger.record(make_record(i))
    time.sleep(0.5)
    assert ledger.committed == 1 and ledger.write_failures > 0
    blocker.execute("COMMIT")
    blocker.close()
    assert ledger.flush(10)
    assert ledger.committed == 20 and len(ledger.rows()) == 20
    ledger.close()


def varied_records(n: int = 300) -> list[CallRecord]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        out.append(
            make_record(
                i,
                time=1_750_000_000.0 + i * 997.3,
                route=rng.choice(["local", "hosted", "frontier"]),
                model=rng.choice(["m-small", "m-large", "m-huge"]),
                agent_id=rng.choice(["main", "sub-1", "sub-2", "judge"]),
                agent_type=rng.choice(["main", "explorer"]),
                prompt_tokens=rng.randint(1, 5000),
                completion_tokens=rng.randint(0, 900),
                cost_usd=rng.random() / 37,
                latency=rng.random() * 3,
                ttft=rng.choice([None, rng.random()]),
                outcome=rng.choice(["ok", "ok", "ok", "escalated", "error", "retried"]),
                usage_source=rng.choice(["server", "server", "estimated"]),
                price_source=rng.choice(["test", "none"]),
            )
        )
    return out


def test_sqlite_and_postgres_give_identical_reports(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
) -> None:
    records = varied_records()
    ledgers = [Ledger.open(tmp_path / "same.sqlite"), Ledger.open(pg_url)]
    for ledger in ledgers:
        for record in records:
            ledger.record(record)
        ledger.close()
    sqlite, postgres = (Ledger.open(tmp_path / "same.sqlite"), Ledger.open(pg_url))
    for by in reports.GROUPINGS:
        for since in (None, 1_750_000_000.0 + 150_000):
            left, right = sqlite.report(by, since), postgres.report(by, since)
            assert left == right, by
            expected = sum(1 for r in records if since is None or r.time >= since)
            assert sum(r.calls for r in left) == expected
    assert sqlite.spend(0) == postgres.spend(0)


def test_pipeline_on_postgres(make_pipeline: Any, pg_url: str) -> None:  # noqa: F811
    with NimServer() as server:
        pipeline = make_pipeline(
            routes=[route_for(server)],
            stages={"ledger": {"url": pg_url, "flush_interval": 0.05}},
        )
        for i in range(3):
            pipeline.run(Turn.create(f"postgres call {i}", agent_id="pg"))
        (row,) = ledger_of(pipeline).report("agent")
    assert row.key == "pg" and row.calls == 3 and row.cost_usd > 0


# ----------------------------------------------------------------------
# hostile records: nothing poisons the ledger, nothing blocks a turn
# ----------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger database: an SQLite file, or a database on the test PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "hostile.sqlite")
    return str(request.getfixturevalue("pg_url"))


def raw_connection(target: str) -> Any:
    """A connection of our own to the ledger's database (autocommit)."""
    if target.startswith("postgresql://"):
        import psycopg

        return psycopg.connect(target, autocommit=True)
    return sqlite3.connect(target, isolation_level=None)


KEY = "nvapi-" + "Q" * 40

#: Records whose figures are impossible, and the field each error must name.
IMPOSSIBLE = [
    ({"prompt_tokens": 10**20}, "prompt_tokens"),
    ({"completion_tokens": -5}, "completion_tokens"),
    ({"completion_tokens": 1e30}, "completion_tokens"),
    ({"prompt_tokens": 12.5}, "prompt_tokens"),
    ({"prompt_tokens": True}, "prompt_tokens"),
    ({"prompt_tokens": 10**5000}, "prompt_tokens"),
    ({"cost_usd": math.nan}, "cost_usd"),
    ({"cost_usd": math.inf}, "cost_usd"),
    ({"cost_usd": -1.0}, "cost_usd"),
    ({"cost_usd": 1e300, "error": f"echo {KEY}"}, "cost_usd"),
]


def test_impossible_figures_are_quarantined_and_the_rest_commits(
    target: str, tmp_path: Path
) -> None:
    ledger = Ledger.open(target, flush_interval=0.01, spill_dir=tmp_path / "spill")
    good = 0
    for i, (figures, _) in enumerate(IMPOSSIBLE):
        ledger.record(make_record(100 + i, turn_id=f"bad-{i}", **figures))
        ledger.record(make_record(i))
        good += 1
    # figures that cannot make spend are clamped into their columns, texts cleaned
    ledger.record(
        make_record(
            50,
            turn_id="clamped",
            model="m\x00odel \ud800",
            reason="r" * 100_000,
            attempt=2**40,
            latency=math.nan,
            ttft=-5.0,
            time=math.inf,
        )
    )
    good += 1
    assert ledger.flush(30), "the writer must not be stuck on a record"
    assert ledger.committed == good and ledger.quarantined == len(IMPOSSIBLE)
    assert ledger.lost == 0 and ledger.pending == 0
    rows = ledger.rows()
    assert len(rows) == good and not [r for r in rows if r["turn_id"].startswith("bad-")]
    (clamped,) = [r for r in rows if r["turn_id"] == "clamped"]
    assert clamped["model"] == "model ?" and len(clamped["reason"]) <= 4096
    assert clamped["attempt"] == 2**31 - 1 and clamped["latency_us"] == 0
    assert clamped["ttft_us"] == 0 and abs(clamped["ts"] - time.time()) < 60
    (report,) = ledger.report("route")
    assert report.calls == good and report.cost_usd == pytest.approx(0.02 * good)
    held = ledger.quarantine()
    assert [h["record"]["turn_id"] for h in held] == [f"bad-{i}" for i in range(len(IMPOSSIBLE))]
    for entry, (_, field) in zip(held, IMPOSSIBLE, strict=True):
        assert entry["error"].startswith(f"impossible figures: {field} = ")
    assert held[0]["record"]["prompt_tokens"] == 10**20
    assert held[6]["record"]["cost_usd"] == "nan"
    assert "about 5001 digits" in held[5]["record"]["prompt_tokens"]
    assert KEY not in json.dumps(held) and "***" in held[-1]["record"]["error"]
    assert ledger.quarantined_count() == len(IMPOSSIBLE)
    ledger.close()
    print(f"\n{backend_of(target)}: {good} committed, {len(IMPOSSIBLE)} quarantined")


def test_a_batch_the_database_refuses_is_split_and_the_refused_record_quarantined(
    target: str, tmp_path: Path
) -> None:
    ledger = Ledger.open(target, flush_interval=60, batch_size=64, spill_dir=tmp_path / "s")
    ledger.record(make_record(0))
    assert ledger.flush(10)
    conn = raw_connection(target)
    try:
        # the database itself refuses one record (a constraint added by its owner)
        if target.startswith("postgresql://"):
            conn.execute(
                "ALTER TABLE nimpipe_calls ADD CONSTRAINT no_poison CHECK (model <> 'poison')"
            )
        else:
            conn.execute(
                "CREATE TRIGGER no_poison BEFORE INSERT ON nimpipe_calls "
                "WHEN NEW.model = 'poison' BEGIN SELECT RAISE(ABORT, 'no_poison'); END"
            )
    finally:
        conn.close()
    for i in range(1, 41):
        ledger.record(make_record(i, model="poison" if i in (7, 30) else MODEL))
    assert ledger.flush(30)  # one batch of 40: split until the two are found
    assert ledger.committed == 39 and ledger.quarantined == 2 and ledger.lost == 0
    assert len(ledger.rows()) == 39
    held = ledger.quarantine()
    assert [h["record"]["turn_id"] for h in held] == ["t-7", "t-30"]
    assert all("refused by the database" in h["error"] and "no_poison" in h["error"] for h in held)
    ledger.close()


def lock_ledger(target: str) -> Any:
    """Hold the ledger's table locked from another connection; returns the connection."""
    conn = raw_connection(target)
    if target.startswith("postgresql://"):
        conn.execute("BEGIN")
        conn.execute("LOCK TABLE nimpipe_calls IN ACCESS EXCLUSIVE MODE")
    else:
        conn.execute("BEGIN EXCLUSIVE")
    return conn


def unlock(conn: Any) -> None:
    conn.execute("COMMIT")
    conn.close()


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_a_full_queue_and_a_stuck_writer_never_hold_a_turn_past_its_deadline(
    make_pipeline: Any, target: str, tmp_path: Path, mode: str
) -> None:
    settings: dict[str, Any] = {
        "flush_interval": 0.01,
        "batch_size": 2,
        "max_pending": 4,
        "queue_wait": 30,  # only the turn's deadline bounds the wait
        "retry_timeout": 60,  # the writer stays stuck on its batch
        "busy_timeout": 60,
    }
    settings.update({"url": target} if target.startswith("postgresql://") else {"path": target})
    with NimServer() as server:
        pipeline = make_pipeline(routes=[route_for(server)], stages={"ledger": settings})
        ledger = ledger_of(pipeline)
        assert pipeline.run(Turn.create("before the lock")).ok
        assert ledger.flush(10)
        blocker = lock_ledger(target)
        timeout = 1.0
        overshoots: list[float] = []

        def timed(turn: Turn, started: float, result: Any) -> None:
            assert result.ok
            overshoots.append(time.monotonic() - started - timeout)

        try:
            turns = [Turn.create(f"turn {i} while stuck", timeout=timeout) for i in range(12)]
            if mode == "run":
                for turn in turns:
                    started = time.monotonic()
                    timed(turn, started, pipeline.run(turn))
            else:

                async def one(turn: Turn) -> None:
                    started = time.monotonic()
                    timed(turn, started, await pipeline.arun(turn))

                async def main() -> None:
                    for turn in turns:  # each turn starts when the last ended
                        await one(turn)

                asyncio.run(main())
            assert ledger.spilled > 0 and ledger.lost == 0
        finally:
            unlock(blocker)
        assert ledger.flush(60)
        assert ledger.committed == 13 and ledger.lost == 0
        assert len(ledger.rows()) == 13
    worst = max(overshoots)
    # every answer came back, within its deadline: the ledger took at most half the time left
    assert worst <= 0
    print(
        f"\n{backend_of(target)} {mode}: stuck writer, full queue: slowest turn "
        f"{timeout + worst:.3f} s on a {timeout:.1f} s deadline; "
        f"{ledger.spilled} records spilled, 0 lost"
    )


def backend_of(target: str) -> str:
    return "postgresql" if target.startswith("postgresql://") else "sqlite"


def test_record_waits_for_a_stuck_writer_at_most_queue_wait(target: str, tmp_path: Path) -> None:
    ledger = Ledger.open(
        target,
        flush_interval=0.01,
        batch_size=2,
        max_pending=4,
        queue_wait=0.3,
        retry_timeout=60,
        busy_timeout=60,
        spill_dir=tmp_path / "spill",
    )
    ledger.record(make_record(0))
    assert ledger.flush(10)
    blocker = lock_ledger(target)
    waits = []
    try:
        for i in range(1, 40):  # the writer is stuck on a batch; the queue fills up
            started = time.monotonic()
            ledger.record(make_record(i), deadline=time.monotonic() + 10 if i % 2 else None)
            waits.append(time.monotonic() - started)
        spilled = ledger.spilled
    finally:
        unlock(blocker)
    assert ledger.flush(60) and ledger.lost == 0
    assert ledger.committed == 40 and len(ledger.rows()) == 40
    ledger.close()
    # one record waited queue_wait for room, then went to the spill file; the writer
    # took nothing since, so the records after it were not kept waiting again
    assert spilled > 0 and sorted(waits)[-2] < 0.3 <= max(waits) <= 0.3 + 0.5
    print(
        f"\n{backend_of(target)}: full queue, stuck writer: record_cost took at most "
        f"{max(waits):.3f} s (queue_wait 0.3 s), then {sorted(waits)[-2] * 1e3:.2f} ms; "
        f"{spilled} of 39 records spilled, all committed after"
    )


def test_an_unavailable_database_keeps_the_records_in_the_spill_file(tmp_path: Path) -> None:
    db = tmp_path / "down.sqlite"
    ledger = Ledger.open(db, flush_interval=0.01, busy_timeout=0.05, retry_timeout=0.3)
    ledger.record(make_record(0))
    assert ledger.flush(10)
    blocker = lock_ledger(str(db))
    try:
        for i in range(1, 21):
            ledger.record(make_record(i))
        # the writer retries for retry_timeout, then keeps the batch: flush says so at once
        started = time.monotonic()
        assert not ledger.flush(10)
        assert time.monotonic() - started < 5
        assert ledger.committed == 1 and ledger.spilled == 20 and ledger.lost == 0
        assert ledger.write_failures > 0 and ledger.waiting() == 20
    finally:
        unlock(blocker)
    # the database takes writes again: the spill file is written and removed
    deadline = time.monotonic() + 30
    while ledger.committed < 21 and time.monotonic() < deadline:
        ledger.flush(1)
    assert ledger.committed == 21 and ledger.lost == 0 and ledger.waiting() == 0
    assert len(ledger.rows()) == 21
    ledger.close()


def test_records_left_in_a_spill_file_are_written_by_the_next_ledger(tmp_path: Path) -> None:
    db = tmp_path / "later.sqlite"
    Ledger.open(db).close()
    first = Ledger.open(db, flush_interval=0.01, busy_timeout=0.05, retry_timeout=0.1)
    first.record(make_record(0))
    assert first.flush(10)
    blocker = lock_ledger(str(db))
    try:
        for i in range(1, 11):
            first.record(make_record(i))
        first.close(timeout=0.2)  # the database stays locked through close
    finally:
        unlock(blocker)
    assert first.committed == 1 and first.spilled == 10 and first.lost == 0
    assert Ledger.open(db).waiting() == 10
    second = Ledger.open(db, flush_interval=0.01)
    second.start()  # a ledger that writes adopts what a closed one left
    assert second.flush(10) and len(second.rows()) == 11 and second.waiting() == 0
    second.close()


def test_kill_9_while_the_database_is_down_loses_no_spilled_record(tmp_path: Path) -> None:
    db = tmp_path / "crash.sqlite"
    Ledger.open(db).close()
    ledger = Ledger.open(db)
    ledger.record(make_record(0))
    ledger.close()
    blocker = lock_ledger(str(db))
    child = subprocess.Popen(
        [sys.executable, str(WRITER), "spill", str(db), "crash", "50"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "SPILLED 50", line
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        unlock(blocker)
    assert child.returncode == -signal.SIGKILL
    survivor = Ledger.open(db, flush_interval=0.01)
    assert survivor.waiting() == 50
    survivor.start()  # the killed process is gone: its spill file is adopted
    assert survivor.flush(10)
    rows = survivor.report("agent")
    survivor.close()
    assert {(r.key, r.calls) for r in rows} == {("crash", 50), ("main", 1)}
    assert survivor.waiting() == 0


def test_nimpipe_cost_names_quarantined_and_waiting_records(tmp_path: Path) -> None:
    db = tmp_path / "l.sqlite"
    (tmp_path / "nimpipe.toml").write_text(f'[stages.ledger]\npath = "{db}"\n')
    ledger = Ledger.open(db, flush_interval=0.01)
    ledger.record(make_record(1, time=time.time()))
    ledger.record(make_record(2, time=time.time(), prompt_tokens=10**20))
    ledger.close()
    table = cost_cli(tmp_path)
    assert table.returncode == 0, table.stderr
    assert "note: 1 records quarantined" in table.stdout and "nimpipe_quarantine" in table.stdout
    assert table.stdout.splitlines()[2].split()[:2] == ["local", "1"]
    data = json.loads(cost_cli(tmp_path, "--json").stdout)
    assert data["quarantined"] == 1 and data["waiting"] == 0
    assert data["total"]["calls"] == 1
    csv_run = cost_cli(tmp_path, "--csv")
    assert "1 records quarantined" in csv_run.stderr


@pytest.mark.parametrize("mode", ["run", "arun"])
def test_a_server_reporting_impossible_usage_does_not_poison_the_ledger(
    make_pipeline: Any, target: str, mode: str
) -> None:
    settings: dict[str, Any] = {"flush_interval": 0.01}
    settings.update({"url": target} if target.startswith("postgresql://") else {"path": target})
    body = {
        "id": "chatcmpl-huge",
        "object": "chat.completion",
        "created": 1_750_000_000,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 10**20, "completion_tokens": 3},
    }
    with NimServer() as server:
        pipeline = make_pipeline(
            routes=[route_for(server, max_retries=0)], stages={"ledger": settings}
        )
        server.inject("status", count=1, status=200, body=body)
        turns = [Turn.create(f"{mode} call {i}") for i in range(6)]

        async def all_turns() -> list[Any]:
            return list(
                await asyncio.gather(*(pipeline.arun(t) for t in turns), return_exceptions=True)
            )

        if mode == "run":
            results: list[Any] = []
            for turn in turns:
                try:
                    results.append(pipeline.run(turn))
                except Exception as exc:
                    results.append(exc)
        else:
            results = asyncio.run(all_turns())
        ledger = ledger_of(pipeline)
        assert ledger.flush(30)
        rows = ledger.rows()
    failed = [r for r in results if isinstance(r, Exception)]
    assert len(failed) == 1 and type(failed[0]).__name__ == "MalformedReplyError"
    # every call is recorded, the failed one with estimated, possible figures
    assert len(rows) == 6 and ledger.quarantined == 0 and ledger.lost == 0
    assert max(r["prompt_tokens"] for r in rows) < 1000
    assert sorted(r["outcome"] for r in rows) == ["error"] + ["ok"] * 5
