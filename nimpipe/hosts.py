"""Classifying endpoint hosts: loopback, private (self-hosted) or unknown."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["host_of", "is_loopback", "is_private_address"]

_PRIVATE_V4 = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")
)
_PRIVATE_V6 = tuple(ipaddress.ip_network(n) for n in ("::1/128", "fe80::/10", "fc00::/7"))


def host_of(url: str) -> str:
    """The host name or address of ``url`` (no port, no brackets, lower case)."""
    return (urlsplit(url).hostname or "").lower()


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback address (v4 or v6)."""
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    addr = _address(host)
    return addr is not None and addr.is_loopback


def is_private_address(host: str) -> bool | None:
    """Whether ``host`` is self-hosted by address.

    True for loopback (v4 and v6), 10/8, 172.16/12, 192.168/16, link-local
    and IPv6 unique-local addresses; False for any other literal address;
    ``None`` for a DNS name, which is neither assumed public nor private:
    say so in the route's config (``self_hosted = true``).
    """
    if is_loopback(host):
        return True
    addr = _address(host)
    if addr is None:
        return None
    networks = _PRIVATE_V4 if addr.version == 4 else _PRIVATE_V6
    return any(addr in net for net in networks)
