"""What a NIM test server remembers of each request it received."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

__all__ = ["Incoming", "RecordedRequest", "mask_headers"]

_MASKED_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key"})
_UNPARSED = object()


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """A request the server received (admin requests are not recorded).

    ``headers`` has lower-case names; credentials (``authorization`` and API
    key headers) are masked.  ``body`` is the parsed JSON body, or ``None``
    when the body is empty or not JSON.  ``time`` is ``time.time()`` when the
    request was read.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    time: float

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as returned by ``GET /_admin/requests``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecordedRequest:
        """Inverse of :meth:`to_dict`."""
        return cls(
            method=data["method"],
            path=data["path"],
            query=data.get("query", ""),
            headers=dict(data.get("headers", {})),
            body=data.get("body"),
            time=float(data.get("time", 0.0)),
        )


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with the value of every credential header masked (the scheme is kept)."""
    masked = dict(headers)
    for name in _MASKED_HEADERS & masked.keys():
        scheme, sep, _ = masked[name].partition(" ")
        masked[name] = f"{scheme} ***" if sep else "***"
    return masked


class Incoming:
    """One request as read off the wire: the raw target split, lower-case headers, the body.

    ``path`` and ``query`` are the raw (still percent-encoded) parts of the
    request target, which is what faults match and records keep.
    """

    __slots__ = ("_json", "body", "headers", "method", "path", "query")

    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path, _, self.query = target.partition("?")
        self.headers = headers
        self.body = body
        self._json: Any = _UNPARSED

    @property
    def json(self) -> Any:
        """The parsed JSON body; ``None`` when empty or invalid."""
        if self._json is _UNPARSED:
            try:
                self._json = json.loads(self.body) if self.body else None
            except ValueError:
                self._json = None
        return self._json

    @property
    def model(self) -> str | None:
        """The ``model`` the JSON body names, if any."""
        body = self.json
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            return body["model"]
        return None

    @property
    def wants_stream(self) -> bool:
        """Whether the JSON body asks for an SSE stream."""
        body = self.json
        return isinstance(body, dict) and body.get("stream") is True

    def record(self, now: float) -> RecordedRequest:
        """The request as :attr:`NimServer.requests` keeps it, credentials masked."""
        return RecordedRequest(
            self.method, self.path, self.query, mask_headers(self.headers), self.json, now
        )
