"""What the benchmark scripts share: the target server, sampling, statistics and output.

Every script measures a nimpipe figure against a baseline taken in the same
run, interleaved with it, and reports the ratio: on a small shared machine the
absolute numbers drift from minute to minute, the ratio much less.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from nimpipe import Response, Route, Usage, hookimpl
from nimpipe.provider import OpenAIProvider

if TYPE_CHECKING:
    from nimpipe import (
        Attempt,
        CallRecord,
        Config,
        Output,
        Pipeline,
        ProviderError,
        Turn,
    )

#: The user message every benchmark sends.
PROMPT = "Say hello in five words."

#: The model the NIM-shaped test server serves.
TEST_SERVER_MODEL = "meta/llama-3.1-8b-instruct"

T = TypeVar("T")


# --------------------------------------------------------------------------
# The server under test: the NIM-shaped test server in a child process, or an
# existing OpenAI-compatible endpoint (a real NIM) named on the command line.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The endpoint both the raw client and nimpipe call."""

    base_url: str
    model: str
    api_key: str | None
    api_key_env: str | None
    #: ``max_tokens`` sent with every request (``None``: the server's default).
    max_tokens: int | None
    #: ``test-server`` when this run started it, ``external`` otherwise.
    kind: str
    #: Process id of the test server this run started.
    server_pid: int | None = None

    def describe(self) -> dict[str, Any]:
        """The target as JSON-ready data, without the key."""
        data = asdict(self)
        data["api_key"] = "***" if self.api_key else None
        return data


def add_target_arguments(parser: argparse.ArgumentParser, *, latency: float) -> None:
    """The flags that choose the endpoint: the test server (default) or ``--base-url``."""
    group = parser.add_argument_group(
        "target",
        "By default a NIM-shaped test server is started on 127.0.0.1 in a child process "
        "and stopped at the end; --base-url points at an existing server instead.",
    )
    group.add_argument(
        "--latency",
        type=float,
        default=latency,
        help=f"seconds the test server waits before each reply (default {latency})",
    )
    group.add_argument(
        "--base-url", help="an existing OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
    )
    group.add_argument(
        "--model",
        help=f"model to ask for (default: {TEST_SERVER_MODEL}; required with --base-url)",
    )
    group.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the endpoint's API key (e.g. NVIDIA_API_KEY)",
    )
    group.add_argument(
        "--max-tokens", type=int, help="max_tokens of every request (keeps real models short)"
    )


@contextlib.contextmanager
def open_target(args: argparse.Namespace) -> Iterator[Target]:
    """Yield the endpoint chosen by :func:`add_target_arguments`.

    Starts the test server as a child process when no ``--base-url`` is given
    and stops it (by its process id) on the way out, whatever happened.
    """
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SystemExit(f"${args.api_key_env} is not set")
    if args.base_url:
        if not args.model:
            raise SystemExit("--model is required with --base-url")
        yield Target(
            base_url=args.base_url.rstrip("/"),
            model=args.model,
            api_key=api_key,
            api_key_env=args.api_key_env,
            max_tokens=args.max_tokens,
            kind="external",
        )
        return

    from nimpipe.testing.nim_server import NimServerProcess

    model = args.model or TEST_SERVER_MODEL
    server = NimServerProcess(model=model, latency=args.latency)
    try:
        server.start()
        yield Target(
            base_url=server.base_url,
            model=model,
            api_key=api_key,
            api_key_env=args.api_key_env,
            max_tokens=args.max_tokens,
            kind="test-server",
            server_pid=server.pid,
        )
    finally:
        server.stop()


def raw_request(target: Target) -> dict[str, Any]:
    """The ``chat.completions.create`` keywords the raw-SDK baseline sends.

    The same body nimpipe builds for a one-message turn on :func:`route_for`.
    """
    body: dict[str, Any] = {
        "model": target.model,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    if target.max_tokens is not None:
        body["max_tokens"] = target.max_tokens
    return body


def raw_client_kwargs(target: Target) -> dict[str, Any]:
    """Keywords of ``openai.OpenAI``/``openai.AsyncOpenAI`` for the baseline."""
    return {"base_url": target.base_url, "api_key": target.api_key or "x", "max_retries": 0}


def route_for(target: Target, name: str = "bench") -> Route:
    """The nimpipe route to ``target``; nimpipe's retries are off, so a call fails once, as raw."""
    from nimpipe import Secret

    return Route(
        name=name,
        base_url=target.base_url,
        model=target.model,
        api_key=Secret(target.api_key) if target.api_key else None,
        api_key_env=target.api_key_env,
        max_output_tokens=target.max_tokens,
        max_retries=0,
    )


def config_for(route: Route) -> Config:
    """A config with ``route`` as its only and default route, blind to the environment."""
    from nimpipe import Config

    return Config.from_dict({}, env={}).with_routes(route, default=route.name)


# --------------------------------------------------------------------------
# The pipelines under test
# --------------------------------------------------------------------------


class NoopStage:
    """Implements every per-turn hook, with the full arguments, and does nothing."""

    @hookimpl
    def pre_input(self, turn: Turn, pipeline: Pipeline) -> None:
        return None

    @hookimpl
    def filter_routes(self, turn: Turn, routes: tuple[Route, ...], pipeline: Pipeline) -> None:
        return None

    @hookimpl
    def select_provider(
        self, turn: Turn, routes: tuple[Route, ...], attempt: Attempt, pipeline: Pipeline
    ) -> None:
        return None

    @hookimpl
    def before_call(self, turn: Turn, route: Route, attempt: Attempt, pipeline: Pipeline) -> None:
        return None

    @hookimpl
    def on_response(
        self,
        turn: Turn,
        route: Route,
        response: Response | None,
        error: ProviderError | None,
        attempt: Attempt,
        pipeline: Pipeline,
    ) -> None:
        return None

    @hookimpl
    def post_output(self, turn: Turn, output: Output, pipeline: Pipeline) -> None:
        return None

    @hookimpl
    def record_cost(self, record: CallRecord, turn: Turn, pipeline: Pipeline) -> None:
        return None


#: The hooks :class:`NoopStage` implements, in the order a turn meets them.
NOOP_HOOKS = (
    "pre_input",
    "filter_routes",
    "select_provider",
    "before_call",
    "on_response",
    "post_output",
    "record_cost",
)


@attrs.define
class CannedProvider(OpenAIProvider):
    """A provider that answers every call with one fixed response, from memory.

    Its async call suspends once, as a call on the network would at least.
    """

    response: Response = attrs.field(kw_only=True)

    def complete(self, route: Route, turn: Turn, timeout: float) -> Response:
        return self.response

    async def acomplete(self, route: Route, turn: Turn, timeout: float) -> Response:
        import asyncio

        await asyncio.sleep(0)
        return self.response


def canned_response(route: Route) -> Response:
    """The response :class:`CannedProvider` gives: the test server's reply to :data:`PROMPT`."""
    return Response(
        text=f"NIM reply to: {PROMPT}",
        usage=Usage(prompt_tokens=8, completion_tokens=8, source="server"),
        model=route.model,
        route=route.name,
        id="chatcmpl-canned",
    )


def in_memory_route() -> Route:
    """A route for pipelines on :class:`CannedProvider` (nothing listens at its URL)."""
    return Route(name="bench", base_url="http://127.0.0.1:9/v1", model="bench-model")


#: Names of the two pipeline modes every script compares with its baseline.
WITH_HOOKS = "pipeline, no-op hooks"
DEFAULT = "pipeline, default"


def build_pipelines(
    route: Route, make_provider: Callable[[], OpenAIProvider] | None = None
) -> dict[str, Pipeline]:
    """The pipelines under test, by mode name, each with its own provider.

    :data:`WITH_HOOKS` has :class:`NoopStage` on every per-turn hook;
    :data:`DEFAULT` has only the built-in ``default_route`` stage.  No entry
    points are loaded.  Close them when done.
    """
    from nimpipe import Pipeline

    config = config_for(route)
    plugins: dict[str, list[Any]] = {WITH_HOOKS: [("noop", NoopStage())], DEFAULT: []}
    return {
        name: Pipeline.create(
            config,
            plugins=extra,
            entrypoints=False,
            provider=make_provider() if make_provider is not None else None,
        )
        for name, extra in plugins.items()
    }


# --------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------


def rotation(names: Sequence[T], index: int) -> list[T]:
    """``names`` rotated by ``index``: over ``len(names)`` rounds each takes every position."""
    k = index % len(names) if names else 0
    return [*names[k:], *names[:k]]


@dataclass(frozen=True)
class Samples:
    """Per-call durations in nanoseconds, by mode: wall-clock time and process CPU time.

    CPU time leaves out the time the process waited for the server and the
    time other processes had the CPU, so on a busy machine it is the steadier
    measure of what a mode costs the caller.
    """

    wall: dict[str, list[int]]
    cpu: dict[str, list[int]]


def interleave(modes: Mapping[str, Callable[[], object]], calls: int, warmup: int) -> Samples:
    """Time ``calls`` calls of every mode, one call of each mode per round.

    The order rotates every round (AB, BA, AB, ... for two modes) so that no
    mode always goes first.  ``warmup`` untimed rounds come first.
    """
    names = list(modes)
    for i in range(warmup):
        for name in rotation(names, i):
            modes[name]()
    gc.collect()
    wall: dict[str, list[int]] = {name: [] for name in names}
    cpu: dict[str, list[int]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    cpu_clock = time.process_time_ns
    for i in range(calls):
        for name in rotation(names, i):
            call = modes[name]
            start = clock()
            cpu_start = cpu_clock()
            call()
            cpu_end = cpu_clock()
            end = clock()
            wall[name].append(end - start)
            cpu[name].append(cpu_end - cpu_start)
    return Samples(wall, cpu)


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    """Summary of one mode's per-call durations, in microseconds."""

    n: int
    median_us: float
    p95_us: float
    mean_us: float
    min_us: float

    @classmethod
    def of_ns(cls, samples: Sequence[int]) -> Stats:
        us = [s / 1000 for s in samples]
        return cls(
            n=len(us),
            median_us=percentile(us, 50),
            p95_us=percentile(us, 95),
            mean_us=sum(us) / len(us),
            min_us=min(us),
        )


def paired_median_us(samples: Sequence[int], baseline: Sequence[int]) -> float:
    """Median of the call-by-call differences ``samples[i] - baseline[i]``, in us.

    Neighbouring calls see the same machine load, so this is steadier than
    the difference of the two medians when the load drifts.
    """
    return percentile([(a - b) / 1000 for a, b in zip(samples, baseline, strict=True)], 50)


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        first, *rest = values
        return "  ".join(
            [first.ljust(widths[0]), *(v.rjust(w) for v, w in zip(rest, widths[1:], strict=True))]
        )

    print(f"\n{title}")
    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for package in ("nimpipe", "openai", "httpx", "httpx2", "pluggy", "attrs"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": versions,
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="also write the results as JSON to PATH; a PATH ending in '/' or naming a "
        "directory gets BENCHMARK.json inside it",
    )


def write_json(path: str | None, benchmark: str, results: Mapping[str, Any]) -> None:
    """Write ``results`` with the environment to ``path`` (nothing when ``path`` is None).

    A directory (or a path ending in ``/``) receives ``<benchmark>.json``, so
    that one ``--json DIR/`` serves every script.
    """
    if not path:
        return
    payload = {"benchmark": benchmark, "environment": environment(), "results": results}
    out = Path(path)
    if path.endswith(("/", os.sep)) or out.is_dir():
        out = out / f"{benchmark}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")
