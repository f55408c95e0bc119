"""The ``[stages.nim_catalog]`` settings: each one's default is stated once, on its field."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from nimpipe.stage import StageSettings, config_dir, nimpipe_home

__all__ = ["DEFAULT_CONTEXT_LENGTH", "STAGE_NAME", "CatalogSettings"]

#: The stage's name in ``CONTRIB_STAGES`` and ``[stages.NAME]``.
STAGE_NAME = "nim_catalog"

#: Context window reported for a model nothing knows about (source ``default``).
DEFAULT_CONTEXT_LENGTH = 32768

#: Keys of the table; ``overrides_named`` is derived, not a setting.
_KEYS = (
    "ttl",
    "timeout",
    "cache_dir",
    "overrides",
    "default_context_length",
    "refresh_on_start",
    "fetch_hosted",
)


@attrs.frozen(kw_only=True)
class CatalogSettings:
    """The ``[stages.nim_catalog]`` settings (all optional)."""

    #: Seconds a fetched catalog counts as fresh.
    ttl: float = 3600.0
    #: Seconds allowed for one ``/v1/models`` request.
    timeout: float = 5.0
    #: Directory of the disk cache (default: ``<nimpipe home>/catalog``).
    cache_dir: Path | None = None
    #: The user override file (default: ``~/.config/nimpipe/models.toml``, if it exists).
    overrides: Path | None = None
    #: Whether ``overrides`` was named explicitly (then it must exist).
    overrides_named: bool = False
    #: Context window answered for models nothing knows about.
    default_context_length: int = DEFAULT_CONTEXT_LENGTH
    #: Fetch stale catalogs in a background thread when the pipeline starts.
    refresh_on_start: bool = True
    #: Also fetch the catalogs of hosted (not self-hosted) endpoints.
    fetch_hosted: bool = True

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str | None = None) -> CatalogSettings:
        """Read and validate a ``[stages.nim_catalog]`` table."""
        reader = StageSettings(STAGE_NAME, table, source, f"stages.{STAGE_NAME}")
        reader.only(_KEYS)
        defaults = {field.name: field.default for field in attrs.fields(cls)}
        overrides = reader.string("overrides", None)
        cache_dir = reader.string("cache_dir", None)
        return cls(
            ttl=reader.number("ttl", defaults["ttl"]),
            timeout=reader.number("timeout", defaults["timeout"], minimum=0.001),
            cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
            overrides=Path(overrides).expanduser() if overrides else None,
            overrides_named=overrides is not None,
            default_context_length=reader.integer(
                "default_context_length", defaults["default_context_length"], minimum=1
            ),
            refresh_on_start=reader.boolean("refresh_on_start", defaults["refresh_on_start"]),
            fetch_hosted=reader.boolean("fetch_hosted", defaults["fetch_hosted"]),
        )

    def cache_directory(self) -> Path:
        """Where the disk cache lives."""
        return self.cache_dir if self.cache_dir is not None else nimpipe_home() / "catalog"

    def overrides_path(self) -> Path:
        """The override file to read (it may not exist unless named explicitly)."""
        return self.overrides if self.overrides is not None else config_dir() / "models.toml"
