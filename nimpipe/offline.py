"""Offline (air-gapped) mode, enforced for the whole process at the socket level.

:func:`enforce` turns it on; while it is on, every way Python has of sending
a packet or a name lookup is checked *before* anything leaves the process,
and anything not allowed fails at once with
:class:`~nimpipe.errors.OfflineError` naming the host and the caller:

- sending: ``connect`` and ``connect_ex`` (TCP and UDP alike: a connected UDP
  socket sends with plain ``send``), ``sendto`` and ``sendmsg`` to an
  address.  Allowed: loopback addresses, the hosts of routes marked
  self-hosted (the ``hosts`` given to :func:`enforce`) and the addresses
  those names resolved to in this process.
- forward lookups: ``getaddrinfo``, ``gethostbyname``, ``gethostbyname_ex``,
  and the name in an address given to ``connect``, ``sendto``, ``sendmsg``
  or ``bind``.  Allowed: the allowed hosts, loopback addresses, and names
  that the hosts file (``/etc/hosts``) maps to a loopback address, which
  the resolver answers from the file.  ``localhost`` is one of those names
  only when the hosts file lists it, and a name under ``.localhost`` is
  refused unless the hosts file lists it: the system resolver does not
  special-case them and would send a DNS query.  Use ``127.0.0.1`` or list
  the name in the hosts file.
- reverse lookups: ``gethostbyaddr`` and ``getnameinfo``.  Allowed only for
  addresses and names the hosts file lists, as anything else is a DNS
  query.

No DNS query therefore leaves the process for a name that is not an allowed
route host, and no datagram or connection goes anywhere but loopback and the
allowed hosts, so nothing hangs.  This assumes the resolver reads the hosts
file before DNS (``hosts: files dns`` in ``/etc/nsswitch.conf``, the default).

How: a :func:`sys.addaudithook` hook sees the ``socket.*`` audit events
(``connect``, ``sendto``, ``sendmsg``, ``getaddrinfo``, ``gethostbyname``,
``gethostbyaddr``, ``getnameinfo``).  CPython resolves a name in a socket
address *before* it raises ``socket.connect``, ``socket.sendto`` or
``socket.sendmsg``, so :func:`enforce` also wraps those methods (and ``bind``)
of :class:`socket.socket` to check the name first, and wraps
:func:`socket.getaddrinfo` to learn the addresses allowed names resolve to.
Both are installed once per process; audit hooks cannot be removed, so they
check a switch (:func:`disable`).

The hook also counts what it allows and refuses (:func:`stats`), so tests and
operators can prove that a run touched nothing but the allowed hosts.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from nimpipe.errors import OfflineError

__all__ = ["allowed_hosts", "disable", "enforce", "is_enforced", "reset_stats", "stats"]

_lock = threading.Lock()
_installed = False
_enabled = False
_allowed: frozenset[str] = frozenset()
#: Addresses that allowed names resolved to while offline mode was on.
_resolved: set[str] = set()
#: The hosts file: names mapped to a loopback address, and every name and address listed.
_hosts_loopback: frozenset[str] = frozenset()
_hosts_listed: frozenset[str] = frozenset()
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
    "urllib.request",
    "http.client",
    "nimpipe.offline",
    "concurrent.futures",
    "threading",
)


def _hosts_file() -> Path:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        root = os.environ.get("SYSTEMROOT", r"C:\Windows")
        return Path(root) / "System32" / "drivers" / "etc" / "hosts"
    return Path("/etc/hosts")


def _read_hosts_file(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(names mapped to a loopback address, every name and address listed) of ``path``."""
    loopback: set[str] = set()
    listed: set[str] = set()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset(), frozenset()
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        address = _normalise(fields[0])
        if _ip(address) is None:
            continue
        names = [name.lower() for name in fields[1:]]
        listed.add(address)
        listed.update(names)
        if _is_loopback_address(address):
            loopback.update(names)
    return frozenset(loopback), frozenset(listed)


def _normalise(host: str) -> str:
    host = host.strip().lower().strip("[]")
    address = _ip(host)
    return str(address) if address is not None else host


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_loopback_address(host: str) -> bool:
    address = _ip(host)
    return address is not None and address.is_loopback


def enforce(hosts: Iterable[str] = ()) -> None:
    """Turn offline mode on: only loopback and ``hosts`` may be reached.

    Reads the hosts file (a local file, no lookup) to know which names the
    resolver answers without DNS.
    """
    global _installed, _enabled, _allowed, _hosts_loopback, _hosts_listed
    loopback, listed = _read_hosts_file(_hosts_file())
    with _lock:
        _allowed = frozenset(_normalise(h) for h in hosts if h)
        _resolved.clear()
        _hosts_loopback, _hosts_listed = loopback, listed
        _enabled = True
        if not _installed:
            _install()
            _installed = True


def disable() -> None:
    """Turn offline mode off (the checks stay installed but let everything through)."""
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


# --------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------


def _may_send_to(host: str) -> bool:
    """Whether a connection or datagram may go to ``host`` (an address or a name)."""
    if _ip(host) is None:
        return _may_look_up(host)
    return _is_loopback_address(host) or host in _allowed or host in _resolved


def _may_look_up(host: str) -> bool:
    """Whether ``host`` may be resolved: answered without DNS, or an allowed route host."""
    if _ip(host) is not None:
        return _may_send_to(host)  # a literal address is not looked up; where it goes matters
    return host in _allowed or host in _hosts_loopback


def _may_look_up_reverse(host: str) -> bool:
    """Whether a reverse lookup of ``host`` is answered from the hosts file."""
    return host in _hosts_listed


#: Audit event -> (how to find the host in its arguments, the rule, what is refused).
_EVENTS: dict[str, tuple[Callable[[tuple[Any, ...]], Any], Callable[[str], bool], str]] = {
    "socket.connect": (lambda args: _host_of_address(args[1]), _may_send_to, "connection to"),
    "socket.sendto": (lambda args: _host_of_address(args[1]), _may_send_to, "datagram to"),
    "socket.sendmsg": (lambda args: _host_of_address(args[1]), _may_send_to, "datagram to"),
    "socket.getaddrinfo": (lambda args: args[0], _may_look_up, "lookup of"),
    "socket.gethostbyname": (lambda args: args[0], _may_look_up, "lookup of"),
    "socket.gethostbyaddr": (lambda args: args[0], _may_look_up_reverse, "reverse lookup of"),
    "socket.getnameinfo": (
        lambda args: _host_of_address(args[0]),
        _may_look_up_reverse,
        "reverse lookup of",
    ),
}


def _host_of_address(address: Any) -> str | None:
    if isinstance(address, tuple) and address and isinstance(address[0], (str, bytes)):
        host = address[0]
        return host.decode("ascii", "replace") if isinstance(host, bytes) else host
    return None  # AF_UNIX paths, AF_NETLINK and other families are local by nature


def _check(host: Any, rule: Callable[[str], bool], what: str) -> None:
    """Count ``host`` as allowed, or count and refuse it with :class:`OfflineError`."""
    if host is None:
        return
    text = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
    if not text:
        return  # the wildcard address / a passive lookup: nothing leaves
    normal = _normalise(text)
    if rule(normal):
        with _lock:
            _counts[f"allowed:{normal}"] += 1
        return
    with _lock:
        _counts[f"refused:{normal}"] += 1
    hint = ""
    if normal.endswith(".localhost") or normal == "localhost":
        hint = f" ({text} is not in {_hosts_file()}, so the resolver would ask DNS; use 127.0.0.1)"
    raise OfflineError(
        f"offline mode: {what} {text} refused (caller: {_caller()}); only loopback "
        f"and self-hosted routes may be reached{hint}",
        host=text,
    )


def _caller() -> str:
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(_PLUMBING):
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    # e.g. asyncio's getaddrinfo, which resolves in an executor thread
    return f"unknown, in thread {threading.current_thread().name}"


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _enabled:
        return
    checked = _EVENTS.get(event)
    if checked is None:
        return
    find, rule, what = checked
    _check(find(args), rule, what)


# --------------------------------------------------------------------------
# Wrappers: names in socket addresses are resolved before the audit event
# --------------------------------------------------------------------------


def _name_in(address: Any) -> str | None:
    """The host of ``address`` if it is a name the call would resolve (not a literal)."""
    host = _host_of_address(address)
    if host and _ip(_normalise(host)) is None:
        return host
    return None


def _guard_method(name: str, address_at: int, what: str) -> None:
    original = getattr(socket.socket, name)

    @functools.wraps(original)
    def guarded(self: socket.socket, *args: Any) -> Any:
        if _enabled and self.family in (socket.AF_INET, socket.AF_INET6):
            index = address_at if address_at >= 0 else len(args) + address_at
            if 0 <= index < len(args):
                host = _name_in(args[index])
                if host is not None and not _may_look_up(_normalise(host)):
                    _check(host, _may_look_up, what)
        return original(self, *args)

    setattr(socket.socket, name, guarded)


#: The resolver :func:`socket.getaddrinfo` wraps (set when the checks are installed).
_real_getaddrinfo: Callable[..., Any] = socket.getaddrinfo


def _guard_getaddrinfo() -> None:
    global _real_getaddrinfo
    _real_getaddrinfo = socket.getaddrinfo

    @functools.wraps(_real_getaddrinfo)
    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        result = _real_getaddrinfo(host, *args, **kwargs)
        if _enabled and isinstance(host, (str, bytes)):
            text = host.decode("ascii", "replace") if isinstance(host, bytes) else host
            if _normalise(text) in _allowed:
                found = {_normalise(str(info[4][0])) for info in result if info[4]}
                with _lock:
                    _resolved.update(found)
        return result

    socket.getaddrinfo = getaddrinfo


def _install() -> None:
    sys.addaudithook(_audit)
    _guard_method("connect", 0, "connection to")
    _guard_method("connect_ex", 0, "connection to")
    # sendto(data, address) or sendto(data, flags, address); sendmsg's address is its 4th.
    _guard_method("sendto", -1, "datagram to")
    _guard_method("sendmsg", 3, "datagram to")
    _guard_method("bind", 0, "lookup of")
    _guard_getaddrinfo()
