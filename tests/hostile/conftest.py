"""Fixtures of the hostile-server suite, and its summary table.

Every case of the suite runs against :mod:`hostile_server` (one process on
127.0.0.1 for the session) in each of the four modes, and adds a row to the
table printed at the end of the session: outcome, time against the deadline,
peak memory, what was wrong.  ``HOSTILE_REPORT=path.json`` also writes the
rows as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hostile_harness import GRACE, MODES, ROWS, Recorder, run_turn
from hostile_server import HostileServer, new_tag

from nimpipe import Route, Turn

MODEL = "hostile-model"


@pytest.fixture(scope="session")
def hostile() -> Iterator[HostileServer]:
    """The hostile server, warmed up: the SDK, the tokenizer and one turn per mode."""
    from nimpipe.config import Config
    from nimpipe.pipeline import Pipeline
    from nimpipe.tokens import count_tokens

    with HostileServer() as server:
        count_tokens("warm up the tokenizer", MODEL)
        route = Route(name="warm", base_url=server.base_url("ok", "warm-up"), model=MODEL)
        config = Config.from_dict({}, env={}).with_routes(route, default="warm")
        with Pipeline.create(config, entrypoints=False) as pipeline:
            for mode in MODES:
                outcome = run_turn(pipeline, mode, lambda: Turn.create("warm up", timeout=10))
                assert outcome.error is None, outcome.error
        yield server


#: make(scenario, plugins=(), stages=None, stream_policy=None, **route settings)
MakeHostile = Callable[..., tuple[Any, Recorder, str]]


@pytest.fixture
def make_hostile(hostile: HostileServer, make_pipeline: Any) -> MakeHostile:
    """A pipeline with one route, ``hostile``, served by ``scenario`` under a fresh tag."""

    def make(
        scenario: str,
        *,
        plugins: tuple[Any, ...] = (),
        stages: dict[str, Any] | None = None,
        stream_policy: str | None = None,
        **route_settings: Any,
    ) -> tuple[Any, Recorder, str]:
        tag = new_tag()
        recorder = Recorder()
        route = Route(
            name="hostile", base_url=hostile.base_url(scenario, tag), model=MODEL, **route_settings
        )
        settings: dict[str, Any] = {}
        if stages:
            settings["stages"] = stages
        if stream_policy:
            settings["stream_policy"] = stream_policy
        pipeline = make_pipeline(routes=[route], plugins=[recorder, *plugins], **settings)
        return pipeline, recorder, tag

    return make


# --------------------------------------------------------------------------
# The summary table
# --------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("hostile servers: case x mode")
    header = (
        f"{'case':<34} {'mode':<8} {'ok':<4} {'outcome':<26} {'elapsed':>8} "
        f"{'deadline':>8} {'over':>6} {'peakMB':>7} {'rssMB':>6}  problem"
    )
    write(header)
    for row in sorted(ROWS, key=lambda r: (r.case, MODES.index(r.mode) if r.mode in MODES else 9)):
        problem = "; ".join(row.problems)
        write(
            f"{row.case:<34} {row.mode:<8} {'ok' if row.ok else 'FAIL':<4} "
            f"{row.outcome[:26]:<26} {_fmt(row.elapsed):>8} {_fmt(row.deadline, '.1f'):>8} "
            f"{_fmt(row.overshoot):>6} {row.peak_mb:>7.1f} {row.rss_mb:>6.1f}  {problem[:300]}"
        )
    timed = [r for r in ROWS if r.overshoot is not None]
    failed = [r for r in ROWS if not r.ok]
    write(f"{len(ROWS)} rows, {len(failed)} failed")
    if timed:
        finished = [r for r in timed if not r.outcome.startswith("hung")]
        if finished:
            worst_done = max(finished, key=lambda r: r.overshoot or 0.0)
            write(
                f"worst overshoot past the deadline (finished cases): "
                f"{worst_done.overshoot:+.2f} s ({worst_done.case} [{worst_done.mode}])"
            )
        hung = [r for r in timed if r.outcome.startswith("hung")]
        if hung:
            write(f"still running when given up on (bound + {GRACE:.0f} s): {len(hung)} rows")
    heaviest = max(ROWS, key=lambda r: r.peak_mb)
    write(f"peak traced memory: {heaviest.peak_mb:.1f} MB ({heaviest.case} [{heaviest.mode}])")
    largest = max(ROWS, key=lambda r: r.rss_mb)
    write(f"largest RSS growth: {largest.rss_mb:.1f} MB ({largest.case} [{largest.mode}])")
    target = os.environ.get("HOSTILE_REPORT")
    if target:
        with open(target, "w") as f:
            json.dump([dict(vars(r), overshoot=r.overshoot) for r in ROWS], f, indent=1)
