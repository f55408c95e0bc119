"""NeMo Guardrails' ``LLMRails`` in this process as a check backend.

``nemoguardrails`` is imported only here, and only when a backend starts
loading its rails (never at import time).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

import attrs

from nimpipe.errors import BackendUnavailable
from nimpipe.types import ToolCall, Verdict
from nimpipe_contrib.guardrails.backends.base import elapsed, rails_verdict, render_tool_call
from nimpipe_contrib.guardrails.backends.loop import LoopThread

__all__ = ["InProcessBackend", "missing_nemoguardrails_message", "nemoguardrails_available"]


def missing_nemoguardrails_message() -> str:
    """What to tell a user whose environment lacks ``nemoguardrails``."""
    return (
        'the in-process guardrails backend needs NeMo Guardrails: pip install "nimpipe[guardrails]"'
    )


def nemoguardrails_available() -> bool:
    """Whether ``nemoguardrails`` can be imported (checked without importing it)."""
    import importlib.util
    import sys

    if "nemoguardrails" in sys.modules:
        return sys.modules["nemoguardrails"] is not None
    return importlib.util.find_spec("nemoguardrails") is not None


class _SharedRailsLoop:
    """The one event loop every ``LLMRails`` of this process runs on.

    NeMo Guardrails pools its HTTP clients process-wide, so rails on two
    event loops would share connections bound to one of them.  The loop
    starts with the first in-process backend and stops, after NeMo's client
    pool is closed, with the last.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: LoopThread | None = None
        self._users = 0

    def acquire(self) -> LoopThread:
        with self._lock:
            if self._loop is None:
                self._loop = LoopThread("nimpipe-guardrails-rails")
            self._users += 1
            return self._loop

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users > 0 or self._loop is None:
                return
            loop, self._loop = self._loop, None
        loop.close([_close_nemo_clients()])


async def _close_nemo_clients() -> None:
    import sys

    if "nemoguardrails" not in sys.modules:
        return
    from nemoguardrails.llm.frameworks.registry import get_default_framework, get_framework

    close = getattr(get_framework(get_default_framework()), "aclose", None)
    if close is not None:
        await close()


_RAILS_LOOP = _SharedRailsLoop()


@attrs.define(kw_only=True)
class InProcessBackend:
    """NeMo Guardrails' ``LLMRails`` in this process, on the rails event-loop thread.

    ``nemoguardrails`` is imported (about 2 s) and the configuration loaded
    by :meth:`begin_loading` (the stage calls it at ``configure``), on that
    thread, so the first check waits only for what is left of it.  Every
    in-process backend of the process shares that one loop (NeMo pools its
    HTTP clients process-wide).  The checks are ``LLMRails.check_async``
    with explicit rail types: the same rails-only semantics as ``/v1/checks``.

    :param config_path: a rails configuration directory (``config.yml``,
        ``prompts.yml``...).
    """

    config_path: Path = attrs.field(converter=Path)
    name: str = "inprocess"
    _thread: LoopThread | None = attrs.field(default=None, init=False)
    _loading: concurrent.futures.Future[Any] | None = attrs.field(default=None, init=False)
    _missing: set[str] = attrs.field(factory=set, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def _loop(self) -> LoopThread:
        with self._lock:
            if self._thread is None:
                self._thread = _RAILS_LOOP.acquire()
            return self._thread

    def begin_loading(self) -> concurrent.futures.Future[Any]:
        """Start importing NeMo Guardrails and loading the rails (once); returns the future."""
        loop = self._loop()
        with self._lock:
            if self._loading is None:
                self._loading = loop.submit(self._load())
            return self._loading

    async def _load(self) -> Any:
        os.environ.setdefault("NEMO_GUARDRAILS_NO_USAGE_STATS", "1")
        try:
            from nemoguardrails import LLMRails, RailsConfig
        except ImportError as exc:
            raise BackendUnavailable(self.name, missing_nemoguardrails_message()) from exc
        config = RailsConfig.from_path(str(self.config_path))
        # Built inside the running loop that will drive it: LLMRails must stay on one loop.
        return LLMRails(config)

    async def start(self) -> None:
        """Wait until the rails are loaded (starting the load if needed)."""
        await asyncio.wrap_future(self.begin_loading())

    async def _check(
        self, kind: Literal["input", "output", "tool call"], messages: list[dict[str, str]]
    ) -> Verdict | None:
        rail_type = "input" if kind == "input" else "output"
        if rail_type in self._missing:
            return None
        original = messages[-1]["content"]

        async def on_rails_loop() -> Verdict | None:
            loading = self.begin_loading()
            try:
                rails = await asyncio.wrap_future(loading)
            except BackendUnavailable:
                raise
            except Exception as exc:
                raise BackendUnavailable(
                    self.name, f"cannot load the rails in {self.config_path}: {exc}"
                ) from exc
            from nemoguardrails.exceptions import RailTypeNotConfiguredError
            from nemoguardrails.rails.llm.options import RailType

            started = time.perf_counter()
            try:
                result = await rails.check_async(messages, rail_types=[RailType(rail_type)])
            except RailTypeNotConfiguredError:
                self._missing.add(rail_type)
                return None
            except Exception as exc:
                raise BackendUnavailable(self.name, f"{type(exc).__name__}: {exc}") from exc
            return rails_verdict(
                self.name,
                kind,
                result.status,
                result.rail,
                result.content,
                original,
                elapsed(started),
            )

        return await self._loop().run(on_rails_loop())

    async def check_input(self, text: str, model: str) -> Verdict | None:
        """Run the input rails on ``text``."""
        return await self._check("input", [{"role": "user", "content": text}])

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None:
        """Run the output rails on the answer ``text`` to ``prompt``."""
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
        return await self._check("output", messages)

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None:
        """Run the output rails on a proposed tool call (rendered as text)."""
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": render_tool_call(call)},
        ]
        return await self._check("tool call", messages)

    async def aclose(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            loading = self._loading
            if loading is not None and not loading.done():
                loading.cancel()
            _RAILS_LOOP.release()
