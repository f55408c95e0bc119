"""Health probes of many endpoints: all at once against the slowest one alone.

What it measures
    ``--endpoints`` NIM-shaped test servers (10 by default), each in its own
    child process on 127.0.0.1, answer every request after a delay of their
    own, spread evenly from ``--min-latency`` to ``--max-latency`` seconds
    (0.02 to 0.2).  A probe of one endpoint sends its four requests
    (``/v1/health/live``, ``/v1/health/ready``, ``/v1/models``,
    ``/v1/metrics``) concurrently and reads the replies.  Each round times,
    in rotating order after one untimed warm-up round:

    * ``single, slowest``: the ``nim_health`` stage's prober
      (:meth:`HealthMonitor.probe`: every request on a thread of a pool, all
      on one sync ``httpx.Client``) probing the slowest endpoint alone;
    * ``all, stage (threads)``: the same prober probing every endpoint at
      once, the way the stage's background thread and ``nimpipe status`` do;
    * ``all, asyncio``: the alternative design, for comparison: one asyncio
      loop with one ``httpx.AsyncClient`` sending every request with
      ``asyncio.gather``, reading the replies with the same code.

    ``--rounds`` rounds (15 by default).

How to read it
    ``ratio`` is a mode's median over the median of ``single, slowest``: the
    target is at most 1.5x, which says that probing N endpoints costs about
    as much as probing the slowest of them, not the sum.  ``p95 ms`` shows the
    spread.  The asyncio figure tells whether the stage's thread-pool
    design is the better of the two on this machine (it was: ``httpx``'s
    async client costs several milliseconds of CPU per request here, and on
    one loop those add up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from _common import add_json_argument, percentile, print_table, rotation, write_json

import nimpipe

#: The ratio the concurrent probe must stay under.
TARGET_RATIO = 1.5

SINGLE = "single, slowest"
STAGE_ALL = "all, stage (threads)"
ASYNC_ALL = "all, asyncio"


def latencies(count: int, low: float, high: float) -> list[float]:
    """``count`` delays spread evenly from ``low`` to ``high`` seconds."""
    if count == 1:
        return [high]
    step = (high - low) / (count - 1)
    return [round(low + i * step, 4) for i in range(count)]


def asyncio_prober(
    endpoints: Sequence[Any], timeout: float
) -> tuple[Callable[[], list[Any]], Callable[[], None]]:
    """The alternative design: one event loop, one ``httpx.AsyncClient``, ``asyncio.gather``."""
    import asyncio

    import httpx

    from nimpipe_contrib.nim.probes import Reply, interpret_probe

    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=200))
    paths = ("/health/live", "/health/ready", "/models", "/metrics")

    async def fetch(url: str) -> Reply:
        try:
            response = await client.get(url)
        except Exception as exc:
            return Reply(url=url, error=f"{type(exc).__name__}: {exc}")
        return Reply(
            url=url,
            status=response.status_code,
            body=response.content,
            content_type=response.headers.get("content-type", ""),
        )

    async def one(endpoint: Any) -> Any:
        started = time.perf_counter()
        live, ready, models, metrics = await asyncio.gather(
            *(fetch(endpoint.url + p) for p in paths)
        )
        latency = time.perf_counter() - started
        return interpret_probe(endpoint.url, live, ready, models, metrics, latency=latency)

    async def everything() -> list[Any]:
        return list(await asyncio.gather(*(one(e) for e in endpoints)))

    def probe() -> list[Any]:
        return loop.run_until_complete(everything())

    def close() -> None:
        loop.run_until_complete(client.aclose())
        loop.close()

    return probe, close


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Probing N endpoints at once against probing the slowest one alone.",
        epilog="Read the module docstring (python -m pydoc benchmarks/probe.py) for the "
        "meaning of each figure.",
    )
    parser.add_argument("--endpoints", type=int, default=10, help="test servers (default 10)")
    parser.add_argument(
        "--min-latency", type=float, default=0.02, help="fastest server's delay, s (default 0.02)"
    )
    parser.add_argument(
        "--max-latency", type=float, default=0.2, help="slowest server's delay, s (default 0.2)"
    )
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="probe request timeout, s (default 5)"
    )
    add_json_argument(parser)
    args = parser.parse_args(argv)
    if args.endpoints < 1 or args.rounds < 1 or not 0 <= args.min_latency <= args.max_latency:
        parser.error("need --endpoints >= 1, --rounds >= 1 and 0 <= --min-latency <= --max-latency")

    from nimpipe.testing.nim_server import NimServerProcess
    from nimpipe_contrib.nim.endpoints import Endpoint
    from nimpipe_contrib.nim.health_settings import HealthSettings
    from nimpipe_contrib.nim.monitor import HealthMonitor
    from nimpipe_contrib.nim.registry import HealthState

    delays = latencies(args.endpoints, args.min_latency, args.max_latency)
    print(f"nimpipe {nimpipe.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    print(
        f"{args.endpoints} test servers, delays {delays[0] * 1000:.0f}-{delays[-1] * 1000:.0f} ms"
    )
    servers: list[NimServerProcess] = []
    monitor = None
    close_async: Callable[[], None] | None = None
    try:
        for delay in delays:
            server = NimServerProcess().start()
            servers.append(server)
            server.inject("delay", count=None, path=None, seconds=delay)
        endpoints = [Endpoint(url=s.base_url, local=True) for s in servers]
        slowest = endpoints[-1]
        monitor = HealthMonitor(
            settings=HealthSettings(timeout=args.timeout), endpoints=lambda: endpoints
        )
        async_probe, close_async = asyncio_prober(endpoints, args.timeout)
        modes: dict[str, Callable[[], list[Any]]] = {
            SINGLE: lambda: monitor.probe([slowest]),  # type: ignore[union-attr]
            STAGE_ALL: lambda: monitor.probe(endpoints),  # type: ignore[union-attr]
            ASYNC_ALL: async_probe,
        }
        for name, probe in modes.items():
            states = {h.state for h in probe()}
            if states != {HealthState.READY}:
                raise SystemExit(f"{name}: warm-up probe saw {states}, expected ready")
        samples: dict[str, list[float]] = {name: [] for name in modes}
        names = list(modes)
        for index in range(args.rounds):
            for name in rotation(names, index):
                started = time.perf_counter()
                modes[name]()
                samples[name].append(time.perf_counter() - started)
    finally:
        if monitor is not None:
            monitor.close()
        if close_async is not None:
            close_async()
        for server in servers:
            server.stop()

    baseline = statistics.median(samples[SINGLE])
    rows = []
    results: dict[str, Any] = {}
    for name, values in samples.items():
        median = statistics.median(values)
        results[name] = {
            "median_ms": median * 1000,
            "p95_ms": percentile(values, 95) * 1000,
            "min_ms": min(values) * 1000,
            "ratio": median / baseline,
            "samples_ms": [v * 1000 for v in values],
        }
        rows.append((name, median * 1000, results[name]["p95_ms"], median / baseline))
    print_table(
        f"Probe time, {args.rounds} rounds (slowest server alone = 1.0x)",
        ("mode", "median ms", "p95 ms", "ratio"),
        rows,
    )
    ratio = results[STAGE_ALL]["ratio"]
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(
        f"\nSummary: probing {args.endpoints} endpoints at once takes {ratio:.2f}x the slowest "
        f"single probe with the stage's prober ({verdict} the {TARGET_RATIO}x target); "
        f"an asyncio loop with httpx.AsyncClient takes {results[ASYNC_ALL]['ratio']:.2f}x."
    )
    write_json(
        args.json,
        "probe",
        {
            "endpoints": args.endpoints,
            "delays_s": delays,
            "rounds": args.rounds,
            "modes": results,
            "target_ratio": TARGET_RATIO,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
