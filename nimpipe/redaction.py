"""What an API key looks like, and how nimpipe keeps keys out of text it emits.

One definition serves every place that must not leak a key: error messages
(:class:`~nimpipe.errors.ProviderError` scrubs its own message), the ledger's
text columns, the ``pii_redactor`` stage, the config check that refuses keys
written in files, and the test that scans the repository for committed
credentials.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["API_KEY", "MASK", "scrub"]

#: Credential-shaped tokens: OpenAI, NVIDIA, GitHub, Slack, AWS, Google keys and JWTs.
API_KEY = re.compile(
    r"(?<![\w-])(?:"
    r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"
    r"|nvapi-[A-Za-z0-9_-]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{30,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|AKIA[0-9A-Z]{16}"
    r"|AIza[0-9A-Za-z_-]{35}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r")(?![\w-])"
)

#: A bearer token as it appears in echoed headers.
_BEARER = re.compile(r"(?i:bearer)\s+[A-Za-z0-9._~+/=-]{8,}")

#: What a scrubbed secret is replaced with.
MASK = "***"


def scrub(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with every known secret, key-shaped token and bearer token masked."""
    for secret in known:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    text = _BEARER.sub(f"Bearer {MASK}", text)
    return API_KEY.sub(MASK, text)
