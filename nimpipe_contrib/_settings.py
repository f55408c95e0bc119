"""Typed access to one stage's ``[stages.NAME]`` table.

Every problem is a :class:`~nimpipe.errors.ConfigError` naming the config file
and the full key (``stages.budget.daily_usd``), so that a typo in a stage
setting reads like a typo anywhere else in ``nimpipe.toml``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from nimpipe.errors import ConfigError

if TYPE_CHECKING:
    from nimpipe.pipeline import Pipeline

__all__ = ["StageSettings"]

T = TypeVar("T")

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

    def key(self, key: str) -> str:
        """The full dotted key of ``key`` (``stages.NAME.key``)."""
        return f"{self.prefix}.{key}" if self.prefix else key

    def fail(self, key: str, problem: str) -> ConfigError:
        """A :class:`ConfigError` about ``key`` of this table."""
        return ConfigError(problem, path=self.source, key=self.key(key))

    def only(self, known: Iterable[str]) -> None:
        """Refuse keys that are not in ``known``."""
        allowed = set(known)
        for key in self.table:
            if key not in allowed:
                raise self.fail(key, f"unknown setting (known: {', '.join(sorted(allowed))})")

    def sub(self, key: str) -> StageSettings:
        """The nested table ``key`` (empty when absent)."""
        value = self.table.get(key, {})
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a table, got {value!r}")
        return StageSettings(self.name, value, self.source, self.key(key))

    def item(self, key: str, index: int, value: Any) -> StageSettings:
        """Element ``index`` of the array of tables ``key``."""
        if not isinstance(value, Mapping):
            raise self.fail(f"{key}[{index}]", f"must be a table, got {value!r}")
        return StageSettings(self.name, value, self.source, self.key(f"{key}[{index}]"))

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
        if key not in self.table:
            return self._default(key, default)
        value = self.table[key]
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise self.fail(key, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"must be a number, got {value!r}")
        if value != value:
            raise self.fail(key, "must be a number, got NaN")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be at most {maximum:g}, got {value:g}")
        return float(value)

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = 0) -> Any:
        """An integer, or ``default`` when absent."""
        if key not in self.table:
            return self._default(key, default)
        value = self.table[key]
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise self.fail(key, f"must be an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value}")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        """``true``/``false`` (or the strings ``yes``/``no``/``1``/``0``), or ``default``."""
        if key not in self.table:
            return self._default(key, default)
        value = self.table[key]
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        raise self.fail(key, f"must be true or false, got {value!r}")

    def string(self, key: str, default: Any = _MISSING) -> Any:
        """A non-empty string, or ``default`` when absent."""
        if key not in self.table:
            return self._default(key, default)
        value = self.table[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be a non-empty string, got {value!r}")
        return value.strip()

    def choice(self, key: str, choices: Sequence[str], default: Any = _MISSING) -> Any:
        """One of ``choices``, or ``default`` when absent."""
        value = self.string(key, default)
        if key in self.table and value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """A list of non-empty strings (a single string counts as a list of one)."""
        if key not in self.table:
            return self._default(key, default)
        value = self.table[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"must be a list of strings, got {value!r}")
        return tuple(v.strip() for v in value)

    def numbers(self, key: str, default: Any = _MISSING) -> Any:
        """A list of numbers, returned as floats."""
        if key not in self.table:
            return self._default(key, default)
        value = self.table[key]
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise self.fail(key, f"must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)

    def tables(self, key: str) -> list[StageSettings]:
        """An array of tables (``[[stages.NAME.key]]``), each as its own settings."""
        value = self.table.get(key, [])
        if not isinstance(value, list):
            raise self.fail(key, f"must be an array of tables, got {value!r}")
        return [self.item(key, i, v) for i, v in enumerate(value)]

    def _default(self, key: str, default: Any) -> Any:
        if default is _MISSING:
            raise self.fail(key, "is required")
        return default
