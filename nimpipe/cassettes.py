"""Recorded cassettes of model calls: how they are matched, and no key in them.

Replay is how users' tests and ``nimpipe demo --replay`` run offline; the
pytest plugin (:mod:`nimpipe.testing.pytest_plugin`) and the demo both take
their vcrpy settings from :func:`vcr_settings`.  Requests are matched on
method, URL and body, so a different prompt never gets a recorded answer.

What nimpipe writes to a cassette: no key, wherever the client sent it or a
server echoed it.
vcrpy calls :func:`scrub_request` on every request it records and on every
request it matches against a cassette (so both sides of a match are
scrubbed alike), and :func:`scrub_response` on every response it records.
Both mask every registered secret and everything key-shaped
(:func:`nimpipe.redaction.scrub`): in the URL, the headers (names and
values) and the body.  Credential headers are dropped outright.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nimpipe.redaction import scrub, scrub_data

__all__ = [
    "MATCH_ON",
    "SCRUBBED_HEADERS",
    "SCRUBBED_RESPONSE_HEADERS",
    "replaying",
    "scrub_request",
    "scrub_response",
    "vcr_settings",
]

#: What a request is matched on when replayed.
MATCH_ON = ("method", "scheme", "host", "port", "path", "query", "body")

#: Request headers never written to a cassette.
SCRUBBED_HEADERS = ("authorization", "api-key", "x-api-key", "openai-organization", "cookie")
#: Response headers never written to a cassette.
SCRUBBED_RESPONSE_HEADERS = ("set-cookie",)


def scrub_request(request: Any) -> Any:
    """A vcrpy request with its credential headers dropped and every secret masked."""
    headers = {}
    for name, value in request.headers.items():
        if name.lower() in SCRUBBED_HEADERS:
            continue
        headers[scrub(name)] = scrub_data(value)
    request.headers = headers
    request.uri = scrub(request.uri)
    body = request.body
    if isinstance(body, (bytes, str)):
        request.body = scrub_data(body)
    return request


def scrub_response(response: dict[str, Any]) -> dict[str, Any]:
    """A vcrpy response dict with cookies dropped and every secret masked (body included)."""
    headers = response.get("headers")
    if isinstance(headers, Mapping):
        response["headers"] = {
            name: values
            for name, values in headers.items()
            if name.lower() not in SCRUBBED_RESPONSE_HEADERS
        }
    body = response.get("body")
    before = body.get("string") if isinstance(body, Mapping) else None
    response = scrub_data(response)
    after = response["body"].get("string") if isinstance(response.get("body"), Mapping) else None
    if after is not before and isinstance(after, (bytes, str)):
        _set_content_length(response, len(after.encode() if isinstance(after, str) else after))
    return response


def _set_content_length(response: dict[str, Any], length: int) -> None:
    headers = response.get("headers")
    if not isinstance(headers, dict):
        return
    for name in list(headers):
        if name.lower() == "content-length":
            headers[name] = [str(length)] if isinstance(headers[name], list) else str(length)


def vcr_settings(cassette_dir: str | Path, record_mode: str = "none") -> dict[str, Any]:
    """The vcrpy settings nimpipe uses: replay-only, matched on the body, every secret masked."""
    return {
        "cassette_library_dir": str(cassette_dir),
        "record_mode": record_mode,
        "match_on": MATCH_ON,
        "filter_headers": list(SCRUBBED_HEADERS),
        "before_record_request": scrub_request,
        "before_record_response": scrub_response,
        "decode_compressed_response": True,
    }


@contextlib.contextmanager
def replaying(path: Path, record_mode: str = "none") -> Iterator[Any]:
    """Answer model calls from the cassette at ``path`` (``record_mode`` as vcrpy's).

    :raises ImportError: with the install line, when vcrpy is missing.
    """
    try:
        import vcr
    except ImportError:
        raise ImportError("cassettes need vcrpy: pip install 'nimpipe[testing]'") from None
    settings = vcr_settings(path.parent, record_mode)
    settings.pop("cassette_library_dir")
    with vcr.VCR(**settings).use_cassette(str(path)) as cassette:
        yield cassette
