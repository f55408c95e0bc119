"""The ``[stages.nim_health]`` settings: each one's default is stated once, on its field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from nimpipe.stage import StageSettings

__all__ = ["PROBE_POLICIES", "STAGE_NAME", "HealthSettings"]

#: The stage's name in ``CONTRIB_STAGES`` and ``[stages.NAME]``.
STAGE_NAME = "nim_health"

#: Values of the ``probe`` setting.
PROBE_POLICIES = ("self_hosted", "all", "none")


@attrs.frozen(kw_only=True)
class HealthSettings:
    """The ``[stages.nim_health]`` settings (all optional)."""

    #: Seconds between background probes of a ready endpoint (0: none).
    interval: float = 5.0
    #: Seconds between probes of a loading or never-probed endpoint.
    loading_interval: float = 1.0
    #: Seconds allowed for one probe request.
    timeout: float = 2.0
    #: Consecutive failures that open an endpoint's circuit.
    failure_threshold: int = 3
    #: Seconds an open circuit waits before the half-open probe.
    cooldown: float = 10.0
    #: Endpoints the background probes: ``self_hosted``, ``all`` or ``none``.
    probe: str = "self_hosted"
    #: Seconds a turn waits for a loading endpoint (0: never).
    wait_for_ready: float = 0.0
    #: Seconds between two "waiting for NIM" progress lines.
    progress_every: float = 10.0
    #: Queue depth (``num_requests_waiting``) shown as overloaded.
    overload_waiting: float = 4.0
    #: KV-cache use (0..1) shown as overloaded.
    overload_kv_cache: float = 0.9
    #: Skip a route whose model the endpoint's ``/v1/models`` does not list.
    require_listed_model: bool = True
    #: Seconds between ``/v1/models`` and metrics requests to a server with no
    #: health endpoints (llama.cpp), which are never sent while a call is in flight.
    rare_every: float = 300.0

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str | None = None) -> HealthSettings:
        """Read and validate a ``[stages.nim_health]`` table."""
        reader = StageSettings(STAGE_NAME, table, source, f"stages.{STAGE_NAME}")
        defaults = {field.name: field.default for field in attrs.fields(cls)}
        reader.only(defaults)
        return cls(
            interval=reader.number("interval", defaults["interval"]),
            loading_interval=reader.number(
                "loading_interval", defaults["loading_interval"], minimum=0.01
            ),
            timeout=reader.number("timeout", defaults["timeout"], minimum=0.01),
            failure_threshold=reader.integer(
                "failure_threshold", defaults["failure_threshold"], minimum=1
            ),
            cooldown=reader.number("cooldown", defaults["cooldown"]),
            probe=reader.choice("probe", PROBE_POLICIES, defaults["probe"]),
            wait_for_ready=reader.number("wait_for_ready", defaults["wait_for_ready"]),
            progress_every=reader.number("progress_every", defaults["progress_every"]),
            overload_waiting=reader.number("overload_waiting", defaults["overload_waiting"]),
            overload_kv_cache=reader.number("overload_kv_cache", defaults["overload_kv_cache"]),
            require_listed_model=reader.boolean(
                "require_listed_model", defaults["require_listed_model"]
            ),
            rare_every=reader.number("rare_every", defaults["rare_every"]),
        )
