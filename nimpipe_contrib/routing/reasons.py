"""Why each model call went to the route it went to.

``select_provider`` and ``before_call`` return a route, with no place for the
reason.  Routing stages (router, cascade, budget) therefore write their reason
here, keyed by turn id and attempt number, and the ledger stores it with the
call's record (column ``routing_reason``).  The notes of one pipeline live in
one bounded :class:`RouteReasons`; the oldest are dropped first, so a
long-running process keeps a fixed amount.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import attrs

from nimpipe_contrib._per_pipeline import PerPipeline

if TYPE_CHECKING:
    from nimpipe.pipeline import Pipeline

__all__ = ["RouteReasons", "reasons_for"]

logger = logging.getLogger("nimpipe.routing")

#: Notes kept per pipeline (about one per model call in flight or just finished).
DEFAULT_CAPACITY = 8192


@attrs.define
class RouteReasons:
    """Routing reasons by ``(turn_id, attempt)``; thread-safe and bounded."""

    capacity: int = DEFAULT_CAPACITY
    _notes: OrderedDict[tuple[str, int], str] = attrs.field(factory=OrderedDict, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def note(self, turn_id: str, attempt: int, plugin: str, reason: str) -> None:
        """Add ``plugin``'s reason for the route of call ``attempt`` of turn ``turn_id``."""
        text = f"{plugin}: {reason}"
        key = (turn_id, attempt)
        with self._lock:
            previous = self._notes.get(key)
            self._notes[key] = f"{previous}; {text}" if previous else text
            while len(self._notes) > self.capacity:
                self._notes.popitem(last=False)
        logger.debug("turn %s attempt %d: %s", turn_id, attempt, text)

    def get(self, turn_id: str, attempt: int) -> str:
        """The reasons noted for that call, joined with ``; `` (``""`` if none)."""
        return self._notes.get((turn_id, attempt), "")

    def __len__(self) -> int:
        return len(self._notes)


_by_pipeline: PerPipeline[RouteReasons] = PerPipeline(lambda pipeline: RouteReasons())


def reasons_for(pipeline: Pipeline) -> RouteReasons:
    """The routing notes of ``pipeline`` (created on first use)."""
    return _by_pipeline.get(pipeline)
