"""What an API key looks like, and how nimpipe keeps keys out of text it emits.

One definition serves every place that must not leak a key: errors (every
:class:`~nimpipe.errors.NimpipeError` scrubs its message, its attributes and
the exceptions it is chained to), log records, cassettes, guardrails verdicts,
the ledger's text columns, the ``pii_redactor`` stage, the config check that
refuses keys written in files, and the test that scans the repository for
committed credentials.

Two kinds of secret are masked:

- every value held by a :class:`~nimpipe.types.Secret` (they register
  themselves here when created), in the forms a server may echo it in: as it
  is, URL-encoded, JSON-escaped and base64-encoded (also inside a longer
  base64 text, such as a ``Basic`` credential), and what is left of it where
  a message was cut short (12 or more of its first or last characters);
- anything credential-shaped (:data:`API_KEY`) and bearer or basic
  credentials, whoever they belong to.

Once a secret is registered, log records are scrubbed too (a record factory
wraps the current one): SDKs and HTTP libraries log response headers at
``DEBUG``, and a server may echo the key there.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, quote_plus

if TYPE_CHECKING:
    from attrs import AttrsInstance

__all__ = [
    "API_KEY",
    "MASK",
    "MIN_SECRET_LENGTH",
    "contains_secret",
    "register_secret",
    "scrub",
    "scrub_data",
    "scrub_fields",
    "secret_forms",
]

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

#: A bearer or basic credential as it appears in echoed headers (a token holds a digit
#: or one of ``+/=_~``: "basic understanding." is prose).
_CREDENTIAL = re.compile(r"(?i:(bearer|basic))\s+(?=[A-Za-z.-]*[0-9+/=_~])[A-Za-z0-9._~+/=-]{8,}")

#: What a scrubbed secret is replaced with.
MASK = "***"

#: Registered secrets shorter than this are not masked in text (``"x"`` would mask every x).
MIN_SECRET_LENGTH = 8

#: Below this length a secret's base64 forms are too short to mask without false hits.
_MIN_BASE64_LENGTH = 12

#: A registered secret's pieces this long, at its start or its end, are masked too (a
#: message cut short, before or after scrubbing, can leave such a piece behind); only
#: for secrets of at least :data:`_MIN_PIECES_LENGTH` characters.
_MIN_PIECE = 12
_MIN_PIECES_LENGTH = 16

#: How deep :func:`scrub_data` follows nested containers; deeper parts are replaced.
_MAX_DEPTH = 64
_TOO_DEEP = "<nested too deep>"

T = TypeVar("T", bound="AttrsInstance")

_lock = threading.Lock()
_registered: set[str] = set()
#: The registered secrets long enough for their pieces to be masked.
_with_pieces: list[str] = []
#: The registered secrets' forms as one alternation (``None``: nothing registered).
_pattern: re.Pattern[str] | None = None
_log_factory_installed = False


def _base64_cores(secret: bytes) -> set[str]:
    """The base64 characters that encode ``secret`` at each of the three byte alignments.

    Whatever bytes surround the secret, one of these appears in the encoding
    (``base64(b"user:" + key)`` holds the core of alignment 2).
    """
    cores: set[str] = set()
    n = len(secret)
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + secret).decode("ascii").rstrip("=")
        start = -(-offset * 8 // 6)
        end = (offset + n) * 8 // 6
        core = encoded[start:end]
        cores.add(core)
        cores.add(core.replace("+", "-").replace("/", "_"))
    return cores


def secret_forms(secret: str) -> set[str]:
    """The texts ``secret`` may be echoed as: itself, URL-encoded, JSON-escaped, base64."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1]}
    if len(secret) >= _MIN_BASE64_LENGTH:
        forms |= _base64_cores(secret.encode("utf-8"))
    return {form for form in forms if form}


def _mask_pieces(text: str, secret: str) -> str:
    """``text`` with every start or end of ``secret`` (12 characters or more) masked."""
    head, tail = secret[:_MIN_PIECE], secret[-_MIN_PIECE:]
    if head in text:
        parts, at = [], 0
        while (found := text.find(head, at)) >= 0:
            end, matched = found + _MIN_PIECE, _MIN_PIECE
            while end < len(text) and matched < len(secret) and text[end] == secret[matched]:
                end, matched = end + 1, matched + 1
            parts += [text[at:found], MASK]
            at = end
        text = "".join(parts) + text[at:]
    if tail in text:
        parts, at = [], 0
        while (found := text.find(tail, at)) >= 0:
            start, matched = found, _MIN_PIECE
            while start > at and matched < len(secret) and text[start - 1] == secret[-matched - 1]:
                start, matched = start - 1, matched + 1
            parts += [text[at:start], MASK]
            at = found + _MIN_PIECE
        text = "".join(parts) + text[at:]
    return text


def register_secret(secret: str) -> None:
    """Mask ``secret`` (in all its :func:`secret_forms`) in everything :func:`scrub` sees.

    A start or an end of it, 12 characters or more, is masked too (what a
    message cut short through the secret leaves).
    :class:`~nimpipe.types.Secret` calls this for every value it holds;
    values shorter than :data:`MIN_SECRET_LENGTH` are ignored.
    """
    global _pattern
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        return
    with _lock:
        if secret in _registered:
            return
        _registered.add(secret)
        forms = {form for known in _registered for form in secret_forms(known)}
        ordered = sorted(forms, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(form) for form in ordered))
        if len(secret) >= _MIN_PIECES_LENGTH:
            _with_pieces.append(secret)
        _install_log_scrubber()


def scrub(text: str, known: Iterable[str] = ()) -> str:
    """``text`` with every secret masked: the ``known``, the registered, the credential-shaped."""
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
        for secret in tuple(_with_pieces):
            text = _mask_pieces(text, secret)
    for secret in known:
        if secret and len(secret) >= 4:
            for form in secret_forms(secret) if len(secret) >= MIN_SECRET_LENGTH else (secret,):
                text = text.replace(form, MASK)
    text = _CREDENTIAL.sub(lambda m: f"{m.group(1)} {MASK}", text)
    return API_KEY.sub(MASK, text)


def contains_secret(text: str, known: Iterable[str] = ()) -> bool:
    """Whether :func:`scrub` would change ``text``."""
    return scrub(text, known) != text


def scrub_data(value: Any, known: Iterable[str] = ()) -> Any:
    """``value`` (JSON-like: strings, bytes, mappings, lists, tuples) with every string scrubbed.

    Returns ``value`` itself when nothing needed masking; other types are
    returned unchanged.  Containers nested deeper than 64 levels are replaced
    by a placeholder (a hostile reply may nest without end).
    """
    known = tuple(known)
    return _scrub_data(value, known, 0)


def _scrub_data(value: Any, known: tuple[str, ...], depth: int) -> Any:
    if isinstance(value, str):
        return scrub(value, known)
    if isinstance(value, bytes):
        try:
            text, encoding = value.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = value.decode("latin-1"), "latin-1"
        scrubbed = scrub(text, known)
        return value if scrubbed == text else scrubbed.encode(encoding)
    if not isinstance(value, (Mapping, list, tuple)):
        return value
    if depth >= _MAX_DEPTH:
        return _TOO_DEEP
    if isinstance(value, Mapping):
        items = [
            (_scrub_data(k, known, depth + 1), _scrub_data(v, known, depth + 1))
            for k, v in value.items()
        ]
        if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
            return value
        return dict(items)
    parts = [_scrub_data(v, known, depth + 1) for v in value]
    if all(p is v for p, v in zip(parts, value, strict=True)):
        return value
    return type(value)(parts) if type(value) in (list, tuple) else parts


def scrub_fields(value: T) -> T:
    """An attrs instance (a verdict, a block) with its string fields scrubbed; itself if clean.

    Uses ``attrs.evolve``, so frozen values stay frozen.
    """
    import attrs

    changes = {}
    for field in attrs.fields(type(value)):
        if not field.init:
            continue
        text = getattr(value, field.name)
        if isinstance(text, str):
            scrubbed = scrub(text)
            if scrubbed != text:
                changes[field.alias or field.name] = scrubbed
    if not changes:
        return value
    evolved: T = attrs.evolve(value, **changes)  # type: ignore[misc]
    return evolved


# --------------------------------------------------------------------------
# Log records
# --------------------------------------------------------------------------


def _install_log_scrubber() -> None:
    """Wrap the log record factory so that every record's text is scrubbed (once)."""
    global _log_factory_installed
    if _log_factory_installed:
        return
    _log_factory_installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _scrub_record(record)
        return record

    logging.setLogRecordFactory(factory)


def _scrub_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string is the logging module's to report
        return
    scrubbed = scrub(message)
    if scrubbed != message:
        record.msg, record.args = scrubbed, ()
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        try:
            text = logging.Formatter().formatException(record.exc_info)
        except Exception:
            return
        scrubbed = scrub(text)
        if scrubbed != text:
            record.exc_text = scrubbed
