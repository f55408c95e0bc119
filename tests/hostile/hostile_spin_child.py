"""One turn with a deferred input check that passes before the first token, in its own process.

A spinning event loop cannot be stopped from inside its process, so each of
these turns runs in a process of its own.  To start them in milliseconds, this
module runs as a *zygote*: ``python hostile_spin_child.py [--warm-tokenizer]``
imports nimpipe once, prints ``ready``, then reads one JSON spec per line on
stdin and forks a child for each, answering ``{"pid": n}``.  ``--warm-tokenizer``
also loads the local tokenizer first, as a long-running process has it; without
it the children count tokens cold.

A spec holds ``mode``, ``warm_url`` and ``slow_url`` (routes), ``deadline``
(seconds or null), ``cancel_after`` (seconds or null), ``check_delay`` (seconds,
or null for no deferred check) and ``events`` (a file).  The child appends one
JSON line per event to ``events``: ``warm`` after a warm-up turn, ``start``
just before the measured turn, ``end`` with how it ended, its wall and CPU
time and its peak traced memory.  A turn that spins never writes ``end``: the
test measures the child's CPU time from ``/proc`` and kills it by its pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import time
import tracemalloc
from typing import Any

from hostile_harness import run_turn, tail

from nimpipe import CancelToken, Deferred, NimpipeError, Route, Turn, hookimpl
from nimpipe.config import Config
from nimpipe.pipeline import Pipeline


class PassingCheck:
    """An input check that runs beside the call and passes after ``delay`` seconds.

    It checks the measured turn only (route ``slow``): the warm-up turn must
    reach its end whatever the check does to a turn.
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay

    @hookimpl
    def pre_input(self, turn: Turn) -> Deferred | None:
        if turn.route != "slow":
            return None

        async def check() -> None:
            await asyncio.sleep(self.delay)

        return Deferred(check=check, name="passing check")


def run_case(spec: dict[str, Any]) -> None:
    """The child: a warm-up turn, then the measured turn; events go to ``spec["events"]``."""

    def emit(**event: Any) -> None:
        with open(spec["events"], "a") as f:
            f.write(json.dumps(event) + "\n")

    mode = spec["mode"]
    routes = [
        Route(name="warm", base_url=spec["warm_url"], model="hostile-model"),
        Route(name="slow", base_url=spec["slow_url"], model="hostile-model"),
    ]
    config = Config.from_dict({}, env={}).with_routes(*routes, default="warm")
    delay = spec["check_delay"]
    plugins = [PassingCheck(delay)] if delay is not None else []
    pipeline = Pipeline.create(config, plugins=plugins, entrypoints=False)
    warm = run_turn(pipeline, mode, lambda: Turn.create("warm up", timeout=10, route="warm"))
    emit(event="warm", error=None if warm.error is None else repr(warm.error))
    cancel = CancelToken() if spec["cancel_after"] is not None else None
    tracemalloc.start()
    cpu = time.process_time()
    emit(event="start")
    started = time.monotonic()
    if cancel is not None:
        timer = threading.Timer(spec["cancel_after"], cancel.cancel)
        timer.daemon = True
        timer.start()
    outcome = run_turn(
        pipeline,
        mode,
        lambda: Turn.create("hello", timeout=spec["deadline"], route="slow"),
        cancel=cancel,
    )
    wall = time.monotonic() - started
    cpu = time.process_time() - cpu
    peak = tracemalloc.get_traced_memory()[1]
    error = outcome.error
    result = outcome.result
    emit(
        event="end",
        outcome=outcome.describe(),
        elapsed=outcome.elapsed,
        wall=wall,
        cpu=cpu,
        peak_bytes=peak,
        error=None if error is None else type(error).__name__,
        typed=error is None or isinstance(error, NimpipeError),
        tail=None if error is None else tail(error),
        text=None if result is None else result.text,
        chunks=[c if isinstance(c, str) else repr(c) for c in outcome.chunks],
    )
    pipeline.close()


def _child(spec: dict[str, Any]) -> None:
    code = 0
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        with open(spec["stderr"], "w") as err:
            os.dup2(err.fileno(), 2)
        run_case(spec)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def zygote(warm_tokenizer: bool) -> None:
    """Read specs on stdin, fork one child per spec, answer with its pid."""
    import httpx  # noqa: F401 - imported once here, not in every child

    import nimpipe.provider  # noqa: F401

    if warm_tokenizer:
        from nimpipe.tokens import count_tokens

        count_tokens("warm up the tokenizer", "hostile-model")
    # Children are reaped by the kernel; the test kills a hung one by its pid.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    for line in sys.stdin:
        spec = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(spec)
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    zygote("--warm-tokenizer" in sys.argv[1:])
