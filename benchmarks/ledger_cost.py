"""What the ledger costs per model call: on the turn's path, and in its writer.

What it measures
    Part 1, the turn's path: ``Pipeline.run`` on an in-memory provider (no
    network, as ``overhead.py``'s Part 2), interleaved turn by turn, with
    and without the ``ledger`` stage (SQLite, default settings).  The
    ledger's writer thread runs meanwhile, so its competition for the
    interpreter lock is in the figures.  For comparison, the other cost
    stages each alone (``budget`` with a limit never reached, ``router``
    with one rule, ``cascade`` with its default scorers) and all four
    together.  Also ``record_cost`` alone: the stage's hook called in a
    tight loop (queueing one record).

    Part 2, the writer: ``--records`` records (20,000) queued through the
    :class:`Ledger` API as fast as possible, timed until the last one is
    committed, for SQLite with ``synchronous=FULL`` and ``NORMAL`` and, with
    ``--postgres URL``, PostgreSQL.

How to read it
    ``added us`` is the paired median difference per turn against the
    pipeline without stages (``overhead.py``'s pipeline), in microseconds:
    the ledger's cost per model call on the turn's path.  ``records/s`` and
    ``us/record`` are the writer's sustained rate; at the default batch size
    (256) one commit, and with FULL one fsync, serves many records.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import attrs
from _common import (
    CannedProvider,
    Stats,
    add_json_argument,
    canned_response,
    in_memory_route,
    interleave,
    paired_median_us,
    print_table,
    write_json,
)

from nimpipe import CallRecord, Pipeline, Price, Turn
from nimpipe.config import Config
from nimpipe_contrib.cost.ledger import Ledger

PROMPT = "Say hello in five words."
BASELINE = "pipeline, no stages"
LEDGER = "pipeline + ledger"
BUDGET = "pipeline + budget"
ROUTER = "pipeline + router (one rule)"
CASCADE = "pipeline + cascade"
ALL_STAGES = "pipeline + ledger, budget, router, cascade"


def turn_path(calls: int, warmup: int, workdir: Path) -> dict[str, Any]:
    """Part 1: turns with and without the cost stages, and ``record_cost`` alone."""
    route = attrs.evolve(
        in_memory_route(), price=Price(input_per_1k=0.001, output_per_1k=0.002), tier=0
    )
    canned = canned_response(route)
    stage_sets: dict[str, dict[str, Any]] = {
        BASELINE: {},
        LEDGER: {"ledger": {"path": str(workdir / "turns.sqlite")}},
        BUDGET: {"budget": {"daily_usd": 1e9}},
        ROUTER: {"router": {"rules": [{"match": {"tools_min": 3}, "route": "bench"}]}},
        CASCADE: {"cascade": {}},
        ALL_STAGES: {
            "ledger": {"path": str(workdir / "all.sqlite")},
            "budget": {"daily_usd": 1e9},
            "router": {"rules": [{"match": {"tools_min": 3}, "route": "bench"}]},
            "cascade": {},
        },
    }
    pipelines = {}
    for name, stages in stage_sets.items():
        config = Config.from_dict({"stages": stages}, env={}).with_routes(route, default="bench")
        pipelines[name] = Pipeline.create(
            config, entrypoints=False, provider=CannedProvider(response=canned)
        )
    try:
        modes: dict[str, Callable[[], object]] = {
            name: (lambda p=p: p.run(Turn.create(PROMPT))) for name, p in pipelines.items()
        }
        samples = interleave(modes, calls, warmup)
        stats = {name: Stats.of_ns(s) for name, s in samples.wall.items()}
        added = {
            name: paired_median_us(samples.wall[name], samples.wall[BASELINE])
            for name in modes
            if name != BASELINE
        }
        ledger = pipelines[LEDGER].plugins.pm.get_plugin("ledger")
        record = pipelines[LEDGER].run(Turn.create(PROMPT)).records[0]
        hook_us = _record_cost_alone(ledger, record, pipelines[LEDGER], calls)
        committed = ledger.ledger
        assert committed.flush(30)
    finally:
        for pipeline in pipelines.values():
            pipeline.close()
    rows = [
        (name, s.median_us, s.p95_us, added.get(name, float("nan"))) for name, s in stats.items()
    ]
    print_table(
        f"Part 1: the turn's path, in-memory provider ({calls} turns per mode, interleaved)",
        ("mode", "median us", "p95 us", "added us"),
        rows,
    )
    print(f"\nrecord_cost alone (queue one record): {hook_us:.2f} us per call")
    return {
        "stats": {name: asdict(s) for name, s in stats.items()},
        "added_us": added,
        "record_cost_us": hook_us,
        "committed": committed.committed,
    }


def _record_cost_alone(stage: Any, record: CallRecord, pipeline: Pipeline, calls: int) -> float:
    n = max(calls * 5, 10_000)
    best = float("inf")
    turn = Turn.create("x")
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(n):
            stage.record_cost(record=record, turn=turn, pipeline=pipeline)
        best = min(best, (time.perf_counter_ns() - start) / n / 1000)
        stage.ledger.flush(60)
    return best


def writer(records: int, workdir: Path, postgres: str | None) -> dict[str, Any]:
    """Part 2: sustained writer throughput per backend."""
    record = CallRecord(
        time=time.time(),
        turn_id="t",
        agent_id="main",
        agent_type="main",
        route="bench",
        provider="127.0.0.1:9",
        model="bench-model",
        prompt_tokens=8,
        completion_tokens=8,
        cost_usd=0.000024,
        price_source="bench",
        latency=0.004,
    )
    targets: dict[str, tuple[str, dict[str, Any]]] = {
        "sqlite, synchronous=FULL": (str(workdir / "full.sqlite"), {"synchronous": "full"}),
        "sqlite, synchronous=NORMAL": (str(workdir / "normal.sqlite"), {"synchronous": "normal"}),
    }
    if postgres:
        targets["postgresql"] = (postgres, {})
    results = {}
    for name, (target, options) in targets.items():
        ledger = Ledger.open(target, **options)
        ledger.start()
        ledger.record(record)
        ledger.flush(60)
        start = time.perf_counter()
        for _ in range(records):
            ledger.record(record)
        queued = time.perf_counter() - start
        ledger.flush(600)
        elapsed = time.perf_counter() - start
        ledger.close()
        results[name] = {
            "records": records,
            "seconds": round(elapsed, 3),
            "records_per_s": round(records / elapsed),
            "us_per_record": round(elapsed / records * 1e6, 2),
            "queue_us_per_record": round(queued / records * 1e6, 2),
        }
    print_table(
        f"Part 2: the writer ({records} records, batch 256)",
        ("backend", "records/s", "us/record", "queue us/record"),
        [
            (name, r["records_per_s"], r["us_per_record"], r["queue_us_per_record"])
            for name, r in results.items()
        ],
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The ledger's cost per model call: on the turn's path and in its writer.",
        epilog="Read the module docstring for what each figure means.",
    )
    parser.add_argument("--calls", type=int, default=5000, help="turns per mode in Part 1")
    parser.add_argument("--warmup", type=int, default=500, help="untimed rounds first")
    parser.add_argument("--records", type=int, default=20000, help="records in Part 2")
    parser.add_argument("--postgres", metavar="URL", help="also measure a PostgreSQL ledger")
    add_json_argument(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nimpipe-ledger-bench-") as workdir:
        part1 = turn_path(args.calls, args.warmup, Path(workdir))
        part2 = writer(args.records, Path(workdir), args.postgres)
    print(
        f"\nledger: {part1['added_us'][LEDGER]:.1f} us added per model call on the turn's path "
        f"(record_cost alone {part1['record_cost_us']:.2f} us); writer "
        f"{part2['sqlite, synchronous=FULL']['us_per_record']:.1f} us per record (SQLite, FULL)"
    )
    write_json(args.json, "ledger_cost", {"turn_path": part1, "writer": part2})
    return 0


if __name__ == "__main__":
    sys.exit(main())
