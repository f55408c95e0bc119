"""Async throughput of ``Pipeline.arun`` against raw ``AsyncOpenAI`` at the same concurrency.

What it measures
    For each concurrency level (``--concurrency 64`` by default; several may
    be given), three callers each send ``--requests`` non-streamed chat
    completions (640 by default) with at most that many in flight, bounded by
    a semaphore and launched with ``asyncio.gather``:

    * ``raw AsyncOpenAI``: ``await client.chat.completions.create(...)``;
    * ``pipeline, no-op hooks``: ``await pipeline.arun(Turn.create(...))`` with
      a plugin implementing every per-turn hook, each doing nothing;
    * ``pipeline, default``: the same with only the built-in ``default_route``.

    The requests are split into ``--rounds`` rounds; in each round every
    caller sends its share, one caller after the other, the order rotating
    from round to round, so that load changes on the machine hit all of them.
    By default the target is the NIM-shaped test server in a child process
    answering after ``--latency`` seconds (0.02); ``--base-url`` points at a
    real NIM instead.

    Part 2 takes the network away: the same concurrency, but the pipelines
    run on a provider that answers from memory (suspending once per call),
    against awaiting that provider directly (``--stub-turns`` turns per
    caller, 10,000 by default).

How to read it
    ``req/s`` is completed requests over the time the caller's rounds took.
    ``ratio`` is a pipeline's req/s over the raw client's (target: at least
    0.9x); ``round ratios`` the same per round, as median and range, which
    shows how much of a difference is noise.  ``p50``/``p95 ms`` are
    per-request latencies, queueing for the semaphore excluded.  ``cpu
    us/req`` is the process CPU time per request and ``cpu ratio`` the raw
    client's over the pipeline's: the req/s ratio the two would reach with
    the CPU to themselves, less disturbed by other processes than req/s.
    On the test server the client's CPU, not the server, is the limit, so
    this is the cost of nimpipe's per-turn work once the event loop is
    saturated.

    In Part 2, ``added cpu us`` is the CPU a pipeline turn takes beyond the
    direct call: nimpipe's own async cost per turn, steady on a busy machine.
    ``predicted ratio`` sets it against the raw client's CPU per request from
    Part 1: the req/s ratio a CPU-bound client would reach if that were all.
    A Part 1 ratio well below the prediction is noise, or cost that only
    shows with the real client (the pipeline's code running with cold caches
    between network events).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from _common import (
    PROMPT,
    WITH_HOOKS,
    CannedProvider,
    Target,
    add_json_argument,
    add_target_arguments,
    build_pipelines,
    canned_response,
    in_memory_route,
    open_target,
    percentile,
    print_table,
    raw_client_kwargs,
    raw_request,
    rotation,
    route_for,
    write_json,
)

import nimpipe
from nimpipe import Pipeline, Turn

TARGET_RATIO = 0.9
BASELINE = "raw AsyncOpenAI"
DIRECT = "provider awaited directly"


@dataclass
class Tally:
    """What one caller achieved over its rounds."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    completed: int = 0
    errors: int = 0
    first_error: str | None = None
    latencies_ns: list[int] = field(default_factory=list)
    round_rates: list[float] = field(default_factory=list)
    round_cpu_us: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        """Process CPU time per completed request, in microseconds."""
        return self.cpu_seconds / self.completed * 1e6 if self.completed else float("nan")


async def burst(
    call: Callable[[], Awaitable[object]], requests: int, concurrency: int, tally: Tally
) -> None:
    """Send ``requests`` calls, at most ``concurrency`` at once; add the outcome to ``tally``."""
    gate = asyncio.Semaphore(concurrency)
    clock = time.perf_counter_ns
    completed = 0

    async def one() -> None:
        nonlocal completed
        async with gate:
            start = clock()
            try:
                await call()
            except Exception as exc:
                tally.errors += 1
                if tally.first_error is None:
                    tally.first_error = f"{type(exc).__name__}: {exc}"
                return
            tally.latencies_ns.append(clock() - start)
            completed += 1

    started = time.perf_counter()
    cpu_started = time.process_time()
    await asyncio.gather(*(one() for _ in range(requests)))
    cpu = time.process_time() - cpu_started
    elapsed = time.perf_counter() - started
    tally.seconds += elapsed
    tally.cpu_seconds += cpu
    tally.completed += completed
    tally.round_rates.append(completed / elapsed)
    tally.round_cpu_us.append(cpu / completed * 1e6 if completed else float("nan"))


async def run_level(
    modes: dict[str, Callable[[], Awaitable[object]]],
    concurrency: int,
    requests: int,
    rounds: int,
) -> dict[str, Tally]:
    """One concurrency level: a warm-up burst per caller, then the rotating rounds."""
    names = list(modes)
    for name in names:
        await burst(modes[name], concurrency, concurrency, Tally())
    tallies = {name: Tally() for name in names}
    per_round = [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]
    for r, share in enumerate(per_round):
        for name in rotation(names, r):
            await burst(modes[name], share, concurrency, tallies[name])
    return tallies


def summarize(title: str, tallies: dict[str, Tally]) -> dict[str, Any]:
    base = tallies[BASELINE]
    rows = []
    out: dict[str, Any] = {}
    for name, t in tallies.items():
        lat = [ns / 1e6 for ns in t.latencies_ns] or [float("nan")]
        ratios = [a / b for a, b in zip(t.round_rates, base.round_rates, strict=True) if b]
        ratio = t.rate / base.rate if base.rate else float("nan")
        cpu_ratio = base.cpu_us / t.cpu_us
        entry = {
            "completed": t.completed,
            "errors": t.errors,
            "first_error": t.first_error,
            "seconds": t.seconds,
            "req_per_s": t.rate,
            "p50_ms": percentile(lat, 50),
            "p95_ms": percentile(lat, 95),
            "round_req_per_s": t.round_rates,
            "ratio": ratio,
            "cpu_us_per_request": t.cpu_us,
            "round_cpu_us_per_request": t.round_cpu_us,
            "cpu_ratio": cpu_ratio,
            "round_ratio_median": percentile(ratios, 50) if ratios else float("nan"),
            "round_ratio_min": min(ratios, default=float("nan")),
            "round_ratio_max": max(ratios, default=float("nan")),
        }
        out[name] = entry
        same = name == BASELINE
        rows.append(
            [
                name,
                t.completed,
                t.errors,
                t.rate,
                entry["p50_ms"],
                entry["p95_ms"],
                "-" if same else f"{ratio:.3f}x",
                "-"
                if same
                else f"{entry['round_ratio_median']:.3f}x "
                f"({entry['round_ratio_min']:.2f}-{entry['round_ratio_max']:.2f})",
                t.cpu_us,
                "-" if same else f"{cpu_ratio:.3f}x",
            ]
        )
    print_table(
        title,
        [
            "mode",
            "done",
            "errors",
            "req/s",
            "p50 ms",
            "p95 ms",
            "ratio",
            "round ratios",
            "cpu us/req",
            "cpu ratio",
        ],
        rows,
    )
    for name, t in tallies.items():
        if t.first_error:
            print(f"  {name}: first error: {t.first_error}")
    return out


def turn_of(pipeline: Pipeline) -> Callable[[], Awaitable[object]]:
    """One ``arun`` turn; a blocked turn counts as an error."""

    async def call() -> object:
        result = await pipeline.arun(Turn.create(PROMPT))
        if not result.ok:
            raise RuntimeError(f"turn blocked: {result.blocked}")
        return result

    return call


async def network_part(target: Target, args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """Part 1: raw ``AsyncOpenAI`` against the pipelines, over the network."""
    import openai

    client = openai.AsyncOpenAI(**raw_client_kwargs(target))
    body = raw_request(target)
    pipelines = build_pipelines(route_for(target))

    async def raw() -> object:
        return await client.chat.completions.create(**body)

    modes: dict[str, Callable[[], Awaitable[object]]] = {
        BASELINE: raw,
        **{name: turn_of(p) for name, p in pipelines.items()},
    }
    results: dict[int, dict[str, Any]] = {}
    try:
        for concurrency in args.concurrency:
            tallies = await run_level(modes, concurrency, args.requests, args.rounds)
            results[concurrency] = summarize(
                f"Part 1: {target.base_url}, concurrency {concurrency}", tallies
            )
    finally:
        await client.close()
        for pipeline in pipelines.values():
            pipeline.close()
    return results


async def in_memory_part(
    args: argparse.Namespace, network: dict[int, dict[str, Any]]
) -> dict[int, dict[str, Any]]:
    """Part 2: the pipelines' ``arun`` on an in-memory provider, against awaiting it directly.

    The CPU each turn adds over the direct call is nimpipe's own async cost;
    set against the raw client's CPU per request from Part 1 it predicts the
    req/s ratio on a CPU-bound client.
    """
    route = in_memory_route()
    canned = canned_response(route)
    pipelines = build_pipelines(route, lambda: CannedProvider(response=canned))
    direct = CannedProvider(response=canned)

    async def provider_call() -> object:
        return await direct.acomplete(route, Turn.create(PROMPT), route.timeout)

    modes: dict[str, Callable[[], Awaitable[object]]] = {
        DIRECT: provider_call,
        **{name: turn_of(p) for name, p in pipelines.items()},
    }
    results: dict[int, dict[str, Any]] = {}
    try:
        for concurrency in args.concurrency:
            tallies = await run_level(modes, concurrency, args.stub_turns, args.rounds)
            raw_cpu_us = network[concurrency][BASELINE]["cpu_us_per_request"]
            results[concurrency] = report_in_memory(concurrency, tallies, raw_cpu_us)
    finally:
        for pipeline in pipelines.values():
            pipeline.close()
    return results


def report_in_memory(
    concurrency: int, tallies: dict[str, Tally], raw_cpu_us: float
) -> dict[str, Any]:
    base = percentile(tallies[DIRECT].round_cpu_us, 50)
    out: dict[str, Any] = {}
    rows = []
    for name, t in tallies.items():
        cpu_us = percentile(t.round_cpu_us, 50)
        added = cpu_us - base
        predicted = raw_cpu_us / (raw_cpu_us + added)
        out[name] = {
            "turns": t.completed,
            "errors": t.errors,
            "cpu_us_per_turn": cpu_us,
            "round_cpu_us_per_turn": t.round_cpu_us,
            "added_cpu_us": added,
            "predicted_ratio": predicted,
        }
        same = name == DIRECT
        rows.append(
            [
                name,
                t.completed,
                t.errors,
                cpu_us,
                "-" if same else added,
                "-" if same else f"{predicted:.3f}x",
            ]
        )
    print_table(
        f"Part 2: in-memory provider, concurrency {concurrency} "
        f"(raw AsyncOpenAI used {raw_cpu_us:,.0f} cpu us/request in Part 1)",
        ["mode", "turns", "errors", "cpu us/turn", "added cpu us", "predicted ratio"],
        rows,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Async throughput of Pipeline.arun against raw AsyncOpenAI.",
        epilog="Read the module docstring (python -m pydoc benchmarks/throughput.py) for the "
        "meaning of each figure.",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[64],
        metavar="N",
        help="requests in flight; several levels may be given (default 64)",
    )
    parser.add_argument(
        "--requests", type=int, default=640, help="requests per caller and level (default 640)"
    )
    parser.add_argument(
        "--stub-turns",
        type=int,
        default=10000,
        help="in-memory turns per caller and level in Part 2 (default 10000)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds the requests are split into (default 5)"
    )
    add_target_arguments(parser, latency=0.02)
    add_json_argument(parser)
    args = parser.parse_args(argv)
    fewest = min(args.requests, args.stub_turns)
    if min(args.concurrency) < 1 or args.rounds < 1 or fewest < args.rounds:
        parser.error("--concurrency must be positive, --requests and --stub-turns >= --rounds")
    if args.requests // args.rounds < max(args.concurrency):
        print(
            f"warning: {args.requests // args.rounds} requests per round never fill "
            f"{max(args.concurrency)} slots; raise --requests or lower --rounds",
            file=sys.stderr,
        )

    print(f"nimpipe {nimpipe.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    with open_target(args) as target:
        if target.server_pid is not None:
            print(
                f"test server pid {target.server_pid} at {target.base_url}, "
                f"{args.latency * 1000:.0f} ms latency per request"
            )
        results = asyncio.run(network_part(target, args))
        described = target.describe()
    in_memory = asyncio.run(in_memory_part(args, results))

    worst = min(level[WITH_HOOKS]["ratio"] for level in results.values())
    worst_cpu = min(level[WITH_HOOKS]["cpu_ratio"] for level in results.values())
    worst_predicted = min(level[WITH_HOOKS]["predicted_ratio"] for level in in_memory.values())
    worst_added = max(level[WITH_HOOKS]["added_cpu_us"] for level in in_memory.values())
    print(
        f"\nSummary: {WITH_HOOKS!r} reaches {worst:.3f}x the raw client's req/s and "
        f"{worst_cpu:.3f}x by CPU time per request at its worst level; its own async cost, "
        f"{worst_added:.0f} cpu us per turn in memory, predicts {worst_predicted:.3f}x "
        f"(target: at least {TARGET_RATIO}x)."
    )
    write_json(
        args.json,
        "throughput",
        {
            "target": described,
            "requests": args.requests,
            "rounds": args.rounds,
            "stub_turns": args.stub_turns,
            "levels": {str(c): r for c, r in results.items()},
            "in_memory": {str(c): r for c, r in in_memory.items()},
            "target_ratio": TARGET_RATIO,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
