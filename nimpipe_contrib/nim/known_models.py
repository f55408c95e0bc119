"""What is known about NIM models without asking a server: the shipped snapshot, the overrides.

The snapshot (``nimpipe/data/nim_models.json``, versioned) holds the context
windows of well-known NIM models, each with a ``source`` note.  The user's
override file (TOML) says more, and wins::

    [models."meta/llama-3.1-8b-instruct"]
    context_length = 65536
    capabilities = ["chat", "tools"]
    price = { input_per_1k = 0.0002, output_per_1k = 0.0002 }
    note = "our containers run with NIM_MAX_MODEL_LEN=65536"

A malformed file is a :class:`~nimpipe.errors.ConfigError` naming the file
and the key.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from nimpipe.errors import ConfigError
from nimpipe.types import Price

__all__ = ["KnownModel", "Snapshot", "load_overrides", "load_snapshot"]


@attrs.frozen(kw_only=True)
class KnownModel:
    """A model's entry in the shipped snapshot or the user's override file."""

    id: str
    context_length: int | None = None
    capabilities: tuple[str, ...] = ()
    price: Price | None = None
    #: Where the figure comes from, in words (a model card, the user's note).
    note: str = ""
    #: ``snapshot`` or ``override``.
    origin: str = "snapshot"


@attrs.frozen
class Snapshot:
    """The versioned snapshot of known NIM models shipped with nimpipe."""

    version: str
    models: Mapping[str, KnownModel] = attrs.field(hash=False)


def _known_model(model_id: str, entry: Any, origin: str, where: str, fail: Any) -> KnownModel:
    if not isinstance(entry, Mapping):
        raise fail(f"models.{model_id}", "must be a table")
    allowed = {"context_length", "capabilities", "price", "source", "note"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise fail(
            f"models.{model_id}.{unknown[0]}",
            f"unknown model setting (known: {', '.join(sorted(allowed))})",
        )
    context = entry.get("context_length")
    if context is not None and (
        isinstance(context, bool) or not isinstance(context, int) or context < 1
    ):
        raise fail(f"models.{model_id}.context_length", f"must be a positive integer: {context!r}")
    capabilities = entry.get("capabilities", [])
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        raise fail(f"models.{model_id}.capabilities", "must be a list of strings")
    price = None
    if "price" in entry:
        raw = entry["price"]
        if not isinstance(raw, Mapping) or set(raw) - {"input_per_1k", "output_per_1k"}:
            raise fail(
                f"models.{model_id}.price", "must be a table of input_per_1k and output_per_1k"
            )
        values = [raw.get(k, 0) for k in ("input_per_1k", "output_per_1k")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise fail(f"models.{model_id}.price", "prices must be numbers (USD per 1,000 tokens)")
        price = Price(input_per_1k=float(values[0]), output_per_1k=float(values[1]), source=origin)
    note = entry.get("source", entry.get("note", ""))
    return KnownModel(
        id=model_id,
        context_length=context,
        capabilities=tuple(capabilities),
        price=price,
        note=str(note) or where,
        origin=origin,
    )


@functools.lru_cache(maxsize=1)
def load_snapshot() -> Snapshot:
    """The snapshot shipped as ``nimpipe/data/nim_models.json`` (read once per process)."""
    from importlib import resources

    text = resources.files("nimpipe").joinpath("data/nim_models.json").read_text("utf-8")
    data = json.loads(text)

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(problem, path="nimpipe/data/nim_models.json", key=key)

    models = {
        model_id: _known_model(model_id, entry, "snapshot", "nimpipe snapshot", fail)
        for model_id, entry in data.get("models", {}).items()
    }
    return Snapshot(str(data.get("version", "unknown")), models)


def load_overrides(path: Path, *, required: bool = False) -> dict[str, KnownModel]:
    """Read the user override file; a missing file is no overrides unless ``required``.

    Raises :class:`ConfigError` naming the file and the key when it is malformed.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError("file not found", path=str(path)) from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", path=str(path)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=str(path)) from exc

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(problem, path=str(path), key=key)

    unknown = sorted(set(data) - {"models"})
    if unknown:
        raise fail(unknown[0], "unknown setting (known: models)")
    models = data.get("models", {})
    if not isinstance(models, Mapping):
        raise fail("models", 'must be a table of [models."MODEL ID"] tables')
    return {
        model_id: _known_model(model_id, entry, "override", f"override file {path}", fail)
        for model_id, entry in models.items()
    }
