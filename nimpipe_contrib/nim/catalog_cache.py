"""What an endpoint's ``/v1/models`` said, and when; kept on disk between runs.

One JSON file per endpoint (named by a hash of its URL) under the
catalog's ``cache_dir``, so a later start knows the context windows with
the server unreachable.  An unreadable file is ignored with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

import attrs

from nimpipe_contrib.nim.endpoints import ModelCard, cards_from_dicts

__all__ = ["EndpointCatalog", "read_cache", "write_cache"]

#: Version of the disk cache's file format.
_CACHE_FORMAT = 1

log = logging.getLogger("nimpipe.catalog")


@attrs.frozen(kw_only=True)
class EndpointCatalog:
    """What one endpoint's ``/v1/models`` said, and when."""

    endpoint: str
    cards: tuple[ModelCard, ...] = ()
    #: Wall-clock time of the answer the cards come from (``None``: never answered).
    fetched_at: float | None = None
    #: ``server`` (asked in this process), ``disk`` (read from the cache) or ``none``.
    origin: str = "none"
    #: Why the last fetch failed, if it did.
    error: str | None = None
    #: Whether the last fetch attempt was skipped (offline, or hosted fetching off).
    skipped: str | None = None

    def age(self, now: float | None = None) -> float | None:
        """Seconds since the answer, or ``None``."""
        if self.fetched_at is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.fetched_at)

    def fresh(self, ttl: float, now: float | None = None) -> bool:
        """Whether the answer is younger than ``ttl``."""
        age = self.age(now)
        return age is not None and age < ttl

    def card(self, model_id: str) -> ModelCard | None:
        """The card of ``model_id``, or ``None``."""
        return next((c for c in self.cards if c.id == model_id), None)


def _cache_file(directory: Path, url: str) -> Path:
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:20]
    return directory / f"{digest}.json"


def read_cache(directory: Path, url: str) -> EndpointCatalog | None:
    """The cached catalog of endpoint ``url`` in ``directory``; ``None`` if none is usable."""
    path = _cache_file(directory, url)
    try:
        data = json.loads(path.read_text("utf-8"))
        if data.get("format") != _CACHE_FORMAT or data.get("endpoint") != url:
            return None
        fetched_at = float(data["fetched_at"])
        cards = cards_from_dicts(data["models"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the unreadable catalog cache %s: %s", path, exc)
        return None
    return EndpointCatalog(endpoint=url, cards=tuple(cards), fetched_at=fetched_at, origin="disk")


def write_cache(directory: Path, entry: EndpointCatalog) -> None:
    """Store ``entry`` (atomically: a reader sees the old file or the new); logs a failure."""
    path = _cache_file(directory, entry.endpoint)
    payload = {
        "format": _CACHE_FORMAT,
        "endpoint": entry.endpoint,
        "fetched_at": entry.fetched_at,
        "models": [c.to_dict() for c in entry.cards],
    }
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(payload, indent=1), "utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the catalog cache %s: %s", path, exc)
