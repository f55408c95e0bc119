"""A deferred input check that passes before the first token never makes a turn spin.

The server holds the first token back; the check (the guardrails default is
such a check) passes at once.  The turn must wait, not spin: its process's
CPU time stays well below the wall time, and the deadline and a
:class:`~nimpipe.CancelToken` still end it.  Each case runs in a process of
its own (forked from :mod:`hostile_spin_child`), because a spinning event
loop cannot be stopped from inside.

Also here, in the same kind of fresh process: a turn whose cut call is the
first thing the process counts tokens for (the tokenizer is still cold) must
not end late because of that count.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hostile_harness import GRACE, MB, MODES, SLACK, add_row, fail_message
from hostile_server import ANSWER, new_tag

CHILD = Path(__file__).resolve().parent / "hostile_spin_child.py"
#: Most CPU time a waiting turn may use, as a share of its wall time.
CPU_SHARE = 0.30

#: case -> (server delay before the first token, deadline, cancel after, bound)
CASES = {
    "first_token_late": (1.0, 3.0, None, 3.0 + SLACK),
    "deadline": (30.0, 2.0, None, 2.0 + SLACK),
    "cancel": (30.0, None, 1.0, 1.0 + SLACK),
}


class Zygote:
    """A process with nimpipe imported that forks one child per case."""

    def __init__(self, warm_tokenizer: bool) -> None:
        args = [sys.executable, str(CHILD)] + (["--warm-tokenizer"] if warm_tokenizer else [])
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ready(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.strip() == "ready", f"the case process did not start: {line!r}"

    def spawn(self, spec: dict[str, Any]) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        return int(json.loads(self.process.stdout.readline())["pid"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture(scope="module")
def zygotes() -> Iterator[dict[str, Zygote]]:
    started = {"warm": Zygote(warm_tokenizer=True), "cold": Zygote(warm_tokenizer=False)}
    try:
        for zygote in started.values():
            zygote.ready()
        yield started
    finally:
        for zygote in started.values():
            zygote.close()


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _events(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {e["event"]: e for e in events}


def _run_child(zygote: Zygote, spec: dict[str, Any], bound: float) -> dict[str, Any]:
    """Fork a child for ``spec``: its ``end`` event, or what was seen of a child that hung."""
    events_path = Path(spec["events"])
    pid = zygote.spawn(spec)
    started = cpu_started = None
    give_up = time.monotonic() + 15.0  # the warm-up turn
    try:
        while time.monotonic() < give_up:
            seen = _events(events_path)
            if "end" in seen:
                return dict(seen["end"])
            if started is None and "start" in seen:
                started = time.monotonic()
                cpu_started = _cpu_seconds(pid)
                give_up = started + bound + GRACE
            if _cpu_seconds(pid) is None:  # the child is gone
                seen = _events(events_path)
                if "end" in seen:
                    return dict(seen["end"])
                break
            time.sleep(0.02)
        if started is None or cpu_started is None:
            stderr = Path(spec["stderr"])
            text = stderr.read_text()[-2000:] if stderr.exists() else ""
            return {"event": "broken", "seen": _events(events_path), "stderr": text}
        cpu_now = _cpu_seconds(pid)
        return {
            "event": "hung",
            "wall": time.monotonic() - started,
            "cpu": (cpu_now - cpu_started) if cpu_now is not None else 0.0,
        }
    finally:
        if _cpu_seconds(pid) is not None:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_a_passing_deferred_check_never_spins(
    hostile: Any, zygotes: dict[str, Zygote], tmp_path: Path, case: str, mode: str
) -> None:
    _check_child(hostile, zygotes["warm"], tmp_path, f"spin:{case}", case, mode, deferred=True)


@pytest.mark.parametrize("mode", MODES)
def test_a_cold_tokenizer_does_not_stretch_the_deadline(
    hostile: Any, zygotes: dict[str, Zygote], tmp_path: Path, mode: str
) -> None:
    """No deferred check; the cut call's record is the process's first local token count."""
    _check_child(
        hostile, zygotes["cold"], tmp_path, "cold_tokenizer:deadline", "deadline", mode,
        deferred=False,
    )  # fmt: skip


def _check_child(
    hostile: Any,
    zygote: Zygote,
    tmp_path: Path,
    name: str,
    case: str,
    mode: str,
    *,
    deferred: bool,
) -> None:
    delay, deadline, cancel_after, bound = CASES[case]
    spec = {
        "mode": mode,
        "warm_url": hostile.base_url("ok", new_tag()),
        "slow_url": hostile.base_url(f"slow_first={delay}", new_tag()),
        "deadline": deadline,
        "cancel_after": cancel_after,
        "check_delay": 0.05 if deferred else None,
        "events": str(tmp_path / "events.jsonl"),
        "stderr": str(tmp_path / "child.err"),
    }
    end = _run_child(zygote, spec, bound)
    problems: list[str] = []
    if end["event"] == "broken":
        problems.append(f"the child did not get to the turn: {end}")
        row = add_row(
            name, mode, problems, outcome="broken", elapsed=None,
            deadline=deadline, bound=bound,
        )  # fmt: skip
        pytest.fail(fail_message(row))
    wall, cpu = end["wall"], end["cpu"]
    share = cpu / wall if wall > 0 else 0.0
    if deferred and share >= CPU_SHARE:
        problems.append(f"CPU {cpu:.2f} s over {wall:.2f} s wall ({share:.0%}): it spins")
    if end["event"] == "hung":
        problems.append(f"still running past {bound + GRACE:.1f} s")
        outcome, elapsed = "hung", None
    else:
        outcome, elapsed = end["outcome"], end["elapsed"]
        if elapsed > bound:
            problems.append(f"took {elapsed:.2f} s, bound {bound:.2f} s")
        if not end["typed"]:
            problems.append(f"bare {end['error']}: {end['tail']}")
        if case == "first_token_late":
            if end["error"] is not None:
                problems.append(f"{end['error']} instead of the answer: {end['tail']}")
            elif end["text"] != ANSWER:
                problems.append(f"text {end['text']!r}")
            elif mode in ("stream", "astream") and "".join(end["chunks"]) != ANSWER:
                problems.append(f"released {end['chunks']!r}")
        elif case == "deadline" and end["error"] not in ("DeadlineExceededError", "TimeoutError"):
            problems.append(f"ended in {end['outcome']}, expected a deadline error")
        elif case == "cancel" and end["error"] != "CancelledError":
            problems.append(f"ended in {end['outcome']}, expected CancelledError")
    row = add_row(
        name,
        mode,
        problems,
        outcome=f"{outcome}, cpu {share:.0%}",
        elapsed=elapsed,
        deadline=deadline if deadline is not None else cancel_after,
        bound=bound,
    )
    row.peak_mb = end.get("peak_bytes", 0) / MB
    assert row.ok, fail_message(row)
