"""The endpoints behind routes, and what an endpoint's ``/v1/models`` answers.

An *endpoint* is one OpenAI-compatible base URL (``http://HOST:8000/v1``);
several routes may share it (one per model it serves).  The catalog and the
health stages key what they know by endpoint, so two routes on one container
cost one probe.  :func:`format_error` says in one line why a request to an
endpoint failed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from nimpipe.stage import host_of, is_private_address
from nimpipe.types import Route

__all__ = [
    "Endpoint",
    "ModelCard",
    "cards_from_dicts",
    "endpoint_url",
    "endpoints_of",
    "format_error",
    "parse_model_list",
]


def endpoint_url(base_url: str) -> str:
    """The key of an endpoint: its base URL without a trailing slash."""
    return base_url.rstrip("/")


@attrs.frozen
class Endpoint:
    """One base URL and the routes that use it."""

    url: str
    #: Names of the routes on this endpoint, in configuration order.
    routes: tuple[str, ...] = ()
    #: The models those routes ask for.
    models: tuple[str, ...] = ()
    #: Whether any route on it is self-hosted (config's ``self_hosted``).
    self_hosted: bool = False
    #: Whether its host is a loopback or private address (usable offline).
    local: bool = False
    #: Headers probes send: the first route's key as ``Authorization`` and route headers.
    headers: Mapping[str, str] = attrs.field(factory=dict, eq=False, hash=False, repr=False)

    @property
    def root_url(self) -> str:
        """The server root: the base URL without its ``/v1`` (where vLLM serves ``/metrics``)."""
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url

    def may_probe(self, *, offline: bool) -> bool:
        """Whether a request to this endpoint is allowed (offline: only local ones)."""
        return not offline or self.local or self.self_hosted


def endpoints_of(routes: Iterable[Route]) -> list[Endpoint]:
    """Group routes by base URL, in the order the routes come."""
    grouped: dict[str, list[Route]] = {}
    for route in routes:
        grouped.setdefault(endpoint_url(route.base_url), []).append(route)
    endpoints = []
    for url, members in grouped.items():
        headers: dict[str, str] = {}
        for route in members:
            for key, value in route.headers.items():
                headers.setdefault(key, value)
        keyed = next((r for r in members if r.api_key), None)
        if keyed is not None and keyed.api_key is not None:
            headers["Authorization"] = f"Bearer {keyed.api_key.reveal()}"
        endpoints.append(
            Endpoint(
                url=url,
                routes=tuple(r.name for r in members),
                models=tuple(dict.fromkeys(r.model for r in members)),
                self_hosted=any(r.self_hosted for r in members),
                local=bool(is_private_address(host_of(url))),
                headers=headers,
            )
        )
    return endpoints


@attrs.frozen
class ModelCard:
    """One entry of a ``/v1/models`` reply.

    ``max_model_len`` is the context window a self-hosted NIM (or vLLM)
    reports; the hosted catalog and llama.cpp leave it out.  ``parent`` names
    the base model of a LoRA adapter.
    """

    id: str
    owned_by: str | None = None
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    created: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what the disk cache stores)."""
        return attrs.asdict(self)


def _optional_str(card: Mapping[str, Any], key: str, index: int) -> str | None:
    value = card.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"model {index}: {key!r} must be a string or null, got {value!r}")


def _optional_int(card: Mapping[str, Any], key: str, index: int) -> int | None:
    value = card.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"model {index}: {key!r} must be a non-negative integer, got {value!r}")
    return value


def parse_model_list(body: bytes | str | Any) -> list[ModelCard]:
    """Read a ``/v1/models`` reply (raw bytes, text or parsed JSON).

    Raises :class:`ValueError` with a message that says what is wrong: not
    JSON, no ``data`` list, an entry without a string ``id``, a field of the
    wrong type.
    """
    if isinstance(body, (bytes, str)):
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ValueError(f"not JSON ({exc})") from None
    else:
        data = body
    if not isinstance(data, Mapping):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    entries = data.get("data")
    if not isinstance(entries, list):
        raise ValueError("no 'data' list of models")
    cards = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
            raise ValueError(f"model {index} has no string 'id'")
        cards.append(
            ModelCard(
                id=entry["id"],
                owned_by=_optional_str(entry, "owned_by", index),
                root=_optional_str(entry, "root", index),
                parent=_optional_str(entry, "parent", index),
                max_model_len=_optional_int(entry, "max_model_len", index),
                created=_optional_int(entry, "created", index),
            )
        )
    return cards


def cards_from_dicts(items: Sequence[Mapping[str, Any]]) -> list[ModelCard]:
    """Cards from their :meth:`ModelCard.to_dict` form (the disk cache); bad entries raise."""
    return parse_model_list({"data": list(items)})


def _root_causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def format_error(exc: BaseException, url: str, timeout: float | None = None) -> str:
    """A one-line, human explanation of a failed HTTP request to ``url``."""
    name = type(exc).__name__
    text = str(exc) or name
    chain = _root_causes(exc)
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "refused" in text.lower():
        return f"connection refused at {url}"
    if "ConnectError" in name:
        lowered = " ".join(str(e) for e in chain).lower()
        if "name or service not known" in lowered or "nodename nor servname" in lowered:
            return f"cannot resolve the host of {url}"
        return f"cannot connect to {url}: {text}"
    if "Timeout" in name:
        after = f" after {timeout:g} s" if timeout else ""
        return f"no answer from {url}{after} ({name})"
    if name in ("RemoteProtocolError", "ReadError", "WriteError"):
        return f"{url} closed the connection without a complete answer ({text})"
    return f"{url}: {name}: {text}"
