"""``nimpipe chat`` against the hostile server: one line on stderr and an exit code, never
a traceback, an "internal error" or output that is not UTF-8.

Each case is a real ``nimpipe chat`` process (its route from ``NIMPIPE_BASE_URL``
and ``NIMPIPE_MODEL``, as in the README's quick start); two run at a time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hostile_harness import add_row, fail_message
from hostile_server import ANSWER, new_tag

#: Seconds a ``nimpipe chat`` process may take beyond its ``--timeout`` (interpreter start).
STARTUP = 8.0
TIMEOUT = 3.0

#: (scenario, chat flags, whether the answer must come out: exit 0)
CASES: list[tuple[str, tuple[str, ...], bool]] = [
    ("ok", ("--stream",), True),
    ("ok", ("--json",), True),
    ("content=number", ("--stream",), False),
    ("reply_surrogate", (), False),
    ("reply_surrogate", ("--stream",), False),
    ("deep_json", (), False),
    ("usage=inf", ("--json",), False),
    ("tool_index=str", ("--stream",), False),
    ("cut_close", ("--stream",), False),
    ("trickle=1", ("--stream",), False),
]


def _command(flags: tuple[str, ...]) -> list[str]:
    code = "import sys; from nimpipe.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, "chat", "--timeout", str(TIMEOUT), *flags, "hello"]


def test_nimpipe_chat_against_hostile_servers(hostile: Any, tmp_path: Path) -> None:
    def run(case: tuple[str, tuple[str, ...], bool]) -> tuple[Any, ...]:
        scenario, flags, _ = case
        env = {
            **os.environ,
            "NIMPIPE_BASE_URL": hostile.base_url(scenario, new_tag()),
            "NIMPIPE_MODEL": "hostile-model",
        }
        env.pop("NIMPIPE_DEBUG", None)
        started = time.monotonic()
        try:
            done = subprocess.run(
                _command(flags),
                capture_output=True,
                cwd=tmp_path,
                env=env,
                timeout=TIMEOUT + STARTUP,
            )
        except subprocess.TimeoutExpired as exc:
            return case, None, None, exc.stdout or b"", exc.stderr or b""
        return case, time.monotonic() - started, done.returncode, done.stdout, done.stderr

    # Two at a time: each process starts an interpreter, and the machine has few cores.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        finished = list(pool.map(run, CASES))
    failures = []
    for (scenario, flags, must_answer), elapsed, code, out, err in finished:
        problems: list[str] = []
        if elapsed is None:
            problems.append(f"still running after {TIMEOUT + STARTUP:.0f} s")
        else:
            problems += _judge(flags, must_answer, code, out, err)
        row = add_row(
            f"cli:{scenario}",
            " ".join(("chat", *flags)),
            problems,
            outcome="hung" if code is None else f"exit {code}",
            elapsed=elapsed,
            deadline=None,
            bound=TIMEOUT + STARTUP,
        )
        if not row.ok:
            failures.append(fail_message(row))
    assert not failures, "\n".join(failures)


def _judge(
    flags: tuple[str, ...], must_answer: bool, code: int, out: bytes, err: bytes
) -> list[str]:
    problems = []
    errors = err.decode("utf-8", "replace")
    if "Traceback" in errors:
        problems.append(f"a traceback on stderr: {errors.strip().splitlines()[-1][:200]}")
    if "internal error" in errors:
        problems.append(f"an internal error: {errors.strip()[-300:]}")
    if code not in (0, 1, 3):
        problems.append(f"exit code {code}")
    last = (errors.strip().splitlines() or [""])[-1]
    if code != 0 and not last.startswith("nimpipe: "):
        problems.append(f"the last line on stderr is not nimpipe's: {last[:200]!r}")
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"stdout is not UTF-8: {exc}")
        text = out.decode("utf-8", "replace")
    if must_answer:
        if code != 0:
            problems.append(f"exit {code}, expected the answer: {errors.strip()[-200:]}")
        elif "--json" in flags:
            if json.loads(text)["text"] != ANSWER:
                problems.append(f"JSON text {text[:200]!r}")
        elif text != ANSWER + "\n":
            problems.append(f"printed {text[:200]!r}")
    return problems
