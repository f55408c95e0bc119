"""The ledger's optional OpenTelemetry export: ``gen_ai.*`` metrics and one span per call.

On with ``opentelemetry = true`` in ``[stages.ledger]``; needs
``opentelemetry-api`` (and an SDK to send anything), imported only then.
"""

from __future__ import annotations

from nimpipe.types import CallRecord
from nimpipe_contrib._settings import StageSettings

__all__ = ["Telemetry", "telemetry_from"]


class Telemetry:
    """``gen_ai.*`` metrics and one span per call, through the OpenTelemetry API."""

    def __init__(self) -> None:
        from opentelemetry import metrics, trace

        meter = metrics.get_meter("nimpipe")
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens per model call"
        )
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Duration of model calls"
        )
        self._cost = meter.create_counter(
            "nimpipe.cost", unit="USD", description="Spend on model calls"
        )
        self._tracer = trace.get_tracer("nimpipe")
        self._kind = trace.SpanKind.CLIENT
        self._error = trace.Status(trace.StatusCode.ERROR)

    def emit(self, record: CallRecord) -> None:
        base = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "nvidia_nim",
            "gen_ai.request.model": record.model,
            "server.address": record.provider,
            "nimpipe.route": record.route,
        }
        self._tokens.record(record.prompt_tokens, {**base, "gen_ai.token.type": "input"})
        self._tokens.record(record.completion_tokens, {**base, "gen_ai.token.type": "output"})
        self._duration.record(record.latency, base)
        if record.cost_usd:
            self._cost.add(record.cost_usd, base)
        start = int(record.time * 1e9)
        span = self._tracer.start_span(
            f"chat {record.model}",
            kind=self._kind,
            start_time=start,
            attributes={
                **base,
                "gen_ai.usage.input_tokens": record.prompt_tokens,
                "gen_ai.usage.output_tokens": record.completion_tokens,
                "nimpipe.turn_id": record.turn_id,
                "nimpipe.agent_id": record.agent_id,
                "nimpipe.agent_type": record.agent_type,
                "nimpipe.outcome": record.outcome,
                "nimpipe.usage_source": record.usage_source,
                "nimpipe.cost_usd": record.cost_usd,
                "nimpipe.attempt": record.attempt,
            },
        )
        if record.error:
            span.set_attribute("error.type", record.error)
            span.set_status(self._error)
        span.end(end_time=start + int(record.latency * 1e9))


def telemetry_from(settings: StageSettings) -> Telemetry | None:
    if not settings.boolean("opentelemetry", False):
        return None
    try:
        return Telemetry()
    except ImportError:
        raise settings.fail(
            "opentelemetry", "needs OpenTelemetry: pip install opentelemetry-api (and an SDK)"
        ) from None
