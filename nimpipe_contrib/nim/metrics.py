"""The figures nimpipe reads from a NIM (or vLLM) server's Prometheus metrics.

NIM serves ``/v1/metrics`` with names such as ``num_requests_waiting``;
vLLM serves ``/metrics`` with the same figures under a ``vllm:`` prefix (and
``vllm:kv_cache_usage_perc`` for ``gpu_cache_usage_perc``).  Both read the
same way::

    figures = read_server_metrics(body)     # raises PrometheusParseError
    figures.waiting, figures.kv_cache, figures.ttft_mean
"""

from __future__ import annotations

import attrs

from nimpipe_contrib.nim import exposition

__all__ = ["ServerMetrics", "read_server_metrics"]

#: Prefixes the figures are looked up under, in this order.
_PREFIXES = ("", "vllm:")


@attrs.frozen(kw_only=True)
class ServerMetrics:
    """The figures nimpipe reads from an endpoint's Prometheus metrics (``None``: absent)."""

    waiting: float | None = None
    running: float | None = None
    #: ``num_request_max``: requests the server runs at once.
    max_running: float | None = None
    #: ``gpu_cache_usage_perc`` (``vllm:kv_cache_usage_perc``), a fraction 0..1.
    kv_cache: float | None = None
    prompt_tokens_total: float | None = None
    generation_tokens_total: float | None = None
    #: Mean time to first token, seconds (histogram sum / count).
    ttft_mean: float | None = None
    #: Mean time per output token, seconds.
    tpot_mean: float | None = None
    #: Mean end-to-end request latency, seconds.
    e2e_mean: float | None = None

    @classmethod
    def from_metrics(cls, metrics: exposition.Metrics) -> ServerMetrics:
        """Pick NIM's figures out of a parsed exposition (NIM or ``vllm:`` names)."""

        def names(*bases: str) -> list[str]:
            return [p + b for b in bases for p in _PREFIXES]

        def total(*bases: str) -> float | None:
            for name in names(*bases):
                value = metrics.value(name)
                if value is not None:
                    return value
            return None

        def largest(*bases: str) -> float | None:
            for name in names(*bases):
                value = metrics.max(name)
                if value is not None:
                    return value
            return None

        def mean(base: str) -> float | None:
            for name in names(base):
                family = metrics.family(name)
                if family is not None:
                    return family.mean()
            return None

        return cls(
            waiting=total("num_requests_waiting"),
            running=total("num_requests_running"),
            max_running=largest("num_request_max"),
            kv_cache=largest("gpu_cache_usage_perc", "kv_cache_usage_perc"),
            prompt_tokens_total=total("prompt_tokens_total"),
            generation_tokens_total=total("generation_tokens_total"),
            ttft_mean=mean("time_to_first_token_seconds"),
            tpot_mean=mean("time_per_output_token_seconds"),
            e2e_mean=mean("e2e_request_latency_seconds"),
        )


def read_server_metrics(body: str | bytes) -> ServerMetrics:
    """The figures of a metrics page; raises :class:`~nimpipe.errors.PrometheusParseError`."""
    return ServerMetrics.from_metrics(exposition.parse(body))
