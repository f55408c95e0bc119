"""What a NIM test server serves: its settings and the models they resolve to."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

__all__ = ["CHAT_PATH", "DEFAULT_MODEL", "NimSettings", "ServedModel"]

#: Model id served when neither ``model`` nor ``models`` is configured.
DEFAULT_MODEL = "meta/llama-3.1-8b-instruct"

#: Path of the chat completions endpoint, where faults apply unless told otherwise.
CHAT_PATH = "/v1/chat/completions"


@dataclasses.dataclass(frozen=True, kw_only=True)
class NimSettings:
    """Behaviour of a :class:`NimServer`; every field is also a constructor keyword.

    Change settings at run time with :meth:`NimServer.configure` (or
    ``POST /_admin/config`` with a JSON object of fields).
    """

    #: Id of the single served model; ignored when ``models`` is given.
    model: str = DEFAULT_MODEL
    #: Several served models, each an id or a dict with ``id`` and optionally
    #: ``max_model_len``, ``parent`` (base model of a LoRA adapter), ``root``,
    #: ``owned_by``, and per-model ``reply``, ``replies`` and ``latency``
    #: which take precedence over the server-wide settings.
    models: list[Any] | None = None
    #: Context length of models that do not set their own.
    max_model_len: int = 131072
    #: Seconds to wait before answering a chat completion (before the first
    #: SSE chunk of a stream; the headers of a stream are sent at once).
    latency: float = 0.0
    #: Seconds between SSE chunks of a stream.
    token_delay: float = 0.0
    #: Seconds after start during which the server is "loading": health/ready
    #: answers 503 and so do chat completions and tokenize.
    ready_after: float = 0.0
    #: Fixed reply text for every chat completion.
    reply: str | None = None
    #: Substring of the last message -> reply text; the first match wins and
    #: takes precedence over ``reply``.
    replies: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Substring of the last user message -> tool call, given as a tool name
    #: or ``{"name": ..., "arguments": {...}}``; used when the request has
    #: ``tools``, before the ``call tool NAME`` pattern.
    tool_rules: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: When set, ``/v1`` endpoints and ``/tokenize`` require
    #: ``Authorization: Bearer <api_key>`` and answer 401 otherwise.
    api_key: str | None = None
    #: Prefix of metric names: ``""`` for NIM names, ``"vllm:"`` for vLLM
    #: names (which also renames ``gpu_cache_usage_perc`` to
    #: ``kv_cache_usage_perc`` and ``request_finish_total`` to
    #: ``request_success_total``).
    metrics_prefix: str = ""
    #: Value reported as ``num_requests_waiting`` instead of the real count.
    waiting_override: int | None = None
    #: Value reported as ``gpu_cache_usage_perc`` (a fraction, 0..1) instead
    #: of running / ``num_request_max``.
    kv_cache_override: float | None = None
    #: Requests processed at once; further requests wait (and are counted in
    #: ``num_requests_waiting``).
    num_request_max: int = 256
    #: Number of most recent requests kept in :attr:`NimServer.requests`.
    max_recorded: int = 10000

    def evolve(self, **changes: Any) -> NimSettings:
        """Return a copy with ``changes`` applied; unknown names raise ``TypeError``."""
        unknown = sorted(set(changes) - _SETTING_NAMES)
        if unknown:
            raise TypeError(f"unknown NimServer setting(s): {', '.join(unknown)}")
        if "model" in changes and "models" not in changes:
            changes["models"] = None
        new = dataclasses.replace(self, **changes)
        new.resolve_models()
        return new

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-compatible dict (what ``GET /_admin/config`` returns)."""
        return dataclasses.asdict(self)

    def resolve_models(self) -> dict[str, ServedModel]:
        """The served models by id, in the configured order; a bad entry raises ``ValueError``."""
        entries: list[Any] = list(self.models) if self.models else [self.model]
        resolved: dict[str, ServedModel] = {}
        for entry in entries:
            spec: dict[str, Any] = {"id": entry} if isinstance(entry, str) else dict(entry)
            if not isinstance(spec.get("id"), str):
                raise ValueError(f"a model needs a string 'id': {entry!r}")
            unknown = set(spec) - _MODEL_KEYS
            if unknown:
                raise ValueError(f"unknown model key(s) {sorted(unknown)} in {entry!r}")
            model = ServedModel(
                id=spec["id"],
                max_model_len=int(spec.get("max_model_len", self.max_model_len)),
                parent=spec.get("parent"),
                root=spec.get("root", spec["id"]),
                owned_by=spec.get("owned_by", "system"),
                reply=spec.get("reply"),
                replies=dict(spec.get("replies") or {}),
                latency=spec.get("latency"),
            )
            resolved[model.id] = model
        return resolved


_SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(NimSettings))
_MODEL_KEYS = frozenset(
    {"id", "max_model_len", "parent", "root", "owned_by", "reply", "replies", "latency"}
)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """One served model: its card fields and the per-model reply settings."""

    id: str
    max_model_len: int
    parent: str | None
    root: str
    owned_by: str
    reply: str | None
    replies: dict[str, str]
    latency: float | None

    def card(self, created: int) -> dict[str, Any]:
        """The model's entry in ``GET /v1/models``, as vLLM writes it."""
        return {
            "id": self.id,
            "object": "model",
            "created": created,
            "owned_by": self.owned_by,
            "root": self.root,
            "parent": self.parent,
            "max_model_len": self.max_model_len,
            "permission": [
                {
                    "id": f"modelperm-{zlib.crc32(self.id.encode()):08x}",
                    "object": "model_permission",
                    "created": created,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ],
        }
