"""A parser of the Prometheus text exposition format (version 0.0.4), standard library only.

NIM serves its metrics (``/v1/metrics``) in this format, as does vLLM
(``/metrics``).  :func:`parse` reads a whole exposition and returns
:class:`Metrics`: the metric families in the order they appeared, each with
its ``# HELP`` text, ``# TYPE`` and samples::

    metrics = parse(text)
    metrics.value("num_requests_waiting")                      # summed over label sets
    metrics.value("gpu_cache_usage_perc", model_name="m")      # one label set
    metrics.family("time_to_first_token_seconds").mean()       # histogram _sum / _count

What it accepts, as Prometheus' own parser does:

- ``# HELP name text`` (``\\\\`` and ``\\n`` escapes) and ``# TYPE name type``
  with ``counter``, ``gauge``, ``histogram``, ``summary`` or ``untyped``;
  other ``#`` lines are comments;
- samples ``name{label="value",...} value [timestamp]``: label values with the
  ``\\\\``, ``\\"`` and ``\\n`` escapes, a trailing comma, blanks around
  tokens; values as Go's ``ParseFloat`` reads them, ``+Inf``, ``-Inf`` and
  ``NaN`` included; timestamps in integer milliseconds;
- the samples of a histogram (``_bucket`` with an ``le`` label, ``_sum``,
  ``_count``) and of a summary (``quantile`` label, ``_sum``, ``_count``) join
  the family their ``# TYPE`` line declared, as do a counter's ``_total`` and
  ``_created`` samples; a sample of no declared family makes an ``untyped``
  one;
- an OpenMetrics ``# EOF`` ends the exposition; OpenMetrics exemplars
  (``# {...} value``) after a sample are skipped.

What it refuses, with a :class:`~nimpipe.errors.PrometheusParseError` naming the line: a
malformed name, label or value; a label name given twice in one sample; a
second ``# HELP`` or ``# TYPE`` for one metric, or a ``# TYPE`` after the
metric's samples; an unknown type; a bucket without a numeric ``le`` or a
summary sample whose ``quantile`` is not a number.

Why not ``prometheus_client.parser``: its text parser is lax by design (its
docstring says so).  It takes 9 of the 22 malformed expositions
``tests/nim/test_prometheus.py`` must refuse as valid (a float timestamp, extra
values, an invalid escape, a second ``# TYPE``, a bucket without ``le``...),
names no line, once raises a ``ValueError`` with no message at all, reads past
``# EOF``, and files a counter's ``_total`` samples, or a histogram's
samples that come after an unrelated line, in families of their own.  It is
also about 3 times slower: 8 to 11 ms against 2.3 to 3 ms for a 345-line NIM
page, on every probe, in threads that share the interpreter lock with the
turns.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from nimpipe.errors import PrometheusParseError

__all__ = [
    "METRIC_TYPES",
    "MetricFamily",
    "Metrics",
    "Sample",
    "parse",
]

#: The metric types ``# TYPE`` may declare.
METRIC_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})

#: Sample-name suffixes that belong to a family of each type.
_SUFFIXES: Mapping[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "gauge": (),
    "histogram": ("_bucket", "_sum", "_count", "_created", "_gsum", "_gcount"),
    "summary": ("_sum", "_count", "_created"),
    "untyped": (),
}

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_SPECIAL_VALUES = {
    "inf": math.inf,
    "+inf": math.inf,
    "-inf": -math.inf,
    "infinity": math.inf,
    "+infinity": math.inf,
    "-infinity": -math.inf,
    "nan": math.nan,
}
_TIMESTAMP = re.compile(r"-?\d+")
#: An ordinary sample line: no escapes or blanks inside the labels, no exemplar.
#: Anything else goes through the full tokenizer.
_PLAIN_LABEL_TEXT = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*"'
_PLAIN_SAMPLE = re.compile(
    r"([a-zA-Z_:][a-zA-Z0-9_:]*)"
    rf"(?:\{{((?:{_PLAIN_LABEL_TEXT}(?:,{_PLAIN_LABEL_TEXT})*,?)?)\}})?"
    r"[ \t]+([^ \t]+)(?:[ \t]+(-?\d+))?[ \t]*"
)
_PLAIN_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"\\]*)"')
_BLANKS = " \t"
_LABEL_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


@attrs.frozen
class Sample:
    """One sample: its full name (``x_bucket``, ``x_total``...), labels, value and timestamp."""

    name: str
    labels: Mapping[str, str] = attrs.field(factory=dict, hash=False)
    value: float = 0.0
    #: Milliseconds since the epoch, when the exposition gave one.
    timestamp: int | None = None

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether every label in ``labels`` has this value on the sample."""
        return all(self.labels.get(k) == v for k, v in labels.items())


@attrs.frozen
class MetricFamily:
    """A metric family: a name, its type, its help text and its samples, in order."""

    name: str
    type: str = "untyped"
    help: str = ""
    samples: tuple[Sample, ...] = ()

    def select(self, suffix: str = "", **labels: str) -> Iterator[Sample]:
        """The samples named ``name + suffix`` whose labels include ``labels``."""
        wanted = self.name + suffix
        return (s for s in self.samples if s.name == wanted and s.matches(labels))

    def total(self, suffix: str = "", **labels: str) -> float | None:
        """Sum of the matching samples' values, or ``None`` if there is none."""
        values = [s.value for s in self.select(suffix, **labels)]
        return math.fsum(values) if values else None

    def mean(self, **labels: str) -> float | None:
        """A histogram's or summary's ``_sum`` over ``_count`` (``None`` with no observation)."""
        total = self.total("_sum", **labels)
        count = self.total("_count", **labels)
        if total is None or not count:
            return None
        return total / count

    def buckets(self, **labels: str) -> list[tuple[float, float]]:
        """A histogram's cumulative ``(le, count)`` pairs, summed over label sets, by bound."""
        counts: dict[float, float] = {}
        for sample in self.select("_bucket", **labels):
            bound = _parse_value(sample.labels["le"])
            counts[bound] = counts.get(bound, 0.0) + sample.value
        return sorted(counts.items())


@attrs.frozen
class Metrics:
    """A parsed exposition: metric families by name, in the order they appeared."""

    families: Mapping[str, MetricFamily] = attrs.field(factory=dict, hash=False)

    def family(self, name: str) -> MetricFamily | None:
        """The family called ``name``, or ``None``."""
        return self.families.get(name)

    def samples(self, name: str, **labels: str) -> list[Sample]:
        """Every sample whose full name is ``name`` and whose labels include ``labels``."""
        return [
            s
            for family in self.families.values()
            if name.startswith(family.name)
            for s in family.samples
            if s.name == name and s.matches(labels)
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """Sum of the samples named ``name`` matching ``labels``; ``None`` if there is none.

        ``name`` is a sample name, so a counter declared as ``x`` is read as
        ``x_total`` and a histogram's parts as ``x_sum``, ``x_count``...
        """
        values = [s.value for s in self.samples(name, **labels)]
        return math.fsum(values) if values else None

    def max(self, name: str, **labels: str) -> float | None:
        """Largest value among the samples named ``name`` matching ``labels``, or ``None``."""
        values = [s.value for s in self.samples(name, **labels) if not math.isnan(s.value)]
        return max(values) if values else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.samples(name))

    def __len__(self) -> int:
        return len(self.families)


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


@attrs.define
class _Family:
    name: str
    type: str = "untyped"
    help: str | None = None
    typed: bool = False
    samples: list[Sample] = attrs.field(factory=list)

    def owns(self, sample_name: str) -> bool:
        if sample_name == self.name:
            return True
        rest = sample_name[len(self.name) :] if sample_name.startswith(self.name) else None
        return rest is not None and rest in _SUFFIXES[self.type]

    def freeze(self) -> MetricFamily:
        return MetricFamily(self.name, self.type, self.help or "", tuple(self.samples))


def parse(text: str | bytes) -> Metrics:
    """Parse a Prometheus text exposition; raises :class:`PrometheusParseError`.

    ``bytes`` are decoded as UTF-8 (the format's encoding).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PrometheusParseError(
                f"not UTF-8 text ({exc.reason} at byte {exc.start})", line_number=1, line=""
            ) from None
    families: dict[str, _Family] = {}
    current: _Family | None = None
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        stripped = line.strip(_BLANKS)
        if not stripped:
            continue
        if stripped.startswith("#"):
            words = stripped[1:].lstrip(_BLANKS)
            if words == "EOF":
                break
            keyword, _, rest = _split_word(words)
            if keyword not in ("HELP", "TYPE"):
                continue  # an ordinary comment
            name, _, rest = _split_word(rest)
            if not _METRIC_NAME.fullmatch(name):
                raise PrometheusParseError(
                    f"# {keyword} needs a valid metric name", line_number=number, line=line
                )
            family = families.get(name)
            if family is None:
                family = families[name] = _Family(name)
            if keyword == "HELP":
                if family.help is not None:
                    raise PrometheusParseError(
                        f"second # HELP for {name}", line_number=number, line=line
                    )
                family.help = _unescape_help(rest)
            else:
                kind = rest.strip(_BLANKS)
                if kind not in METRIC_TYPES:
                    raise PrometheusParseError(
                        f"unknown metric type {kind!r} (expected one of "
                        f"{', '.join(sorted(METRIC_TYPES))})",
                        line_number=number,
                        line=line,
                    )
                if family.typed:
                    raise PrometheusParseError(
                        f"second # TYPE for {name}", line_number=number, line=line
                    )
                if family.samples:
                    raise PrometheusParseError(
                        f"# TYPE for {name} after its samples", line_number=number, line=line
                    )
                family.type = kind
                family.typed = True
            current = family
            continue
        sample = _parse_sample(line, number)
        owner = current if current is not None and current.owns(sample.name) else None
        if owner is None:
            owner = _find_owner(families, sample.name)
        if owner is None:
            owner = families[sample.name] = _Family(sample.name)
        _check_sample(owner, sample, number, line)
        owner.samples.append(sample)
        current = owner
    return Metrics({name: family.freeze() for name, family in families.items()})


def _find_owner(families: Mapping[str, _Family], sample_name: str) -> _Family | None:
    exact = families.get(sample_name)
    if exact is not None:
        return exact
    for suffixes in _SUFFIXES.values():
        for suffix in suffixes:
            if sample_name.endswith(suffix):
                family = families.get(sample_name[: -len(suffix)])
                if family is not None and family.owns(sample_name):
                    return family
    return None


def _check_sample(family: _Family, sample: Sample, number: int, line: str) -> None:
    if family.type == "histogram" and sample.name == family.name + "_bucket":
        le = sample.labels.get("le")
        if le is None or not _is_value(le):
            raise PrometheusParseError(
                "a histogram bucket needs a numeric 'le' label", line_number=number, line=line
            )
    if (
        family.type == "summary"
        and sample.name == family.name
        and "quantile" in sample.labels
        and not _is_value(sample.labels["quantile"])
    ):
        raise PrometheusParseError(
            "a summary's 'quantile' label must be a number", line_number=number, line=line
        )


def _split_word(text: str) -> tuple[str, str, str]:
    """Split off the first blank-separated word: ``(word, blank, rest)``."""
    text = text.lstrip(_BLANKS)
    for i, char in enumerate(text):
        if char in _BLANKS:
            return text[:i], char, text[i + 1 :].lstrip(_BLANKS)
    return text, "", ""


def _unescape_help(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in ("\\", "n"):
            out.append("\\" if text[i + 1] == "\\" else "\n")
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _is_value(text: str) -> bool:
    return text.lower() in _SPECIAL_VALUES or _NUMBER.fullmatch(text) is not None


def _parse_value(text: str) -> float:
    special = _SPECIAL_VALUES.get(text.lower())
    if special is not None:
        return special
    if _NUMBER.fullmatch(text) is None:
        raise ValueError(f"not a number: {text!r}")
    return float(text)


def _parse_sample(line: str, number: int) -> Sample:
    plain = _PLAIN_SAMPLE.fullmatch(line)
    if plain is not None:
        name, label_text, value_text, ts_text = plain.groups()
        pairs = _PLAIN_LABEL.findall(label_text) if label_text else []
        labels = dict(pairs)
        try:
            value = _parse_value(value_text)
        except ValueError:
            value = None
        if value is not None and len(labels) == len(pairs):
            return Sample(name, labels, value, int(ts_text) if ts_text is not None else None)
    return _tokenize_sample(line, number)


def _tokenize_sample(line: str, number: int) -> Sample:
    def fail(message: str) -> PrometheusParseError:
        return PrometheusParseError(message, line_number=number, line=line)

    pos = len(line) - len(line.lstrip(_BLANKS))
    match = _METRIC_NAME.match(line, pos)
    if match is None:
        raise fail("expected a metric name")
    name = match.group()
    pos = _skip_blanks(line, match.end())
    labels: dict[str, Any] = {}
    if pos < len(line) and line[pos] == "{":
        pos = _parse_labels(line, pos + 1, labels, fail)
        pos = _skip_blanks(line, pos)
    elif pos == match.end() and pos < len(line):
        raise fail(f"unexpected character {line[pos]!r} after the metric name")
    value_text, pos = _token(line, pos)
    if not value_text:
        raise fail(f"sample {name} has no value")
    try:
        value = _parse_value(value_text)
    except ValueError:
        raise fail(f"invalid sample value {value_text!r}") from None
    pos = _skip_blanks(line, pos)
    timestamp: int | None = None
    if pos < len(line) and line[pos] != "#":
        ts_text, pos = _token(line, pos)
        if not _TIMESTAMP.fullmatch(ts_text):
            raise fail(f"invalid timestamp {ts_text!r} (integer milliseconds expected)")
        timestamp = int(ts_text)
        pos = _skip_blanks(line, pos)
    if pos < len(line) and line[pos] != "#":
        raise fail("unexpected text after the sample")
    return Sample(name, labels, value, timestamp)


def _skip_blanks(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in _BLANKS:
        pos += 1
    return pos


def _token(line: str, pos: int) -> tuple[str, int]:
    start = pos
    while pos < len(line) and line[pos] not in _BLANKS:
        pos += 1
    return line[start:pos], pos


def _parse_labels(line: str, pos: int, labels: dict[str, Any], fail: Any) -> int:
    """Parse ``name="value",...}`` from ``pos``; returns the position after ``}``."""
    while True:
        pos = _skip_blanks(line, pos)
        if pos >= len(line):
            raise fail("unterminated label set")
        if line[pos] == "}":
            return pos + 1
        match = _LABEL_NAME.match(line, pos)
        if match is None:
            raise fail("expected a label name")
        label = match.group()
        if label in labels:
            raise fail(f"label {label!r} given twice")
        pos = _skip_blanks(line, match.end())
        if pos >= len(line) or line[pos] != "=":
            raise fail(f"expected '=' after label {label!r}")
        pos = _skip_blanks(line, pos + 1)
        if pos >= len(line) or line[pos] != '"':
            raise fail(f"expected a quoted value for label {label!r}")
        value, pos = _label_value(line, pos + 1, fail)
        labels[label] = value
        pos = _skip_blanks(line, pos)
        if pos < len(line) and line[pos] == ",":
            pos += 1
        elif pos < len(line) and line[pos] != "}":
            raise fail("expected ',' or '}' between labels")


def _label_value(line: str, pos: int, fail: Any) -> tuple[str, int]:
    out: list[str] = []
    while pos < len(line):
        char = line[pos]
        if char == '"':
            return "".join(out), pos + 1
        if char == "\\":
            if pos + 1 >= len(line):
                break
            escaped = _LABEL_ESCAPES.get(line[pos + 1])
            if escaped is None:
                raise fail(f"invalid escape '\\{line[pos + 1]}' in a label value")
            out.append(escaped)
            pos += 2
            continue
        out.append(char)
        pos += 1
    raise fail("unterminated label value")
