"""Async throughput of ``Pipeline.arun`` against raw ``AsyncOpenAI`` at the same concurrency.

What it measures
    For each concurrency level (``--concurrency 64`` by default; several may
    be given), three callers each send ``--requests`` non-streamed chat
    completions (640 by default) with at most that many in flight, bounded by
    a semaphore and launched with ``asyncio.gather``:

    * ``raw AsyncOpenAI``: ``await client.chat.completions.create(...)``;
    * ``pipeline, no-op hooks``: ``await pipeline.arun(Turn.create(...))`` with
      a plugin implementing all six per-turn hooks, each doing nothing;
    * ``pipeline, default``: the same with only the built-in ``default_route``.

    The requests are split into ``--rounds`` rounds; in each round every
    caller sends its share, one caller after the other, the order rotating
    from round to round, so that load changes on the machine hit all of them.
    By default the target is the NIM-shaped test server in a child process
    answering after ``--latency`` seconds (0.02); ``--base-url`` points at a
    real NIM instead.

How to read it
    ``req/s`` is completed requests over the time the caller's rounds took.
    ``ratio`` is a pipeline's req/s over the raw client's (target: at least
    0.9x); ``round ratios`` the same per round, as median and range, which
    shows how much of a difference is noise.  ``p50``/``p95 ms`` are
    per-request latencies, queueing for the semaphore excluded.  On the test
    server the client's CPU, not the server, is the limit, so this is the
    cost of nimpipe's per-turn work once the event loop is saturated.
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
    Target,
    add_json_argument,
    add_target_arguments,
    build_pipelines,
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
from nimpipe import Turn

TARGET_RATIO = 0.9
BASELINE = "raw AsyncOpenAI"


@dataclass
class Tally:
    """What one caller achieved over its rounds."""

    seconds: float = 0.0
    completed: int = 0
    errors: int = 0
    first_error: str | None = None
    latencies_ns: list[int] = field(default_factory=list)
    round_rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


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
    await asyncio.gather(*(one() for _ in range(requests)))
    elapsed = time.perf_counter() - started
    tally.seconds += elapsed
    tally.completed += completed
    tally.round_rates.append(completed / elapsed)


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


def summarize(concurrency: int, tallies: dict[str, Tally]) -> dict[str, Any]:
    base = tallies[BASELINE]
    rows = []
    out: dict[str, Any] = {}
    for name, t in tallies.items():
        lat = [ns / 1e6 for ns in t.latencies_ns] or [float("nan")]
        ratios = [a / b for a, b in zip(t.round_rates, base.round_rates, strict=True) if b]
        ratio = t.rate / base.rate if base.rate else float("nan")
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
            ]
        )
    print_table(
        f"Concurrency {concurrency}",
        ["mode", "done", "errors", "req/s", "p50 ms", "p95 ms", "ratio", "round ratios"],
        rows,
    )
    for name, t in tallies.items():
        if t.first_error:
            print(f"  {name}: first error: {t.first_error}")
    return out


async def run_all(target: Target, args: argparse.Namespace) -> dict[int, dict[str, Any]]:
    import openai

    client = openai.AsyncOpenAI(**raw_client_kwargs(target))
    body = raw_request(target)
    pipelines = build_pipelines(route_for(target))

    async def raw() -> object:
        return await client.chat.completions.create(**body)

    def turn_of(pipeline: nimpipe.Pipeline) -> Callable[[], Awaitable[object]]:
        async def call() -> object:
            result = await pipeline.arun(Turn.create(PROMPT))
            if not result.ok:
                raise RuntimeError(f"turn blocked: {result.blocked}")
            return result

        return call

    modes: dict[str, Callable[[], Awaitable[object]]] = {
        BASELINE: raw,
        **{name: turn_of(p) for name, p in pipelines.items()},
    }
    results: dict[int, dict[str, Any]] = {}
    try:
        for concurrency in args.concurrency:
            tallies = await run_level(modes, concurrency, args.requests, args.rounds)
            results[concurrency] = summarize(concurrency, tallies)
    finally:
        await client.close()
        for pipeline in pipelines.values():
            pipeline.close()
    return results


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
        "--rounds", type=int, default=5, help="rounds the requests are split into (default 5)"
    )
    add_target_arguments(parser, latency=0.02)
    add_json_argument(parser)
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.rounds < 1 or args.requests < args.rounds:
        parser.error("--concurrency must be positive and --requests at least --rounds")

    print(f"nimpipe {nimpipe.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    with open_target(args) as target:
        if target.server_pid is not None:
            print(
                f"test server pid {target.server_pid} at {target.base_url}, "
                f"{args.latency * 1000:.0f} ms latency per request"
            )
        results = asyncio.run(run_all(target, args))
        described = target.describe()

    worst = min(level[WITH_HOOKS]["ratio"] for level in results.values())
    verdict = "meets" if worst >= TARGET_RATIO else "MISSES"
    print(
        f"\nSummary: {WITH_HOOKS!r} reaches {worst:.3f}x the raw client's req/s at its worst "
        f"level; {verdict} the {TARGET_RATIO}x target."
    )
    write_json(
        args.json,
        "throughput",
        {
            "target": described,
            "requests": args.requests,
            "rounds": args.rounds,
            "levels": {str(c): r for c, r in results.items()},
            "target_ratio": TARGET_RATIO,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
