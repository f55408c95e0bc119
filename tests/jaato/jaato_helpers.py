"""Helpers for the jaato tests: counting stages, an output transcript, polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import nimpipe
from nimpipe.types import Block, CallRecord, Output, Turn

__all__ = ["MODEL", "CostOnly", "Counter", "Transcript", "wait_until"]

#: The model the NIM-shaped test server serves.
MODEL = "meta/llama-3.1-8b-instruct"


class Counter:
    """A stage that records every ``pre_input``, ``post_output`` and ``record_cost`` call.

    Blocks input containing ``block_input`` and output containing
    ``block_output``.  Thread-safe: subagents call it from several threads.
    """

    def __init__(self, *, block_input: str | None = None, block_output: str | None = None) -> None:
        self.block_input = block_input
        self.block_output = block_output
        self.inputs: list[Turn] = []
        self.outputs: list[tuple[Turn, Output]] = []
        self.records: list[CallRecord] = []
        self._lock = threading.Lock()

    @nimpipe.hookimpl
    def pre_input(self, turn: Turn) -> Block | None:
        with self._lock:
            self.inputs.append(turn)
        if self.block_input and self.block_input in turn.last_user_text:
            return Block(reason="test input rule", message="Blocked by nimpipe: input not allowed.")
        return None

    @nimpipe.hookimpl
    def post_output(self, turn: Turn, output: Output) -> Block | None:
        with self._lock:
            self.outputs.append((turn, output))
        if self.block_output and self.block_output in output.text:
            return Block(reason="test output rule", message="Blocked by nimpipe: output withheld.")
        return None

    @nimpipe.hookimpl
    def record_cost(self, record: CallRecord) -> None:
        with self._lock:
            self.records.append(record)


class CostOnly:
    """A stage with ``record_cost`` only: output is not held back."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self._lock = threading.Lock()

    @nimpipe.hookimpl
    def record_cost(self, record: CallRecord) -> None:
        with self._lock:
            self.records.append(record)


class Transcript:
    """What jaato's ``on_output`` callback received."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def __call__(self, source: str, text: str, mode: str) -> None:
        self.events.append((source, text, mode))

    def model_chunks(self) -> list[str]:
        return [text for source, text, _ in self.events if source == "model"]


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, settle: float = 0.0) -> None:
    """Wait for ``predicate`` to hold (and to keep holding for ``settle`` seconds)."""
    deadline = time.monotonic() + timeout
    held_since: float | None = None
    while time.monotonic() < deadline:
        if predicate():
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since >= settle:
                return
        else:
            held_since = None
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")
