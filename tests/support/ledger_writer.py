"""A ledger writer in its own process, for the durability tests of ``test_ledger.py``.

``python tests/support/ledger_writer.py turns DB``
    runs turns forever through a pipeline with the ``ledger`` stage (SQLite
    file DB) against a NIM-shaped server in this process, printing
    ``COMMITTED <record ids>`` after every committed batch; the test kills it
    with SIGKILL.
``python tests/support/ledger_writer.py records TARGET TAG COUNT [START_AT]``
    waits until the Unix time START_AT (so that several writers overlap),
    writes COUNT records straight through the :class:`Ledger` API (TARGET is
    an SQLite path or a PostgreSQL URL), then closes the ledger and prints
    ``DONE <committed>``.
``python tests/support/ledger_writer.py spill DB TAG COUNT``
    writes COUNT records to the SQLite file DB, which the test holds locked,
    prints ``SPILLED <n>`` once the writer has given up and put them all in
    its spill file, then waits for the test to kill it with SIGKILL.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence

from nimpipe.types import CallRecord

_print_lock = threading.Lock()


def _say(line: str) -> None:
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def run_turns(path: str) -> int:
    from nimpipe import Pipeline, Price, Route, Turn
    from nimpipe.config import Config
    from nimpipe.testing.nim_server import NimServer

    with NimServer() as server:
        route = Route(
            name="local",
            base_url=server.base_url,
            model="meta/llama-3.1-8b-instruct",
            price=Price(input_per_1k=0.001, output_per_1k=0.002),
        )
        settings = {"path": path, "flush_interval": 0.02, "batch_size": 4}
        config = Config.from_dict({"stages": {"ledger": settings}}, env={}).with_routes(
            route, default="local"
        )
        pipeline = Pipeline.create(config, entrypoints=False)
        stage = pipeline.plugins.pm.get_plugin("ledger")
        assert stage is not None and stage.ledger is not None
        stage.ledger.on_commit = lambda ids: _say("COMMITTED " + " ".join(ids))
        _say("READY")
        n = 0
        while True:
            n += 1
            pipeline.run(Turn.create(f"turn number {n} of the durability run"))


def write_records(target: str, tag: str, count: int, start_at: float) -> int:
    from nimpipe_contrib.cost.ledger import Ledger

    ledger = Ledger.open(target, flush_interval=0.01, batch_size=25)
    ledger.start()
    time.sleep(max(0.0, start_at - time.time()))
    start = time.time()
    for i in range(count):
        ledger.record(
            CallRecord(
                time=start + i * 1e-3,
                turn_id=f"{tag}-{i}",
                agent_id=tag,
                agent_type="writer",
                route="local",
                provider="127.0.0.1:1",
                model="m",
                prompt_tokens=10,
                completion_tokens=5,
                cost_usd=0.000123,
                price_source="test",
                latency=0.01,
            )
        )
    ledger.close()
    _say(f"DONE {ledger.committed}")
    return 0 if ledger.committed == count else 1


def spill_records(path: str, tag: str, count: int) -> int:
    from nimpipe_contrib.cost.ledger import Ledger

    ledger = Ledger.open(path, flush_interval=0.01, busy_timeout=0.05, retry_timeout=0.2)
    start = time.time()
    for i in range(count):
        ledger.record(
            CallRecord(
                time=start + i * 1e-3,
                turn_id=f"{tag}-{i}",
                agent_id=tag,
                agent_type="writer",
                route="local",
                provider="127.0.0.1:1",
                model="m",
                prompt_tokens=10,
                completion_tokens=5,
                cost_usd=0.000123,
                price_source="test",
            )
        )
    deadline = time.monotonic() + 30
    while ledger.spilled < count and time.monotonic() < deadline:
        time.sleep(0.01)
    _say(f"SPILLED {ledger.spilled}")
    time.sleep(60)  # the test kills this process
    return 1


def main(argv: Sequence[str]) -> int:
    if argv[0] == "turns":
        return run_turns(argv[1])
    if argv[0] == "records":
        start_at = float(argv[4]) if len(argv) > 4 else 0.0
        return write_records(argv[1], argv[2], int(argv[3]), start_at)
    if argv[0] == "spill":
        return spill_records(argv[1], argv[2], int(argv[3]))
    raise SystemExit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
