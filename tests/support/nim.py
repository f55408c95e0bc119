"""What the NIM stages' tests share: the model they serve, routes to a test server, waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from nimpipe.types import Route

#: The model the NIM-shaped test server serves by default.
MODEL = "meta/llama-3.1-8b-instruct"

T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 10.0) -> T:
    """``check()``'s first true value, polled every 20 ms; fails naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def route(name: str, server: Any, model: str = MODEL, **kwargs: Any) -> Route:
    """A route to ``server`` that never retries (so a test sees each failure)."""
    return Route(name=name, base_url=server.base_url, model=model, max_retries=0, **kwargs)
