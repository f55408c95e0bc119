"""A hostile OpenAI-compatible chat-completions server for the hostile-input suite.

It speaks the shape of ``POST /v1/chat/completions`` (plain JSON and SSE
``data:`` lines) with byte-level control, and misbehaves in the way the
request's path asks for::

    http://127.0.0.1:PORT/s/<scenario>/<tag>/v1/chat/completions

``<scenario>`` is a name from :data:`SCENARIOS`, optionally with an argument
(``trickle=0.5``, ``retry_after=inf``); ``<tag>`` is any string the test
chooses, so that requests of one test case are counted apart from every
other's: ``GET /_count/<tag>`` answers ``{"count": n, "requests": [...]}``.
Scenarios that depend on the request number within a tag (a 429 then an
answer) get it as ``n`` (0 for the first request).

Run it as ``python hostile_server.py`` in its own process: it prints
``port <n>`` on stdout once it listens on 127.0.0.1 and serves until it is
terminated.  :class:`HostileServer` does that for tests.  A server process
keeps the server's allocations and CPU out of the measurements of the
process under test.  No connection is served for longer than
:data:`LIFETIME` seconds, and a handler stops as soon as its client closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import traceback
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

#: The answer every well-behaved reply carries, as it is streamed.
ANSWER_PARTS = ("Hello", " from", " the", " hostile", " server.")
ANSWER = "".join(ANSWER_PARTS)
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}

#: Size of the huge replies (content of one repeated character, or of one repeated word).
HUGE_BYTES = 16 * 2**20
#: Content per SSE event of a huge streamed reply.
HUGE_EVENT_BYTES = 16 * 2**10
#: An endless reply stops after this many bytes (it stands for "forever" without
#: letting a client that buffers everything take the machine down).
ENDLESS_CAP = 256 * 2**20
#: No connection handler lives longer than this (seconds).
LIFETIME = 90.0

#: Sentences of the reply a cut stream retries into (sentence release policy).
SENTENCES = ("First sentence. ", "Second sentence. ", "Third sentence.")
OTHER_SENTENCES = ("Another start. ", "Entirely new words.")

#: A text that also calls tools, with the word the output check blocks.
FORBIDDEN = "FORBIDDEN"
TOOL_TEXT_PARTS = ("Sure. ", "The secret word is ", FORBIDDEN, ". ", "Calling the tool.")
TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "lookup", "arguments": '{"q": "weather"}'},
}

#: Retry-After values by name (``retry_after=<name>``).
RETRY_AFTER = {
    "99999": ("retry-after", "99999"),
    "inf": ("retry-after", "inf"),
    "nan": ("retry-after", "nan"),
    "negative": ("retry-after", "-5"),
    "date": ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
    "1e999": ("retry-after", "1e999"),
    "digits": ("retry-after", "9" * 400),
    "ms_inf": ("retry-after-ms", "inf"),
    "ms_huge": ("retry-after-ms", "1e300"),
}

#: Raw JSON literals a usage field can be set to (``usage=<name>``).
USAGE_LITERALS = {
    "inf": ("1e999", "1e999"),
    "huge": (str(10**20), "5"),
    "negative": ("-100000", "-100000"),
    "strings": ('"10"', '"five"'),
    "nan": ("NaN", "NaN"),
    "infinity": ("Infinity", "-Infinity"),
    "float": ("10.5", "5.25"),
    "bool": ("true", "false"),
    "object": ('{"n": 10}', "[5]"),
    "completion_5000": ("10", "5000"),
}

_DEEP = 100_000


# --------------------------------------------------------------------------
# Reply bodies
# --------------------------------------------------------------------------


def completion(
    content: Any = ANSWER,
    *,
    tool_calls: Any = None,
    usage: Any = USAGE,
    finish: Any = "stop",
    choices: Any = None,
) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    body: dict[str, Any] = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion",
        "created": 0,
        "model": "hostile",
        "choices": (
            [{"index": 0, "message": message, "finish_reason": finish}]
            if choices is None
            else choices
        ),
    }
    if usage is not None:
        body["usage"] = usage
    return body


def chunk(
    delta: Any = None, *, finish: Any = None, usage: Any = None, choices: Any = None
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` object."""
    body: dict[str, Any] = {
        "id": "chatcmpl-hostile",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "hostile",
        "choices": (
            [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
            if choices is None
            else choices
        ),
    }
    if usage is not None:
        body["usage"] = usage
    return body


def answer_chunks(
    parts: tuple[str, ...] = ANSWER_PARTS, *, usage: Any = USAGE, finish: str = "stop"
) -> list[dict[str, Any]]:
    """The chunks of a well-behaved streamed answer (role, text, finish, usage)."""
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": p}) for p in parts]
    chunks.append(chunk(finish=finish))
    if usage is not None:
        chunks.append(chunk(usage=usage, choices=[]))
    return chunks


def with_raw(obj: Any, **literals: str) -> bytes:
    """JSON of ``obj`` where each string ``"@name@"`` is replaced by a raw literal."""
    text = json.dumps(obj)
    for name, literal in literals.items():
        text = text.replace(f'"@{name}@"', literal)
    return text.encode()


def sse_text(chunks: list[Any], *, done: bool = True) -> bytes:
    """The SSE body of ``chunks`` (objects or raw bytes), ending in ``[DONE]``."""
    out = b"".join(b"data: " + _payload(c) + b"\n\n" for c in chunks)
    return out + (b"data: [DONE]\n\n" if done else b"")


def _payload(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    return json.dumps(item).encode()


def deep_json(depth: int = _DEEP) -> bytes:
    """A JSON object whose ``choices`` is an array nested ``depth`` deep."""
    return b'{"id": "deep", "choices": ' + b"[" * depth + b"]" * depth + b"}"


# --------------------------------------------------------------------------
# The wire
# --------------------------------------------------------------------------


class Wire:
    """Writes one HTTP/1.1 response byte by byte if need be."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.chunked = False

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(
        self,
        status: int = 200,
        headers: list[tuple[str, str]] | None = None,
        *,
        length: int | None = None,
        chunked: bool = False,
        content_type: str = "application/json",
    ) -> None:
        """Status line and headers; no length and no chunking means close-delimited."""
        reason = {
            200: "OK",
            429: "Too Many Requests",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }.get(status, "Status")
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}"]
        lines += [f"{k}: {v}" for k, v in headers or []]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        lines.append("Connection: close")
        self.chunked = chunked
        await self.raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def body(self, data: bytes) -> None:
        """Body bytes, framed as one chunk when the response is chunked."""
        if not data:
            return
        if self.chunked:
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        await self.raw(data)

    async def end(self) -> None:
        """The terminating chunk of a chunked response."""
        if self.chunked:
            await self.raw(b"0\r\n\r\n")

    async def json(
        self, obj: Any, status: int = 200, headers: list[tuple[str, str]] | None = None
    ) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        await self.head(status, headers, length=len(data))
        await self.raw(data)

    async def sse(self, chunks: list[Any], *, done: bool = True, framing: str = "chunked") -> None:
        """A whole SSE reply; ``framing`` is ``chunked``, ``length`` or ``close``."""
        data = sse_text(chunks, done=done)
        if framing == "length":
            await self.head(200, length=len(data), content_type="text/event-stream")
            await self.raw(data)
            return
        await self.head(200, chunked=framing == "chunked", content_type="text/event-stream")
        for event in data.split(b"\n\n")[:-1]:
            await self.body(event + b"\n\n")
        await self.end()

    async def answer(self, stream: bool, **kw: Any) -> None:
        """A well-behaved answer."""
        if stream:
            await self.sse(answer_chunks(**kw))
        else:
            parts = kw.get("parts", ANSWER_PARTS)
            await self.json(completion("".join(parts), usage=kw.get("usage", USAGE)))


# --------------------------------------------------------------------------
# Scenarios: async def scenario(wire, stream, n, arg)
# --------------------------------------------------------------------------

Scenario = Callable[[Wire, bool, int, str], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return register


@scenario("ok")
async def _ok(wire: Wire, stream: bool, n: int, arg: str) -> None:
    await wire.answer(stream)


# -- deadlines ---------------------------------------------------------------


@scenario("trickle")
async def _trickle(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Headers at once, then the (valid) body one byte per ``arg`` seconds (1.0)."""
    period = float(arg or 1.0)
    if stream:
        data = sse_text(answer_chunks())
        await wire.head(200, chunked=True, content_type="text/event-stream")
    else:
        data = json.dumps(completion()).encode()
        await wire.head(200, length=len(data))
    for i in range(len(data)):
        await wire.body(data[i : i + 1])
        await asyncio.sleep(period)
    await wire.end()


@scenario("pings")
async def _pings(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Headers, then only keep-alives forever: SSE ``: ping`` comments, or spaces in JSON."""
    period = float(arg or 0.5)
    if stream:
        await wire.head(200, chunked=True, content_type="text/event-stream")
        beat = b": ping\n\n"
    else:
        await wire.head(200, chunked=True)
        beat = b" "
    while True:
        await wire.body(beat)
        await asyncio.sleep(period)


@scenario("headers_slow")
async def _headers_slow(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """The header block never ends: one more byte of a header every ``arg`` seconds."""
    period = float(arg or 0.5)
    await wire.raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: ")
    while True:
        await wire.raw(b"a")
        await asyncio.sleep(period)


@scenario("slow_first")
async def _slow_first(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """The answer, after ``arg`` seconds (headers at once when streaming)."""
    delay = float(arg or 1.0)
    if stream:
        await wire.head(200, chunked=True, content_type="text/event-stream")
        await asyncio.sleep(delay)
        for event in sse_text(answer_chunks()).split(b"\n\n")[:-1]:
            await wire.body(event + b"\n\n")
        await wire.end()
    else:
        await asyncio.sleep(delay)
        await wire.answer(False)


@scenario("retry_after")
async def _retry_after(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """The first request gets HTTP 429 (or ``503-<name>``: 503) with a hostile Retry-After.

    Later requests get the answer.
    """
    status, _, name = arg.rpartition("-") if "-" in arg else ("429", "", arg)
    if n == 0:
        header = RETRY_AFTER[name]
        error = {"error": {"message": "slow down", "type": "rate_limit"}}
        await wire.json(error, int(status), [header])
        return
    await wire.answer(stream)


_HUGE: dict[tuple[str, bool], bytes] = {}


def huge_text(kind: str) -> str:
    """16 MB of one repeated character (``a``) or one repeated word (``words``)."""
    unit = "word " if kind == "words" else "a"
    return unit * (HUGE_BYTES // len(unit))


def _huge_body(kind: str, stream: bool) -> bytes:
    key = (kind, stream)
    if key not in _HUGE:
        text = huge_text(kind)
        if stream:
            step = HUGE_EVENT_BYTES
            parts = tuple(text[i : i + step] for i in range(0, len(text), step))
            _HUGE[key] = sse_text(answer_chunks(parts, usage=None))
        else:
            _HUGE[key] = json.dumps(completion(text, usage=None)).encode()
    return _HUGE[key]


@scenario("huge")
async def _huge(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """A 16 MB reply without usage (``arg``: ``a`` or ``words``)."""
    data = _huge_body(arg or "a", stream)
    if stream:
        await wire.head(200, chunked=True, content_type="text/event-stream")
    else:
        await wire.head(200, length=len(data))
    step = 256 * 2**10
    for i in range(0, len(data), step):
        await wire.body(data[i : i + step])
    await wire.end()


@scenario("huge_event")
async def _huge_event(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """The whole 16 MB answer in one SSE event (plain: as ``huge``)."""
    text = huge_text("a")
    if not stream:
        await _huge(wire, stream, n, "a")
        return
    data = sse_text(answer_chunks((text,), usage=None))
    await wire.head(200, chunked=True, content_type="text/event-stream")
    step = 256 * 2**10
    for i in range(0, len(data), step):
        await wire.body(data[i : i + step])
    await wire.end()


@scenario("endless")
async def _endless(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Bytes without end: an SSE line that never ends, or a JSON string that never closes."""
    if stream:
        await wire.head(200, chunked=True, content_type="text/event-stream")
        await wire.body(b'data: {"choices": [{"index": 0, "delta": {"content": "')
    else:
        await wire.head(200, chunked=True)
        await wire.body(b'{"choices": [{"index": 0, "message": {"content": "')
    block = b"a" * (256 * 2**10)
    sent = 0
    while sent < ENDLESS_CAP:
        await wire.body(block)
        sent += len(block)


# -- malformed replies -------------------------------------------------------


async def _reply(wire: Wire, stream: bool, plain: Any, chunks: list[Any]) -> None:
    if stream:
        await wire.sse(chunks)
    else:
        await wire.json(plain)


@scenario("tool_calls_int")
async def _tool_calls_int(wire: Wire, stream: bool, n: int, arg: str) -> None:
    await _reply(
        wire,
        stream,
        completion(None, tool_calls=5, finish="tool_calls"),
        [chunk({"role": "assistant", "tool_calls": 5}), chunk(finish="tool_calls")],
    )


@scenario("tool_calls_str")
async def _tool_calls_str(wire: Wire, stream: bool, n: int, arg: str) -> None:
    await _reply(
        wire,
        stream,
        completion(None, tool_calls="lookup", finish="tool_calls"),
        [chunk({"role": "assistant", "tool_calls": "lookup"}), chunk(finish="tool_calls")],
    )


@scenario("tool_fields")
async def _tool_fields(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """A tool call whose id and name are numbers and whose arguments are an object."""
    call = {"id": 5, "type": "function", "function": {"name": 7, "arguments": {"q": 1}}}
    await _reply(
        wire,
        stream,
        completion(None, tool_calls=[call], finish="tool_calls"),
        [chunk({"tool_calls": [dict(call, index=0)]}), chunk(finish="tool_calls")],
    )


_INDEXES = {
    "str": ('"zero"', "1"),
    "float": ("0.5", "1"),
    "null": ("null", "1"),
    "huge": (str(10**30), "0"),
    "negative": ("-1", "0"),
    "bool": ("true", "0"),
    "object": ('{"i": 0}', "1"),
}


@scenario("tool_index")
async def _tool_index(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Two streamed tool calls whose ``index`` is not an integer (``arg`` names the kind)."""
    first, second = _INDEXES[arg]
    calls = [
        {"index": "@i0@", "id": "call_a", "type": "function",
         "function": {"name": "lookup", "arguments": '{"q": 1}'}},
        {"index": "@i1@", "id": "call_b", "type": "function",
         "function": {"name": "fetch", "arguments": '{"u": 2}'}},
    ]  # fmt: skip
    if not stream:
        await wire.json(
            with_raw(completion(None, tool_calls=calls, finish="tool_calls"), i0=first, i1=second)
        )
        return
    events = [
        with_raw(chunk({"role": "assistant", "tool_calls": [calls[0]]}), i0=first),
        with_raw(chunk({"tool_calls": [calls[1]]}), i1=second),
        chunk(finish="tool_calls"),
        chunk(usage=USAGE, choices=[]),
    ]
    await wire.sse(events)


@scenario("usage")
async def _usage(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """A good answer whose usage holds impossible figures (``arg`` names them)."""
    prompt, completion_tokens = USAGE_LITERALS[arg]
    usage = {"prompt_tokens": "@p@", "completion_tokens": "@c@"}
    if not stream:
        await wire.json(with_raw(completion(usage=usage), p=prompt, c=completion_tokens))
        return
    chunks: list[Any] = answer_chunks(usage=None)
    chunks.append(with_raw(chunk(usage=usage, choices=[]), p=prompt, c=completion_tokens))
    await wire.sse(chunks)


@scenario("deep_json")
async def _deep_json(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """JSON nested 100,000 deep (the whole reply, or one SSE event)."""
    if stream:
        await wire.sse([chunk({"role": "assistant", "content": ""}), deep_json()])
    else:
        await wire.json(deep_json())


_CONTENTS = {
    "number": "5",
    "object": '{"text": "Hello"}',
    "list": '[{"type": "text", "text": "Hello"}]',
    "bool": "true",
    "huge_number": "1" + "0" * 5000,
}


@scenario("content")
async def _content(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Content that is not a string (``arg`` names what it is)."""
    literal = _CONTENTS[arg]
    if not stream:
        await wire.json(with_raw(completion("@x@"), x=literal))
        return
    events = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        with_raw(chunk({"content": "@x@"}), x=literal),
        chunk({"content": " world."}),
        chunk(finish="stop"),
        chunk(usage=USAGE, choices=[]),
    ]
    await wire.sse(events)


@scenario("choices_empty")
async def _choices_empty(wire: Wire, stream: bool, n: int, arg: str) -> None:
    await _reply(
        wire,
        stream,
        completion(choices=[]),
        [chunk(choices=[]), chunk(usage=USAGE, choices=[])],
    )


@scenario("choices_bad")
async def _choices_bad(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """``choices`` is a string."""
    await _reply(wire, stream, completion(choices="oops"), [chunk(choices="oops")])


@scenario("not_json")
async def _not_json(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """An HTML error page where JSON belongs (labelled as JSON / as an SSE event)."""
    page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    if stream:
        await wire.sse([page])
    else:
        await wire.json(page)


@scenario("html")
async def _html(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """HTTP 200 with an HTML page, labelled as HTML."""
    page = b"<html><body>maintenance</body></html>"
    await wire.head(200, length=len(page), content_type="text/html")
    await wire.raw(page)


@scenario("empty")
async def _empty(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """HTTP 200 with an empty body."""
    await wire.head(200, length=0, content_type="text/event-stream" if stream else "x/json")


@scenario("error_event")
async def _error_event(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """An error object where the reply belongs (HTTP 200)."""
    error = {"error": {"message": "model overloaded", "type": "server_error", "code": 503}}
    if stream:
        await wire.sse([chunk({"role": "assistant", "content": ""}), error])
    else:
        await wire.json(error)


@scenario("cut_close")
async def _cut_close(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """A close-delimited reply (no Content-Length, not chunked) cut before it ends.

    Streamed: text events, then the connection closes before ``finish_reason``
    and ``[DONE]``.  Plain: the JSON stops half-way.
    """
    if stream:
        await wire.head(200, content_type="text/event-stream")
        await wire.raw(sse_text(answer_chunks()[:3], done=False))
    else:
        data = json.dumps(completion()).encode()
        await wire.head(200)
        await wire.raw(data[: len(data) // 2])


@scenario("finish_no_done")
async def _finish_no_done(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """A close-delimited reply that is complete, but a stream without usage or ``[DONE]``.

    Streamed: every text event and the ``finish_reason``, then the connection
    closes.  Plain: the whole JSON, close-delimited.
    """
    if stream:
        await wire.head(200, content_type="text/event-stream")
        await wire.raw(sse_text(answer_chunks(usage=None), done=False))
    else:
        await wire.head(200)
        await wire.raw(json.dumps(completion()).encode())


@scenario("cut_chunked")
async def _cut_chunked(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """A framed reply cut short: chunked without its last chunk, or short of Content-Length."""
    if stream:
        await wire.head(200, chunked=True, content_type="text/event-stream")
        for event in sse_text(answer_chunks()[:3], done=False).split(b"\n\n")[:-1]:
            await wire.body(event + b"\n\n")
    else:
        data = json.dumps(completion()).encode()
        await wire.head(200, length=len(data))
        await wire.raw(data[: len(data) // 2])


# -- the wire itself ---------------------------------------------------------


@scenario("drop")
async def _drop(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """The connection closes as soon as the request is read."""


@scenario("garbage")
async def _garbage(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Bytes that are not HTTP at all, then the connection closes."""
    await wire.raw(b"\x00\xff\xfeNOT HTTP\r\n\x1b[31m\r\n\r\n" * 64)


@scenario("header_flood")
async def _header_flood(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """A header line that never ends, as fast as the client reads (64 MB at most)."""
    await wire.raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Flood: ")
    block = b"a" * (64 * 2**10)
    for _ in range(1024):
        await wire.raw(block)


#: How much a gzip bomb inflates to.
BOMB_BYTES = 256 * 2**20
_BOMBS: dict[bool, bytes] = {}


def _bomb(stream: bool) -> bytes:
    """A gzip body that inflates to :data:`BOMB_BYTES` of one valid reply."""
    if stream not in _BOMBS:
        import zlib

        packer = zlib.compressobj(1, zlib.DEFLATED, 31)
        block = b"a" * 2**20
        out = []
        if stream:
            first = sse_text([chunk({"role": "assistant", "content": ""})], done=False)
            out.append(packer.compress(first))
            step = HUGE_EVENT_BYTES
            event = sse_text([chunk({"content": "a" * step})], done=False)
            for _ in range(BOMB_BYTES // step):
                out.append(packer.compress(event))
            out.append(packer.compress(sse_text(answer_chunks(())[-2:])))
        else:
            head, tail = json.dumps(completion("@@")).encode().split(b"@@")
            out.append(packer.compress(head))
            for _ in range(BOMB_BYTES // len(block)):
                out.append(packer.compress(block))
            out.append(packer.compress(tail))
        out.append(packer.flush())
        _BOMBS[stream] = b"".join(out)
    return _BOMBS[stream]


@scenario("gzip_bomb")
async def _gzip_bomb(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """A few hundred KB on the wire, ``Content-Encoding: gzip``, 256 MB once inflated."""
    data = _bomb(stream)
    kind = "text/event-stream" if stream else "application/json"
    await wire.head(200, [("Content-Encoding", "gzip")], length=len(data), content_type=kind)
    await wire.raw(data)


@scenario("bad_utf8")
async def _bad_utf8(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Bytes that are not UTF-8 inside the JSON text."""
    plain = json.dumps(completion("@@")).encode().replace(b"@@", b"Hello \xff\xfe world")
    event = json.dumps(chunk({"content": "@@"})).encode().replace(b"@@", b"Hello \xff\xfe")
    await _reply(wire, stream, plain, [chunk({"role": "assistant", "content": ""}), event])


@scenario("reply_surrogate")
async def _reply_surrogate(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """A lone surrogate escape (``\\ud800``) in the reply's text: valid JSON, invalid text."""
    plain = with_raw(completion("@x@"), x='"Hello \\ud800 world"')
    event = with_raw(chunk({"content": "@x@"}), x='"Hello \\udfff"')
    chunks = [chunk({"role": "assistant", "content": ""}), event, *answer_chunks(())[-2:]]
    await _reply(wire, stream, plain, chunks)


@scenario("finish_weird")
async def _finish_weird(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """A finish reason that is a number."""
    chunks = answer_chunks()
    chunks[-2] = chunk(finish=5)
    await _reply(wire, stream, completion(finish=5), chunks)


@scenario("delta_bad")
async def _delta_bad(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """A streamed chunk whose delta is a string, among good ones (plain: message is one)."""
    chunks = answer_chunks()
    chunks.insert(1, chunk(choices=[{"index": 0, "delta": "oops", "finish_reason": None}]))
    plain = completion(choices=[{"index": 0, "message": "oops", "finish_reason": "stop"}])
    await _reply(wire, stream, plain, chunks)


async def _sse_bytes(wire: Wire, data: bytes) -> None:
    await wire.head(200, length=len(data), content_type="text/event-stream")
    await wire.raw(data)


@scenario("sse_multiline")
async def _sse_multiline(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Each event's JSON split over two ``data:`` lines (joined by a newline, per SSE)."""
    if not stream:
        await wire.answer(False)
        return
    out = b""
    for c in answer_chunks():
        text = json.dumps(c).encode()
        cut = text.index(b", ") + 1
        out += b"data: " + text[:cut] + b"\ndata: " + text[cut:] + b"\n\n"
    await _sse_bytes(wire, out + b"data: [DONE]\n\n")


@scenario("sse_crlf")
async def _sse_crlf(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Events ended by CRLF line endings."""
    if not stream:
        await wire.answer(False)
        return
    await _sse_bytes(wire, sse_text(answer_chunks()).replace(b"\n", b"\r\n"))


@scenario("sse_no_space")
async def _sse_no_space(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """``data:{...}`` without the optional space."""
    if not stream:
        await wire.answer(False)
        return
    await _sse_bytes(wire, sse_text(answer_chunks()).replace(b"data: ", b"data:"))


@scenario("sse_fields")
async def _sse_fields(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Comments, ``event:``, ``id:``, ``retry:`` and unknown fields around every event."""
    if not stream:
        await wire.answer(False)
        return
    extra = b": comment\nevent: message\nid: 7\nretry: 1000\nfoo: bar\n"
    events = sse_text(answer_chunks()).split(b"\n\n")[:-1]
    await _sse_bytes(wire, b"".join(extra + e + b"\n\n" for e in events))


@scenario("many_events")
async def _many_events(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """``arg`` (300,000) one-character events (plain: the same text at once)."""
    count = int(arg or 300_000)
    if not stream:
        await wire.json(completion("a" * count))
        return
    await wire.head(200, chunked=True, content_type="text/event-stream")
    await wire.body(sse_text([chunk({"role": "assistant", "content": ""})], done=False))
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'
    batch = 1000
    for _ in range(count // batch):
        await wire.body(event * batch)
    await wire.body(sse_text(answer_chunks(())[-2:]))
    await wire.end()


# -- output checks -----------------------------------------------------------


@scenario("text_and_tools")
async def _text_and_tools(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Text holding the forbidden word, and a tool call, in one reply."""
    text = "".join(TOOL_TEXT_PARTS)
    if not stream:
        await wire.json(completion(text, tool_calls=[TOOL_CALL], finish="tool_calls"))
        return
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": p}) for p in TOOL_TEXT_PARTS]
    chunks.append(chunk({"tool_calls": [dict(TOOL_CALL, index=0)]}))
    chunks += [chunk(finish="tool_calls"), chunk(usage=USAGE, choices=[])]
    await wire.sse(chunks)


@scenario("text_forbidden")
async def _text_forbidden(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """Text holding the forbidden word, no tool call."""
    await wire.answer(stream, parts=TOOL_TEXT_PARTS)


@scenario("cut_then_answer")
async def _cut_then_answer(wire: Wire, stream: bool, n: int, arg: str) -> None:
    """The first reply is cut after two whole sentences; later ones are whole.

    ``arg`` ``same`` retries into the same sentences, ``other`` into others.
    """
    if n > 0:
        parts = SENTENCES if arg != "other" else OTHER_SENTENCES
        await wire.answer(stream, parts=parts)
        return
    if stream:
        await wire.head(200, chunked=True, content_type="text/event-stream")
        chunks = answer_chunks((*SENTENCES[:2], "Thi"))[:4]
        for event in sse_text(chunks, done=False).split(b"\n\n")[:-1]:
            await wire.body(event + b"\n\n")
        # no terminating chunk: the stream is cut
    else:
        data = json.dumps(completion("".join(SENTENCES))).encode()
        await wire.head(200, length=len(data))
        await wire.raw(data[: len(data) // 2])


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class Server:
    """The asyncio server: routes requests to scenarios and counts them by tag."""

    def __init__(self) -> None:
        self.requests: dict[str, list[dict[str, Any]]] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # drain() waits until every byte is with the kernel: timing is the scenario's.
        writer.transport.set_write_buffer_limits(high=0)
        try:
            await asyncio.wait_for(self._serve(reader, writer), LIFETIME)
        except (
            OSError,
            asyncio.TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass
        except Exception:
            traceback.print_exc()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        body = await reader.readexactly(length) if length else b""
        wire = Wire(writer)
        parts = target.split("?", 1)[0].strip("/").split("/")
        if method == "GET" and len(parts) == 2 and parts[0] == "_count":
            seen = self.requests.get(parts[1], [])
            await wire.json({"count": len(seen), "requests": seen})
            return
        if len(parts) < 4 or parts[0] != "s" or parts[-1] != "completions":
            await wire.json({"error": {"message": f"no such path {target}"}}, 404)
            return
        name, _, arg = parts[1].partition("=")
        tag = parts[2]
        summary = _summary(body)
        seen = self.requests.setdefault(tag, [])
        n = len(seen)
        seen.append(summary)
        handler = SCENARIOS.get(name)
        if handler is None:
            await wire.json({"error": {"message": f"no such scenario {name}"}}, 404)
            return
        # Stop as soon as the client goes away (it sends nothing more after its request).
        served = asyncio.ensure_future(handler(wire, bool(summary.get("stream")), n, arg))
        gone = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait({served, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (served, gone):
                task.cancel()
            for task in (served, gone):
                with contextlib.suppress(BaseException):
                    await task
        if served.done() and not served.cancelled():
            error = served.exception()
            if error is not None and not isinstance(error, OSError):
                traceback.print_exception(error)


def _summary(body: bytes) -> dict[str, Any]:
    """What a test may ask about a request: stream flag, max_tokens, size."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return {"bytes": len(body), "parsed": False}
    if not isinstance(data, dict):
        return {"bytes": len(body), "parsed": False}
    return {
        "bytes": len(body),
        "parsed": True,
        "stream": bool(data.get("stream")),
        "max_tokens": data.get("max_tokens"),
        "model": data.get("model"),
    }


async def _main() -> None:
    server = Server()
    listener = await asyncio.start_server(
        server.handle, "127.0.0.1", 0, limit=2**20, reuse_address=True
    )
    for stream in (False, True):
        _huge_body("a", stream)
        _huge_body("words", stream)
        _bomb(stream)
    port = listener.sockets[0].getsockname()[1]
    print(f"port {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with listener:
        await stop.wait()


# --------------------------------------------------------------------------
# For tests: the server in its own process
# --------------------------------------------------------------------------


class HostileServer:
    """Starts this module as a server process on 127.0.0.1 and stops it (by its pid)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> HostileServer:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("port "):
            self.process.kill()
            self.process.wait(5)
            raise RuntimeError(f"the hostile server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        process = self.process
        if process is None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stdout is not None:
            process.stdout.close()

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_url(self, scenario: str, tag: str) -> str:
        """The ``base_url`` of a route that gets ``scenario``, counted under ``tag``."""
        return f"{self.root}/s/{scenario}/{tag}/v1"

    def requests(self, tag: str) -> list[dict[str, Any]]:
        """Summaries of the requests made under ``tag``."""
        with urllib.request.urlopen(f"{self.root}/_count/{tag}", timeout=10) as reply:
            data = json.loads(reply.read())
        return list(data["requests"])

    def count(self, tag: str) -> int:
        return len(self.requests(tag))


def _tags() -> Iterator[str]:
    for i in itertools.count(1):
        yield f"{os.getpid()}-{i}"


_TAGS = _tags()


def new_tag() -> str:
    """A tag no other case of this process uses: the server counts its requests apart."""
    return next(_TAGS)


if __name__ == "__main__":
    asyncio.run(_main())
