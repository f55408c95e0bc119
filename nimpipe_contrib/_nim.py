"""What the NIM stages share: the endpoints behind routes, and the ``/v1/models`` reply.

An *endpoint* is one OpenAI-compatible base URL (``http://HOST:8000/v1``);
several routes may share it (one per model it serves).  The catalog and the
health stages key what they know by endpoint, so two routes on one container
cost one probe.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from nimpipe.errors import ConfigError
from nimpipe.hosts import host_of, is_private_address
from nimpipe.types import Route

__all__ = [
    "Endpoint",
    "ModelCard",
    "SettingsReader",
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


def format_error(exc: BaseException, url: str, timeout: float | None = None) -> str:
    """A one-line, human explanation of a failed HTTP request to ``url``."""
    name = type(exc).__name__
    text = str(exc) or name
    if "ConnectError" in name:
        lowered = text.lower()
        if "refused" in lowered:
            return f"connection refused at {url}"
        if "name or service not known" in lowered or "nodename nor servname" in lowered:
            return f"cannot resolve the host of {url}"
        return f"cannot connect to {url}: {text}"
    if "Timeout" in name:
        after = f" after {timeout:g} s" if timeout else ""
        return f"no answer from {url}{after} ({name})"
    if name in ("RemoteProtocolError", "ReadError", "WriteError"):
        return f"{url} closed the connection without a complete answer ({text})"
    return f"{url}: {name}: {text}"


@attrs.define
class SettingsReader:
    """Reads a stage's ``[stages.NAME]`` table; every error names the file and the key.

    Call :meth:`done` last: any key not read is refused as unknown.
    """

    stage: str
    table: Mapping[str, Any]
    source: str | None = None
    _read: set[str] = attrs.field(factory=set, init=False)

    def _fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(problem, path=self.source, key=f"stages.{self.stage}.{key}")

    def _get(self, key: str) -> Any:
        self._read.add(key)
        return self.table.get(key)

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        """A number of at least ``minimum`` (strings from the environment are converted)."""
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise self._fail(key, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, f"must be a number, got {value!r}")
        if value < minimum:
            raise self._fail(key, f"must be at least {minimum:g}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        """A whole number of at least ``minimum``."""
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer, got {value!r}")
        if value < minimum:
            raise self._fail(key, f"must be at least {minimum}, got {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        """``true``/``false`` (or the usual strings: 1/0, yes/no, on/off)."""
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        raise self._fail(key, f"must be true or false, got {value!r}")

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        """One of ``choices``."""
        value = self._get(key)
        if value is None:
            return default
        if value not in choices:
            raise self._fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def path(self, key: str) -> Path | None:
        """A file or directory path (``~`` expanded), or ``None`` when not set."""
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self._fail(key, f"must be a path, got {value!r}")
        return Path(value.strip()).expanduser()

    def done(self) -> None:
        """Refuse keys that no reader asked for."""
        unknown = sorted(set(self.table) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            raise self._fail(unknown[0], f"unknown setting (known: {known})")
