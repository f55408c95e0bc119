"""Typed access to one stage's ``[stages.NAME]`` table.

Every problem is a :class:`~nimpipe.errors.ConfigError` naming the config file
and the full key (``stages.budget.daily_usd``), so that a typo in a stage
setting reads like a typo anywhere else in ``nimpipe.toml``.  Values are read
with the config's own :class:`~nimpipe.config.FieldReader`, so stage settings
and top-level settings accept and refuse the same things.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from nimpipe.errors import ConfigError

if TYPE_CHECKING:
    from nimpipe.config import Config, FieldReader
    from nimpipe.pipeline import Pipeline

__all__ = ["StageSettings", "check_stage_settings"]

_MISSING: Any = object()


@attrs.frozen
class StageSettings:
    """The settings table of stage ``name``; ``prefix`` is the key path shown in errors."""

    name: str
    table: Mapping[str, Any]
    source: str | None = None
    prefix: str = ""

    @classmethod
    def of(cls, pipeline: Pipeline, name: str) -> StageSettings:
        """The ``[stages.NAME]`` table of ``pipeline``'s configuration."""
        return cls.from_config(pipeline.config, name)

    @classmethod
    def from_config(cls, config: Any, name: str) -> StageSettings:
        """The ``[stages.NAME]`` table of a :class:`~nimpipe.config.Config`."""
        return cls(name, config.stage(name), config.source, f"stages.{name}")

    @property
    def _reader(self) -> FieldReader:
        # Imported here so that importing a contrib stage does not load the config module.
        from nimpipe.config import FieldReader

        return FieldReader(self.source)

    def key(self, key: str) -> str:
        """The full dotted key of ``key`` (``stages.NAME.key``)."""
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, problem: str) -> ConfigError:
        """A :class:`ConfigError` about ``key`` of this table."""
        return self._reader.fail(self.key(key), problem)

    def only(self, known: Iterable[str]) -> None:
        """Refuse keys that are not in ``known``."""
        allowed = set(known)
        for key in self.table:
            if key not in allowed:
                raise self.fail(key, f"unknown setting (known: {', '.join(sorted(allowed))})")

    def sub(self, key: str) -> StageSettings:
        """The nested table ``key`` (empty when absent)."""
        path = self.key(key)
        return StageSettings(
            self.name, self._reader.table(path, self.table.get(key, {})), self.source, path
        )

    def item(self, key: str, index: int, value: Any) -> StageSettings:
        """Element ``index`` of the array of tables ``key``."""
        path = self.key(f"{key}[{index}]")
        return StageSettings(self.name, self._reader.table(path, value), self.source, path)

    def __contains__(self, key: str) -> bool:
        return key in self.table

    # ------------------------------------------------------------------

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        minimum: float | None = 0.0,
        maximum: float | None = None,
    ) -> Any:
        """A number (``int`` or ``float``; returned as ``float``), or ``default`` when absent."""

        def read(path: str, value: Any) -> float:
            number = self._reader.number(path, value, minimum=None)  # refuses nan and inf
            if minimum is not None and number < minimum:
                raise self._reader.fail(path, f"must be at least {minimum:g}, got {number:g}")
            if maximum is not None and number > maximum:
                raise self._reader.fail(path, f"must be at most {maximum:g}, got {number:g}")
            return number

        return self._read(key, default, read)

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = 0) -> Any:
        """An integer, or ``default`` when absent."""
        return self._read(
            key, default, lambda path, value: self._reader.integer(path, value, minimum)
        )

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        """``true``/``false`` (or the strings ``yes``/``no``/``1``/``0``), or ``default``."""
        return self._read(
            key,
            default,
            lambda path, value: self._reader.boolean(path, value, blank_is_false=False),
        )

    def string(self, key: str, default: Any = _MISSING) -> Any:
        """A non-empty string, or ``default`` when absent."""
        return self._read(key, default, self._reader.string)

    def choice(self, key: str, choices: Sequence[str], default: Any = _MISSING) -> Any:
        """One of ``choices``, or ``default`` when absent."""
        value = self.string(key, default)
        if key in self.table and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """A list of non-empty strings (a single string counts as a list of one)."""

        def read(path: str, value: Any) -> tuple[str, ...]:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise self._reader.fail(
                    path, f"must be a list of strings, got {self._reader.shown(value)}"
                )
            return tuple(v.strip() for v in value)

        return self._read(key, default, read)

    def numbers(self, key: str, default: Any = _MISSING) -> Any:
        """A list of numbers, returned as floats."""

        def read(path: str, value: Any) -> tuple[float, ...]:
            if not isinstance(value, list):
                raise self._reader.fail(
                    path, f"must be a list of numbers, got {self._reader.shown(value)}"
                )
            return tuple(
                self._reader.number(f"{path}[{i}]", v, minimum=None) for i, v in enumerate(value)
            )

        return self._read(key, default, read)

    def tables(self, key: str) -> list[StageSettings]:
        """An array of tables (``[[stages.NAME.key]]``), each as its own settings."""
        value = self.table.get(key, [])
        if not isinstance(value, list):
            raise self.fail(key, f"must be an array of tables, got {self._reader.shown(value)}")
        return [self.item(key, i, v) for i, v in enumerate(value)]

    def _read(self, key: str, default: Any, read: Callable[[str, Any], Any]) -> Any:
        """``read(full key, value)`` of ``key``; ``default`` when absent, unless required."""
        if key not in self.table:
            if default is _MISSING:
                raise self.fail(key, "is required")
            return default
        return read(self.key(key), self.table[key])


def check_stage_settings(
    config: Config, name: str, readers: Mapping[str, Callable[[Config], None]] | None = None
) -> None:
    """Read stage ``name``'s table as the stage would; raises :class:`ConfigError` naming the key.

    ``readers`` maps stage names to the reader each stage's ``configure`` uses,
    called on its own (no thread, no file, no connection); by default the
    ``SETTINGS_READERS`` of the module :data:`nimpipe.plugins.CONTRIB_SETTINGS_READERS`
    names, when it is installed.  Does nothing for a stage with no reader.
    """
    if readers is None:
        import importlib

        from nimpipe.plugins import CONTRIB_SETTINGS_READERS

        try:
            module = importlib.import_module(CONTRIB_SETTINGS_READERS)
        except ImportError:
            return
        readers = module.SETTINGS_READERS
    reader = readers.get(name)
    if reader is not None:
        reader(config)
