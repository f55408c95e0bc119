"""Self-hosted detection by address."""

from __future__ import annotations

import pytest

from nimpipe.hosts import host_of, is_loopback, is_private_address


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("172.31.255.254", True),
        ("172.32.0.1", False),
        ("192.168.1.1", True),
        ("169.254.10.10", True),
        ("fe80::1", True),
        ("fd00::5", True),
        ("8.8.8.8", False),
        ("2001:4860::8888", False),
        ("::ffff:10.0.0.1", True),
        ("integrate.api.nvidia.com", None),
        ("nim.internal", None),
    ],
)
def test_private_detection(host: str, expected: bool | None) -> None:
    assert is_private_address(host) is expected


def test_host_of_strips_port_and_brackets() -> None:
    assert host_of("http://[::1]:8000/v1") == "::1"
    assert host_of("https://User@Example.COM:443/v1") == "example.com"
    assert is_loopback(host_of("http://[::1]:8000/v1"))
    assert not is_loopback("10.0.0.1")
