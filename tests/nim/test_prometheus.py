"""The Prometheus text parser: the exposition format, NIM's and vLLM's metrics, and errors."""

from __future__ import annotations

import math

import pytest

from nimpipe.errors import PrometheusParseError
from nimpipe.testing.nim_server import NimServer
from nimpipe_contrib.nim import exposition
from nimpipe_contrib.nim.exposition import parse
from nimpipe_contrib.nim.metrics import ServerMetrics

EXPOSITION = """\
# A comment that is not HELP or TYPE.
# HELP http_requests_total The total number of HTTP requests.
# TYPE http_requests_total counter
http_requests_total{method="post",code="200"} 1027 1395066363000
http_requests_total{method="post",code="400"}    3 1395066363000

# Escaping in label values:
{MSDOS}

# Minimalistic line:
metric_without_timestamp_and_labels 12.47

# A weird metric from before the epoch:
something_weird{problem="division by zero"} +Inf -3982045

# HELP http_request_duration_seconds A histogram of the request duration.
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.05"} 24054
http_request_duration_seconds_bucket{le="0.1"} 33444
http_request_duration_seconds_bucket{le="0.2"} 100392
http_request_duration_seconds_bucket{le="0.5"} 129389
http_request_duration_seconds_bucket{le="1"} 133988
http_request_duration_seconds_bucket{le="+Inf"} 144320
http_request_duration_seconds_sum 53423
http_request_duration_seconds_count 144320

# HELP rpc_duration_seconds A summary of the RPC duration in seconds.
# TYPE rpc_duration_seconds summary
rpc_duration_seconds{quantile="0.01"} 3102
rpc_duration_seconds{quantile="0.5"} 4773
rpc_duration_seconds{quantile="0.99"} 76656
rpc_duration_seconds_sum 1.7560473e+07
rpc_duration_seconds_count 2693
""".replace(
    "{MSDOS}",
    'msdos_file_access_time_seconds{path="C:\\\\DIR\\\\FILE.TXT",'
    'error="Cannot find file:\\n\\"FILE.TXT\\""} 1.458255915e9',
)


def test_the_reference_exposition() -> None:
    metrics = parse(EXPOSITION)
    assert list(metrics.families) == [
        "http_requests_total",
        "msdos_file_access_time_seconds",
        "metric_without_timestamp_and_labels",
        "something_weird",
        "http_request_duration_seconds",
        "rpc_duration_seconds",
    ]
    requests = metrics.family("http_requests_total")
    assert requests is not None
    assert requests.type == "counter"
    assert requests.help == "The total number of HTTP requests."
    assert [s.timestamp for s in requests.samples] == [1395066363000, 1395066363000]
    assert metrics.value("http_requests_total") == 1030
    assert metrics.value("http_requests_total", code="400") == 3

    (msdos,) = metrics.samples("msdos_file_access_time_seconds")
    assert msdos.labels == {"path": "C:\\DIR\\FILE.TXT", "error": 'Cannot find file:\n"FILE.TXT"'}
    assert msdos.value == 1.458255915e9
    assert metrics.family("msdos_file_access_time_seconds").type == "untyped"  # type: ignore[union-attr]

    (weird,) = metrics.samples("something_weird")
    assert weird.value == math.inf and weird.timestamp == -3982045

    histogram = metrics.family("http_request_duration_seconds")
    assert histogram is not None and histogram.type == "histogram"
    assert histogram.buckets()[-1] == (math.inf, 144320)
    assert histogram.buckets()[0] == (0.05, 24054)
    assert histogram.mean() == pytest.approx(53423 / 144320)
    assert metrics.value("http_request_duration_seconds_count") == 144320

    summary = metrics.family("rpc_duration_seconds")
    assert summary is not None and summary.type == "summary"
    assert summary.total(quantile="0.5") == 4773
    assert summary.mean() == pytest.approx(1.7560473e07 / 2693)


def test_special_values_blanks_and_trailing_commas() -> None:
    metrics = parse(
        "a NaN\n"
        "b -Inf\n"
        'c{x="1",} 2\n'
        'd { x = "1" , y="2" } 3\r\n'
        "e{} 4\n"
        'f 1e-3 # {trace_id="abc"} 1.0\n'
    )
    assert math.isnan(metrics.samples("a")[0].value)
    assert metrics.value("b") == -math.inf
    assert metrics.samples("c")[0].labels == {"x": "1"}
    assert metrics.samples("d")[0].labels == {"x": "1", "y": "2"}
    assert metrics.value("e") == 4
    assert metrics.value("f") == 0.001
    assert metrics.max("a") is None  # NaN never wins a max
    assert "e" in metrics and "zzz" not in metrics


def test_help_escapes_and_eof() -> None:
    metrics = parse("# HELP x line one\\nline two \\\\ done\nx 1\n# EOF\nignored{ 1\n")
    family = metrics.family("x")
    assert family is not None and family.help == "line one\nline two \\ done"
    assert len(metrics) == 1


def test_counters_declared_without_total_as_prometheus_client_writes_them() -> None:
    text = (
        "# HELP vllm:prompt_tokens Number of prefill tokens processed.\n"
        "# TYPE vllm:prompt_tokens counter\n"
        'vllm:prompt_tokens_total{model_name="m"} 120.0\n'
        'vllm:prompt_tokens_created{model_name="m"} 1.7e9\n'
    )
    metrics = parse(text)
    assert list(metrics.families) == ["vllm:prompt_tokens"]
    assert metrics.value("vllm:prompt_tokens_total") == 120


def test_interleaved_samples_join_their_family() -> None:
    text = '# TYPE h histogram\nh_bucket{le="1"} 1\nother 5\nh_count 1\nh_sum 0.5\n'
    metrics = parse(text)
    family = metrics.family("h")
    assert family is not None and [s.name for s in family.samples] == [
        "h_bucket",
        "h_count",
        "h_sum",
    ]
    assert family.mean() == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": "chatcmpl-malformed", "object": "chat.compl', "expected a metric name"),
        ("x", "has no value"),
        ("x abc", "invalid sample value"),
        ("x 1_000", "invalid sample value"),
        ("x 1 12.5", "invalid timestamp"),
        ("x 1 2 3", "unexpected text"),
        ('x{a="1",a="2"} 1', "given twice"),
        ('x{a="1} 1', "unterminated"),
        ('x{a="\\t"} 1', "invalid escape"),
        ("x{a=1} 1", "expected a quoted value"),
        ('x{a="1" b="2"} 1', "expected ',' or '}'"),
        ('x{a="1"b="2"} 1', "expected ',' or '}'"),
        ('x{a="1",,b="2"} 1', "expected a label name"),
        ('x{1a="1"} 1', "expected a label name"),
        ("# TYPE x gauge\n# TYPE x counter", "second # TYPE"),
        ("# HELP x a\n# HELP x b", "second # HELP"),
        ("x 1\n# TYPE x gauge", "after its samples"),
        ("# TYPE x histogramm", "unknown metric type"),
        ("# TYPE h histogram\nh_bucket 1", "numeric 'le'"),
        ('# TYPE h histogram\nh_bucket{le="high"} 1', "numeric 'le'"),
        ('# TYPE s summary\ns{quantile="median"} 1', "quantile"),
        ("# TYPE 9x gauge", "valid metric name"),
    ],
)
def test_malformed_expositions_name_the_line(text: str, message: str) -> None:
    with pytest.raises(PrometheusParseError) as info:
        parse("ok 1\n" + text)
    assert message in str(info.value)
    assert info.value.line_number >= 2
    assert str(info.value).startswith(f"line {info.value.line_number}: ")


def test_bytes_must_be_utf8() -> None:
    assert parse(b"x 1\n").value("x") == 1
    with pytest.raises(PrometheusParseError, match="not UTF-8"):
        parse(b"x\xff 1\n")


@pytest.mark.parametrize("prefix", ["", "vllm:"])
def test_nim_server_metrics_parse_with_either_prefix(prefix: str) -> None:
    with NimServer(metrics_prefix=prefix, waiting_override=7, kv_cache_override=0.5) as server:
        import httpx

        httpx.post(
            f"{server.base_url}/chat/completions",
            json={
                "model": "meta/llama-3.1-8b-instruct",
                "messages": [{"role": "user", "content": "a b c"}],
            },
            timeout=5,
        ).raise_for_status()
        text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    metrics = parse(text)
    assert metrics.family(f"{prefix}time_to_first_token_seconds").type == "histogram"  # type: ignore[union-attr]
    figures = ServerMetrics.from_metrics(metrics)
    assert figures.waiting == 7
    assert figures.kv_cache == 0.5
    assert figures.running == 0
    assert figures.max_running == 256
    assert figures.prompt_tokens_total == 6  # three words plus three per message
    assert figures.generation_tokens_total is not None and figures.generation_tokens_total > 0
    assert figures.e2e_mean is not None and figures.e2e_mean >= 0
    assert figures.ttft_mean is not None


def test_module_exports() -> None:
    assert set(exposition.__all__) >= {"parse", "Metrics", "MetricFamily", "Sample"}
    types = {"counter", "gauge", "histogram", "summary", "untyped"}
    assert types == exposition.METRIC_TYPES
