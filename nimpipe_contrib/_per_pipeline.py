"""State that several stages of one pipeline share (the price book, the routing notes).

A :class:`~nimpipe.pipeline.Pipeline` is not hashable, so it cannot key a
``WeakKeyDictionary``; :class:`PerPipeline` keys by identity and drops the
value when the pipeline is garbage-collected.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["PerPipeline"]

T = TypeVar("T")


class PerPipeline(Generic[T]):
    """One value per live pipeline, made by ``factory(pipeline)`` on first use."""

    def __init__(self, factory: Callable[[Any], T]) -> None:
        self._factory = factory
        self._values: dict[int, tuple[weakref.ref[Any], T]] = {}
        # Re-entrant: a garbage collection inside the factory may finalise
        # another pipeline, whose _drop takes this lock on the same thread.
        self._lock = threading.RLock()

    def get(self, pipeline: Any) -> T:
        """The value of ``pipeline``."""
        key = id(pipeline)
        found = self._values.get(key)
        if found is not None and found[0]() is pipeline:
            return found[1]
        with self._lock:
            found = self._values.get(key)
            if found is not None and found[0]() is pipeline:
                return found[1]
            value = self._factory(pipeline)
            self._values[key] = (weakref.ref(pipeline), value)
            weakref.finalize(pipeline, self._drop, key)
            return value

    def _drop(self, key: int) -> None:
        with self._lock:
            entry = self._values.get(key)
            if entry is not None and entry[0]() is None:
                del self._values[key]
