"""Offline (air-gapped) mode, enforced for the whole process at the socket level.

:func:`enforce` installs a :func:`sys.addaudithook` hook (once per process;
audit hooks cannot be removed, so the hook checks a switch).  While offline
mode is on, every ``socket.connect`` and every ``socket.getaddrinfo`` is
checked before it happens: loopback and the hosts of routes marked
self-hosted are allowed; anything else fails at once with
:class:`~nimpipe.errors.OfflineError` naming the host and the caller.  No DNS
query leaves the process for a host that is not allowed, so nothing hangs.

The hook also counts what it allows and refuses (:func:`stats`), so tests and
operators can prove that a run touched nothing but the allowed hosts.
"""

from __future__ import annotations

import ipaddress
import sys
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

from nimpipe.errors import OfflineError
from nimpipe.hosts import is_loopback

__all__ = ["allowed_hosts", "disable", "enforce", "is_enforced", "reset_stats", "stats"]

_lock = threading.Lock()
_installed = False
_enabled = False
_allowed: frozenset[str] = frozenset()
_counts: Counter[str] = Counter()

#: Modules skipped when naming the caller of a refused connection.
_PLUMBING = (
    "socket",
    "ssl",
    "selectors",
    "asyncio",
    "anyio",
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore2",
    "h11",
    "openai",
    "urllib3",
    "http.client",
    "nimpipe.offline",
    "concurrent.futures",
    "threading",
)


def _normalise(host: str) -> str:
    host = host.strip().lower().strip("[]")
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return host


def enforce(hosts: Iterable[str] = ()) -> None:
    """Turn offline mode on: only loopback and ``hosts`` may be reached."""
    global _installed, _enabled, _allowed
    with _lock:
        _allowed = frozenset(_normalise(h) for h in hosts if h)
        _enabled = True
        if not _installed:
            sys.addaudithook(_audit)
            _installed = True


def disable() -> None:
    """Turn offline mode off (the audit hook stays installed but lets everything through)."""
    global _enabled
    with _lock:
        _enabled = False


def is_enforced() -> bool:
    """Whether offline mode is on in this process."""
    return _enabled


def allowed_hosts() -> frozenset[str]:
    """The non-loopback hosts offline mode allows."""
    return _allowed


def stats() -> dict[str, int]:
    """Counts of checked operations: ``allowed:HOST`` and ``refused:HOST`` keys."""
    with _lock:
        return dict(_counts)


def reset_stats() -> None:
    """Forget the counts."""
    with _lock:
        _counts.clear()


def _allowed_host(host: str) -> bool:
    if not host:
        return True
    host = _normalise(host)
    return is_loopback(host) or host in _allowed


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(_PLUMBING):
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "unknown"


def _host_of_address(address: Any) -> str | None:
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        return address[0]
    return None  # AF_UNIX paths and other families are local by nature


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _enabled:
        return
    if event == "socket.connect":
        host = _host_of_address(args[1])
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
    else:
        return
    if host is None:
        return
    host = str(host)
    if _allowed_host(host):
        with _lock:
            _counts[f"allowed:{_normalise(host)}"] += 1
        return
    with _lock:
        _counts[f"refused:{_normalise(host)}"] += 1
    raise OfflineError(
        f"offline mode: connection to {host} refused (caller: {_caller()}); only loopback "
        f"and self-hosted routes may be reached",
        host=host,
    )
