"""A NIM-shaped HTTP server for tests, benchmarks and demos.

:class:`NimServer` speaks the parts of the NVIDIA NIM for LLMs API that
nimpipe uses, with the same JSON shapes as a self-hosted NIM (vLLM behind an
OpenAI-compatible front end):

- ``POST /v1/chat/completions``, streaming (SSE) and not, with tool calls,
  ``usage``, ``max_tokens`` truncation and context-length errors;
- ``GET /v1/models`` (and ``/v1/models/{id}``) with ``max_model_len`` and
  ``parent`` for LoRA adapters;
- ``GET /v1/health/live`` and ``GET /v1/health/ready`` with a loading phase;
- ``GET /v1/metrics`` (also ``/metrics``): Prometheus text with the NIM metric
  names, or the ``vllm:`` names;
- ``POST /tokenize`` (also ``/v1/tokenize``) whose counts agree with ``usage``.

Replies are deterministic: ``"NIM reply to: <text of the last message>"``
unless a ``reply``/``replies`` setting says otherwise. Token counts are words:
``prompt_tokens`` is the number of whitespace-separated words in all message
contents plus 3 per message (:func:`count_prompt_tokens`), ``completion_tokens``
the number of words in the reply.  A request whose ``tools`` is non-empty and
whose last message is a user message containing ``call tool NAME`` (optionally
followed by a JSON object of arguments) is answered with a tool call.

Tests script failures with :meth:`NimServer.inject` (see :data:`FAULT_KINDS`)
and inspect traffic with :meth:`NimServer.stats` and :attr:`NimServer.requests`.

The server is an aiohttp application with keep-alive.  It runs either in a
daemon thread of the test process (``with NimServer() as srv: ...``) or as
its own process::

    python -m nimpipe.testing.nim_server --port 8000 --latency 0.05

which prints ``READY http://127.0.0.1:PORT/v1`` once listening and serves until
SIGTERM or SIGINT.  A server in another process is driven over its admin
endpoints (``/_admin/config``, ``/_admin/fault``, ``/_admin/stats``,
``/_admin/requests``, ``/_admin/ready``, ``/_admin/reset``), most easily
through :class:`RemoteNimServer` or :class:`NimServerProcess`.

The modules, one job each: ``settings`` (what is served), ``faults`` (what
can go wrong and how it answers), ``replies`` (reply bodies and the word
tokenizer), ``metrics`` (the Prometheus page), ``records`` (what a request
leaves behind), ``state`` (the server's mutable state), ``exchange`` (writing
one answer), ``app`` (the aiohttp routes), ``admin`` (the admin API),
``server`` (the thread runner) and ``process`` (another process, the command
line).  Importing this package is cheap: aiohttp and asyncio load when a
server starts.
"""

from __future__ import annotations

from nimpipe.testing.nim_server.faults import FAULT_KINDS, Fault
from nimpipe.testing.nim_server.process import NimServerProcess, RemoteNimServer, main
from nimpipe.testing.nim_server.records import RecordedRequest
from nimpipe.testing.nim_server.replies import count_prompt_tokens, count_words
from nimpipe.testing.nim_server.server import NimServer, closed_port_url
from nimpipe.testing.nim_server.settings import DEFAULT_MODEL, NimSettings

__all__ = [
    "DEFAULT_MODEL",
    "FAULT_KINDS",
    "Fault",
    "NimServer",
    "NimServerProcess",
    "NimSettings",
    "RecordedRequest",
    "RemoteNimServer",
    "closed_port_url",
    "count_prompt_tokens",
    "count_words",
    "main",
]
