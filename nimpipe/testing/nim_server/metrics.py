"""The Prometheus page of a NIM test server: per-model gauges, counters and histograms.

Names are NIM's (``num_requests_running``, ``gpu_cache_usage_perc``, ...) or,
with ``metrics_prefix="vllm:"``, vLLM's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nimpipe.testing.nim_server.settings import NimSettings

__all__ = ["ModelMetrics", "render_metrics"]

_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
)
_TOKEN_BUCKETS = (
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    50.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    2000.0,
    5000.0,
    10000.0,
    20000.0,
    50000.0,
    100000.0,
)
_VLLM_RENAMES = {
    "gpu_cache_usage_perc": "kv_cache_usage_perc",
    "request_finish_total": "request_success_total",
}


class _Histogram:
    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: str) -> list[str]:
        out = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {float(running)}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {float(self.count)}')
        out.append(f"{name}_count{{{labels}}} {float(self.count)}")
        out.append(f"{name}_sum{{{labels}}} {self.total}")
        return out


class ModelMetrics:
    """The figures of one served model; the server updates them under its lock."""

    __slots__ = (
        "e2e",
        "finished",
        "generation_tokens",
        "prompt_tokens",
        "request_gen",
        "request_prompt",
        "running",
        "tpot",
        "ttft",
        "waiting",
    )

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.tpot = _Histogram(_TTFT_BUCKETS)
        self.e2e = _Histogram(_LATENCY_BUCKETS)
        self.request_prompt = _Histogram(_TOKEN_BUCKETS)
        self.request_gen = _Histogram(_TOKEN_BUCKETS)

    def finish(
        self,
        reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        started: float,
        first_token_at: float | None,
        ended: float,
    ) -> None:
        """Count one chat completion that ended with ``reason`` (``"abort"``: not answered).

        Generated tokens count only when a first token was sent.
        """
        self.finished[reason] = self.finished.get(reason, 0) + 1
        self.prompt_tokens += prompt_tokens
        self.request_prompt.observe(prompt_tokens)
        self.e2e.observe(ended - started)
        if first_token_at is not None:
            self.ttft.observe(first_token_at - started)
            self.generation_tokens += completion_tokens
            self.request_gen.observe(completion_tokens)
            if completion_tokens > 1:
                self.tpot.observe((ended - first_token_at) / (completion_tokens - 1))


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(
    settings: NimSettings, models: Iterable[str], metrics: Mapping[str, ModelMetrics]
) -> str:
    """The Prometheus text page for ``models`` (a model with no figures reports zeros)."""
    prefix = settings.metrics_prefix

    def name(base: str) -> str:
        if prefix == "vllm:":
            base = _VLLM_RENAMES.get(base, base)
        return prefix + base

    per_model = [(m, f'model_name="{_label(m)}"', metrics.get(m) or ModelMetrics()) for m in models]
    lines: list[str] = []

    def family(base: str, kind: str, help_text: str, rows: Iterable[str]) -> None:
        full = name(base)
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        lines.extend(row.replace("\0", full) for row in rows)

    family(
        "num_requests_running",
        "gauge",
        "Number of requests currently running on GPU.",
        [f"\0{{{lb}}} {float(mm.running)}" for _, lb, mm in per_model],
    )
    waiting_rows = []
    for _, lb, mm in per_model:
        waiting = mm.waiting if settings.waiting_override is None else settings.waiting_override
        waiting_rows.append(f"\0{{{lb}}} {float(waiting)}")
    family(
        "num_requests_waiting", "gauge", "Number of requests waiting to be processed.", waiting_rows
    )
    family(
        "num_request_max",
        "gauge",
        "Max number of concurrently running requests.",
        [f"\0{{{lb}}} {float(settings.num_request_max)}" for _, lb, _ in per_model],
    )
    usage_rows = []
    for _, lb, mm in per_model:
        if settings.kv_cache_override is not None:
            usage = float(settings.kv_cache_override)
        else:
            usage = min(1.0, mm.running / max(1, settings.num_request_max))
        usage_rows.append(f"\0{{{lb}}} {usage}")
    family(
        "gpu_cache_usage_perc",
        "gauge",
        "GPU KV-cache usage. 1 means 100 percent usage.",
        usage_rows,
    )
    family(
        "prompt_tokens_total",
        "counter",
        "Number of prefill tokens processed.",
        [f"\0{{{lb}}} {float(mm.prompt_tokens)}" for _, lb, mm in per_model],
    )
    family(
        "generation_tokens_total",
        "counter",
        "Number of generation tokens processed.",
        [f"\0{{{lb}}} {float(mm.generation_tokens)}" for _, lb, mm in per_model],
    )
    finish_rows = []
    for _, lb, mm in per_model:
        for reason in sorted({"stop", "length", "tool_calls", "abort"} | mm.finished.keys()):
            count = float(mm.finished.get(reason, 0))
            finish_rows.append(f'\0{{{lb},finished_reason="{reason}"}} {count}')
    family(
        "request_finish_total",
        "counter",
        "Count of finished requests by finish reason.",
        finish_rows,
    )
    histograms = [
        ("time_to_first_token_seconds", "Histogram of time to first token in seconds.", "ttft"),
        ("time_per_output_token_seconds", "Histogram of time per output token in seconds.", "tpot"),
        (
            "e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            "e2e",
        ),
        (
            "request_prompt_tokens",
            "Number of prefill tokens processed per request.",
            "request_prompt",
        ),
        (
            "request_generation_tokens",
            "Number of generation tokens processed per request.",
            "request_gen",
        ),
    ]
    for base, help_text, attr in histograms:
        full = name(base)
        rows = []
        for _, lb, mm in per_model:
            rows.extend(getattr(mm, attr).lines(full, lb))
        family(base, "histogram", help_text, rows)
    return "\n".join(lines) + "\n"
