"""Fan-out on a real model: ``Pipeline.amap`` against raw ``AsyncOpenAI`` with ``asyncio.gather``.

What it measures
    By default the target is the embedded model (``nimpipe.embedded``:
    SmolLM2-135M-Instruct served by llama-cpp-python's OpenAI-compatible
    server, started on 127.0.0.1 in a child process and stopped by its process
    id at the end); ``--base-url`` points at a running server instead, such as
    a NIM on a GPU, and then nothing is started.

    Every request is the same non-streamed chat completion shape: one short
    user message from a fixed list of eight, ``max_tokens`` 16
    (``--max-tokens``) and ``temperature`` 0, so that each answer is cut at
    the same length and every request does about the same work.  Both callers
    send the same prompts in the same order, the body nimpipe builds being the
    one the raw client sends.

    For each concurrency level (``--levels``, default 1 4 16 64), two callers
    each run a batch of ``--turns`` requests (16), or as many as the level
    when that is larger (so 64 at level 64, every slot used), with at most
    that many in flight:

    * ``nimpipe amap``: ``await pipeline.amap(turns, concurrency=N)`` on a
      pipeline with only its built-in stages;
    * ``raw AsyncOpenAI gather``: ``client.chat.completions.create`` under an
      ``asyncio.Semaphore(N)``, launched with ``asyncio.gather``, the
      structure ``amap`` has inside.

    The sequential baseline is a plain loop of ``--turns`` blocking calls:
    ``pipeline.run`` against ``openai.OpenAI``.  A round runs every cell (the
    sequential baseline and each level; every other round in reverse order),
    both callers in each, which caller goes first alternating from cell to
    cell and from round to round, so that load drifting on the machine hits
    both callers and all cells alike.  There are ``--rounds`` rounds (2),
    after an untimed warm-up of two requests per caller, sequential and
    concurrent.  On the embedded model a request takes 0.35-0.5 s here at
    best, and the default run (512 requests) just under five minutes.

How to read it
    ``req/s`` is completed requests over the time the caller's batches took;
    ``tok/s`` is output tokens (``completion_tokens`` of the usage the server
    returns) over the same time; ``tok/req`` their mean per request, which
    shows whether answers ran to ``max_tokens``.  ``p50 ms``/``p95 ms`` are
    per-request latencies from the moment a request was admitted (past the
    semaphore) until its result was ready; for ``amap`` they are taken with
    its own ``throttle`` and ``progress`` callbacks, which run in each turn's
    task, so no plugin is added to the pipeline.  ``cpu ms/req`` is this
    process's CPU time per request: the client's cost, the server's left out.

    ``vs raw`` is nimpipe's req/s over the raw caller's at the same level
    (target: at least 0.9x); ``round ratios`` the same per round, median and
    range, which shows how much of a difference is noise.  ``vs sequential``
    is a caller's req/s over its own sequential loop's: ``amap`` over
    ``pipeline.run``, raw ``AsyncOpenAI`` over raw ``OpenAI``.

    llama-cpp-python's server decodes one request at a time (no continuous
    batching): concurrent requests queue in the server, so req/s stays near
    the sequential figure at every level while latency grows with the queue.
    What concurrency buys there is only the overlap of client work and
    network round trips with the server's decoding.  A NIM on a GPU batches
    concurrent requests, so there req/s and tok/s should grow with
    concurrency until the GPU is saturated; give it ``--turns`` well above
    the highest level (128 or 256), since a batch only as large as its level
    is one burst.

Against a GPU NIM
    ``python benchmarks/fanout.py --base-url http://HOST:8000/v1 --model
    meta/llama-3.1-8b-instruct [--api-key-env NVIDIA_API_KEY]``; the key is
    read from that variable, never from the command line, and never written
    to the JSON.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import attrs
from _common import (
    Target,
    add_json_argument,
    config_for,
    open_target,
    percentile,
    print_table,
    raw_client_kwargs,
    rotation,
    route_for,
    write_json,
)

import nimpipe
from nimpipe import NimpipeError, Pipeline, Turn, TurnResult

TARGET_RATIO = 0.9

#: Context window of the embedded llama.cpp server.
N_CTX = 2048

#: The user messages, used in this order and cycled.  Each asks for more than
#: 16 tokens, so that at the default ``max_tokens`` every answer is cut at the
#: same length.
PROMPTS = (
    "Describe the sea in a few sentences.",
    "Explain what a CPU does.",
    "Tell me a short story about a cat.",
    "Describe a sunny day in the park.",
    "What is photosynthesis?",
    "Give advice for a first job interview.",
    "Describe how to make a cup of tea.",
    "Explain why the sky is blue.",
)

#: The two callers compared in every cell.
NIMPIPE = "nimpipe"
RAW = "raw"
CALLERS = (NIMPIPE, RAW)

#: The cell of the sequential baseline (concurrency levels are the other cells).
SEQUENTIAL = "sequential"

LABELS = {
    (SEQUENTIAL, NIMPIPE): "pipeline.run loop",
    (SEQUENTIAL, RAW): "raw OpenAI loop",
    ("fan-out", NIMPIPE): "nimpipe amap",
    ("fan-out", RAW): "raw AsyncOpenAI gather",
}


def label(cell: str, caller: str) -> str:
    return LABELS[(SEQUENTIAL if cell == SEQUENTIAL else "fan-out", caller)]


# --------------------------------------------------------------------------
# Outcomes and tallies
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One caller's run of one batch of requests."""

    seconds: float
    cpu_seconds: float
    completed: int
    errors: int
    #: Output tokens the server reported, summed over the completed requests.
    output_tokens: int
    #: Completed requests whose reply carried no usage.
    without_usage: int
    latencies: list[float]
    first_error: str | None

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @classmethod
    def of(
        cls, outcomes: Sequence[object], seconds: float, cpu_seconds: float, latencies: list[float]
    ) -> Batch:
        completed = errors = tokens = without_usage = 0
        first_error = None
        for outcome in outcomes:
            failure = failure_of(outcome)
            if failure is not None:
                errors += 1
                first_error = first_error or failure
                continue
            completed += 1
            count = output_tokens(outcome)
            if count is None:
                without_usage += 1
            else:
                tokens += count
        return cls(
            seconds=seconds,
            cpu_seconds=cpu_seconds,
            completed=completed,
            errors=errors,
            output_tokens=tokens,
            without_usage=without_usage,
            latencies=latencies,
            first_error=first_error,
        )


def failure_of(outcome: object) -> str | None:
    """Why a request failed (an exception, or a blocked turn), or ``None`` when it did not."""
    if isinstance(outcome, BaseException):
        return f"{type(outcome).__name__}: {outcome}"
    if isinstance(outcome, TurnResult) and not outcome.ok:
        return f"turn blocked: {outcome.blocked}"
    return None


def output_tokens(outcome: object) -> int | None:
    """The completion tokens the server reported for one call; ``None`` when it reported none."""
    if isinstance(outcome, TurnResult):
        response = outcome.response
        if response is None or response.usage.source != "server":
            return None
        return int(response.usage.completion_tokens)
    usage = getattr(outcome, "usage", None)
    return None if usage is None else int(usage.completion_tokens)


@dataclass
class Tally:
    """What one caller achieved in one cell over all rounds."""

    batches: list[Batch] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(b.seconds for b in self.batches)

    @property
    def completed(self) -> int:
        return sum(b.completed for b in self.batches)

    @property
    def errors(self) -> int:
        return sum(b.errors for b in self.batches)

    @property
    def output_tokens(self) -> int:
        return sum(b.output_tokens for b in self.batches)

    @property
    def without_usage(self) -> int:
        return sum(b.without_usage for b in self.batches)

    @property
    def first_error(self) -> str | None:
        return next((b.first_error for b in self.batches if b.first_error), None)

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def token_rate(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_request(self) -> float:
        counted = self.completed - self.without_usage
        return self.output_tokens / counted if counted else float("nan")

    @property
    def cpu_ms(self) -> float:
        """This process's CPU time per completed request, in milliseconds."""
        cpu = sum(b.cpu_seconds for b in self.batches)
        return cpu / self.completed * 1000 if self.completed else float("nan")

    def latency_ms(self, q: float) -> float:
        values = [s * 1000 for b in self.batches for s in b.latencies]
        return percentile(values, q) if values else float("nan")


# --------------------------------------------------------------------------
# The callers
# --------------------------------------------------------------------------


def timed(
    run: Callable[[list[float]], Sequence[object]],
) -> Batch:
    """Run a blocking batch and time it; ``run`` appends per-request latencies to its list."""
    latencies: list[float] = []
    cpu_started = time.process_time()
    started = time.perf_counter()
    outcomes = run(latencies)
    seconds = time.perf_counter() - started
    return Batch.of(outcomes, seconds, time.process_time() - cpu_started, latencies)


async def atimed(
    run: Callable[[list[float]], Awaitable[Sequence[object]]],
) -> Batch:
    """Run a batch on the event loop and time it; as :func:`timed`."""
    latencies: list[float] = []
    cpu_started = time.process_time()
    started = time.perf_counter()
    outcomes = await run(latencies)
    seconds = time.perf_counter() - started
    return Batch.of(outcomes, seconds, time.process_time() - cpu_started, latencies)


def pipeline_loop(
    pipeline: Pipeline, turns: Sequence[Turn], latencies: list[float]
) -> list[object]:
    """The sequential baseline through nimpipe: ``pipeline.run`` per turn."""
    clock = time.perf_counter
    outcomes: list[object] = []
    for turn in turns:
        start = clock()
        try:
            outcomes.append(pipeline.run(turn))
        except NimpipeError as exc:
            outcomes.append(exc)
        latencies.append(clock() - start)
    return outcomes


def raw_loop(client: Any, bodies: Sequence[dict[str, Any]], latencies: list[float]) -> list[object]:
    """The sequential baseline with the SDK: ``chat.completions.create`` per request."""
    clock = time.perf_counter
    outcomes: list[object] = []
    for body in bodies:
        start = clock()
        try:
            outcomes.append(client.chat.completions.create(**body))
        except Exception as exc:
            outcomes.append(exc)
        latencies.append(clock() - start)
    return outcomes


async def pipeline_fanout(
    pipeline: Pipeline, turns: Sequence[Turn], concurrency: int, latencies: list[float]
) -> list[object]:
    """``pipeline.amap``; latencies from each turn's admission to its result.

    ``amap`` calls ``throttle`` once a turn is past its semaphore and
    ``progress`` once the turn is done, both in the turn's own task, which
    pairs the two timestamps.
    """
    clock = time.perf_counter
    admitted: dict[asyncio.Task[Any] | None, float] = {}

    def admit() -> float:
        admitted[asyncio.current_task()] = clock()
        return 0.0

    def finished(done: int, total: int) -> None:
        start = admitted.pop(asyncio.current_task(), None)
        if start is not None:
            latencies.append(clock() - start)

    return list(
        await pipeline.amap(turns, concurrency=concurrency, throttle=admit, progress=finished)
    )


async def raw_fanout(
    client: Any, bodies: Sequence[dict[str, Any]], concurrency: int, latencies: list[float]
) -> list[object]:
    """Raw ``AsyncOpenAI``: a semaphore and ``asyncio.gather``, results in order."""
    clock = time.perf_counter
    gate = asyncio.Semaphore(concurrency)
    outcomes: list[object] = [None] * len(bodies)

    async def one(index: int, body: dict[str, Any]) -> None:
        async with gate:
            start = clock()
            try:
                outcomes[index] = await client.chat.completions.create(**body)
            except Exception as exc:
                outcomes[index] = exc
            latencies.append(clock() - start)

    await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))
    return outcomes


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@contextlib.contextmanager
def event_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop for the async cells; the sync cells run between its runs, outside it.

    On the way out it shuts down async generators, which closes the clients
    nimpipe opened on it, as :func:`asyncio.run` would.
    """
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


@contextlib.contextmanager
def open_model(args: argparse.Namespace) -> Iterator[Target]:
    """The endpoint: ``--base-url`` as it is, else the embedded llama.cpp server.

    The embedded server is started here and stopped (by its process id) on
    the way out, whatever happened.
    """
    if args.base_url:
        with open_target(args) as target:
            yield target
        return

    from nimpipe.embedded import EmbeddedModel

    model = EmbeddedModel()
    if not model.is_installed():
        raise SystemExit(
            "the embedded llama.cpp server is not installed: run "
            "`python -m nimpipe.embedded install` (a one-time build), or pass --base-url"
        )
    with model.start(n_ctx=N_CTX) as server:
        yield Target(
            base_url=server.base_url,
            model=server.model,
            api_key=None,
            api_key_env=None,
            max_tokens=args.max_tokens,
            kind="llama.cpp",
            server_pid=server.pid,
        )


def request_params(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling parameters of every request, from both callers."""
    return {"max_tokens": args.max_tokens, "temperature": 0}


def prompts_for(count: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(count)]


def measure(target: Target, args: argparse.Namespace) -> dict[str, dict[str, Tally]]:
    """Every round of every cell; returns the tallies by cell and caller."""
    import openai

    route = attrs.evolve(route_for(target), timeout=args.timeout)
    pipeline = Pipeline.create(config_for(route), entrypoints=False)
    client_kwargs = {**raw_client_kwargs(target), "timeout": args.timeout}
    sync_client = openai.OpenAI(**client_kwargs)
    params = request_params(args)

    def batch_size(cell: str) -> int:
        per_cell: int = args.turns
        return per_cell if cell == SEQUENTIAL else max(per_cell, int(cell))

    def turns(count: int) -> list[Turn]:
        return [Turn.create(p, params=dict(params)) for p in prompts_for(count)]

    def bodies(count: int) -> list[dict[str, Any]]:
        return [
            {"model": target.model, "messages": [{"role": "user", "content": p}], **params}
            for p in prompts_for(count)
        ]

    cells = [SEQUENTIAL, *(str(level) for level in args.levels)]
    tallies = {cell: {caller: Tally() for caller in CALLERS} for cell in cells}
    try:
        with event_loop() as loop:
            async_client = openai.AsyncOpenAI(**client_kwargs)

            def run_batch(cell: str, caller: str, count: int) -> Batch:
                if cell == SEQUENTIAL:
                    if caller == NIMPIPE:
                        work = turns(count)
                        return timed(lambda lat: pipeline_loop(pipeline, work, lat))
                    payloads = bodies(count)
                    return timed(lambda lat: raw_loop(sync_client, payloads, lat))
                level = int(cell)
                if caller == NIMPIPE:
                    work = turns(count)
                    return loop.run_until_complete(
                        atimed(lambda lat: pipeline_fanout(pipeline, work, level, lat))
                    )
                payloads = bodies(count)
                return loop.run_until_complete(
                    atimed(lambda lat: raw_fanout(async_client, payloads, level, lat))
                )

            try:
                for cell in (SEQUENTIAL, str(max(args.levels))):
                    for caller in CALLERS:
                        warm = run_batch(cell, caller, 2)
                        if warm.errors:
                            raise SystemExit(
                                f"warm-up failed ({label(cell, caller)}): {warm.first_error}"
                            )
                for r in range(args.rounds):
                    order = list(enumerate(cells))
                    for c, cell in order if r % 2 == 0 else order[::-1]:
                        for caller in rotation(CALLERS, r + c):
                            batch = run_batch(cell, caller, batch_size(cell))
                            tallies[cell][caller].batches.append(batch)
                            where = "sequential" if cell == SEQUENTIAL else f"concurrency {cell}"
                            print(
                                f"  round {r + 1}/{args.rounds}, {where}, {label(cell, caller)}: "
                                f"{batch.completed} done, {batch.errors} failed in "
                                f"{batch.seconds:.1f} s, {batch.rate:.2f} req/s",
                                flush=True,
                            )
            finally:
                loop.run_until_complete(async_client.close())
    finally:
        pipeline.close()
        sync_client.close()
    return tallies


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def ratio_text(value: float) -> str:
    return "-" if value != value else f"{value:.3f}x"


def report_cell(
    cell: str, tallies: dict[str, Tally], sequential: dict[str, Tally], args: argparse.Namespace
) -> dict[str, Any]:
    """Print one cell's table; return its figures."""
    nim, raw = tallies[NIMPIPE], tallies[RAW]
    round_ratios = [
        a.rate / b.rate for a, b in zip(nim.batches, raw.batches, strict=True) if b.rate
    ]
    ratio = nim.rate / raw.rate if raw.rate else float("nan")
    out: dict[str, Any] = {
        "ratio": ratio,
        "round_ratios": round_ratios,
        "round_ratio_median": percentile(round_ratios, 50) if round_ratios else float("nan"),
        "round_ratio_min": min(round_ratios, default=float("nan")),
        "round_ratio_max": max(round_ratios, default=float("nan")),
    }
    rows = []
    for caller in CALLERS:
        t = tallies[caller]
        base = sequential[caller].rate
        speedup = t.rate / base if base and cell != SEQUENTIAL else float("nan")
        out[caller] = {
            "label": label(cell, caller),
            "completed": t.completed,
            "errors": t.errors,
            "first_error": t.first_error,
            "seconds": t.seconds,
            "req_per_s": t.rate,
            "output_tokens": t.output_tokens,
            "without_usage": t.without_usage,
            "output_tok_per_s": t.token_rate,
            "output_tokens_per_request": t.tokens_per_request,
            "p50_ms": t.latency_ms(50),
            "p95_ms": t.latency_ms(95),
            "cpu_ms_per_request": t.cpu_ms,
            "round_req_per_s": [b.rate for b in t.batches],
            "speedup_vs_sequential": speedup,
        }
        is_nimpipe = caller == NIMPIPE
        rows.append(
            [
                label(cell, caller),
                t.completed,
                t.errors,
                t.rate,
                t.token_rate,
                t.tokens_per_request,
                out[caller]["p50_ms"],
                out[caller]["p95_ms"],
                t.cpu_ms,
                ratio_text(ratio) if is_nimpipe else "-",
                f"{out['round_ratio_median']:.3f}x "
                f"({out['round_ratio_min']:.2f}-{out['round_ratio_max']:.2f})"
                if is_nimpipe and round_ratios
                else "-",
                ratio_text(speedup),
            ]
        )
    if cell == SEQUENTIAL:
        title = f"Sequential: a loop of {args.turns} blocking calls per round"
    else:
        title = f"Concurrency {cell}: {max(args.turns, int(cell))} turns per round"
    print_table(
        f"{title}, {args.rounds} rounds",
        [
            "caller",
            "done",
            "errors",
            "req/s",
            "tok/s",
            "tok/req",
            "p50 ms",
            "p95 ms",
            "cpu ms/req",
            "vs raw",
            "round ratios",
            "vs sequential",
        ],
        rows,
    )
    for caller in CALLERS:
        t = tallies[caller]
        if t.first_error:
            print(f"  {label(cell, caller)}: first error: {t.first_error}")
        if t.without_usage:
            print(f"  {label(cell, caller)}: {t.without_usage} replies carried no usage")
    return out


def report_overview(results: dict[str, dict[str, Any]]) -> None:
    rows = []
    for cell, figures in results.items():
        nim, raw = figures[NIMPIPE], figures[RAW]
        rows.append(
            [
                cell,
                nim["req_per_s"],
                raw["req_per_s"],
                nim["output_tok_per_s"],
                raw["output_tok_per_s"],
                ratio_text(figures["ratio"]),
                ratio_text(nim["speedup_vs_sequential"]),
                ratio_text(raw["speedup_vs_sequential"]),
            ]
        )
    print_table(
        "Overview (vs sequential: amap over the pipeline.run loop, raw gather over the raw loop)",
        [
            "concurrency",
            "nimpipe req/s",
            "raw req/s",
            "nimpipe tok/s",
            "raw tok/s",
            "nimpipe/raw",
            "nimpipe vs seq",
            "raw vs seq",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fan-out on a real model: Pipeline.amap against raw AsyncOpenAI with "
        "asyncio.gather, and both against a sequential loop.",
        epilog="Read the module docstring (python -m pydoc benchmarks/fanout.py) for the "
        "meaning of each figure.",
    )
    parser.add_argument(
        "--levels",
        type=int,
        nargs="+",
        default=[1, 4, 16, 64],
        metavar="N",
        help="concurrency levels (default 1 4 16 64)",
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=16,
        help="requests per caller, cell and round; a higher level sends as many as the level "
        "(default 16)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds a request may take, queueing in the server included (default 600)",
    )
    group = parser.add_argument_group(
        "target",
        "By default the embedded llama.cpp server (SmolLM2-135M) is started on 127.0.0.1 "
        "and stopped at the end; --base-url points at an existing server, e.g. a NIM.",
    )
    group.add_argument(
        "--base-url", help="an existing OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
    )
    group.add_argument("--model", help="model to ask for (required with --base-url)")
    group.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the endpoint's API key (e.g. NVIDIA_API_KEY)",
    )
    group.add_argument(
        "--max-tokens", type=int, default=16, help="max_tokens of every request (default 16)"
    )
    add_json_argument(parser)
    args = parser.parse_args(argv)
    if min(args.levels) < 1 or min(args.turns, args.rounds) < 1:
        parser.error("--levels, --turns and --rounds must be positive")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be positive")
    if not args.base_url and (args.model or args.api_key_env):
        parser.error("--model and --api-key-env go with --base-url")
    args.levels = sorted(set(args.levels))

    print(f"nimpipe {nimpipe.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    with open_model(args) as target:
        if target.server_pid is not None:
            print(f"llama.cpp server pid {target.server_pid} at {target.base_url}")
        else:
            print(f"endpoint {target.base_url}")
        print(
            f"model {target.model}, max_tokens {args.max_tokens}, temperature 0, "
            f"levels {' '.join(map(str, args.levels))}, {args.turns} turns per cell "
            f"(or the level), {args.rounds} rounds",
            flush=True,
        )
        started = time.perf_counter()
        tallies = measure(target, args)
        elapsed = time.perf_counter() - started
        described = target.describe()

    sequential = tallies[SEQUENTIAL]
    results = {cell: report_cell(cell, t, sequential, args) for cell, t in tallies.items()}
    report_overview(results)

    levels = {cell: r for cell, r in results.items() if cell != SEQUENTIAL}
    worst_cell = min(levels, key=lambda c: levels[c]["ratio"])
    speedups = ", ".join(
        f"{cell}: {r[NIMPIPE]['speedup_vs_sequential']:.2f}x" for cell, r in levels.items()
    )
    failed = sum(r[c]["errors"] for r in results.values() for c in CALLERS)
    print(
        f"\nSummary: nimpipe amap reaches {levels[worst_cell]['ratio']:.3f}x the req/s of raw "
        f"AsyncOpenAI with asyncio.gather at its worst level (concurrency {worst_cell}; "
        f"target: at least {TARGET_RATIO}x); its speed-up over the pipeline.run loop by "
        f"concurrency: {speedups}; {failed} requests failed; measured in {elapsed:.0f} s."
    )
    write_json(
        args.json,
        "fanout",
        {
            "target": described,
            "levels": args.levels,
            "turns": args.turns,
            "rounds": args.rounds,
            "request_params": request_params(args),
            "prompts": list(PROMPTS),
            "cells": results,
            "target_ratio": TARGET_RATIO,
            "seconds": elapsed,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
