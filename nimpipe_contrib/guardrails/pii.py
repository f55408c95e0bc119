"""The ``pii_redactor`` stage: regex PII redaction, no model needed.

Finds e-mail addresses, phone numbers, payment card numbers (Luhn-checked),
IBANs (mod-97-checked), US social security numbers and API-key-like tokens
(``sk-...``, ``nvapi-...``, GitHub, Slack, AWS and Google keys, JWTs), and
either replaces each with a placeholder (``[EMAIL]``, ``[CARD]``...) or
blocks the text.  Enable it with a ``[stages.pii_redactor]`` table (the
settings and their defaults are :class:`PiiSettings`; ``docs/guardrails.md``
explains them).

With the ``guardrails`` stage enabled it is a guardrails provider: it
implements the checker hooks of :mod:`nimpipe_contrib.guardrails.checkers` and
the guardrails stage aggregates its verdicts with its backends' (redaction
happens before the model and the backends see the input, and blocks are
recorded like any rail's).  Alone, it rewrites or blocks input and output
itself, through ``pre_input`` and ``post_output`` (both ``tryfirst``, so that
later stages never see the PII).

Verdicts never carry the PII itself: a ``block`` names the kinds found, a
``rewrite`` carries the redacted text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs

from nimpipe.errors import ConfigError
from nimpipe.stage import API_KEY, hookimpl
from nimpipe.types import Block, Output, Role, ToolCall, Turn, Verdict
from nimpipe_contrib.guardrails.checkers import declare_hooks
from nimpipe_contrib.guardrails.verdicts import VerdictLog, publish_verdict

if TYPE_CHECKING:
    import pluggy

    from nimpipe.pipeline import Pipeline

__all__ = [
    "KINDS",
    "STAGE",
    "Finding",
    "PiiRedactor",
    "PiiSettings",
    "create_plugin",
    "find_pii",
    "luhn_valid",
    "redact",
]

#: The stage's name.
STAGE = "pii_redactor"

#: The kinds of PII found, in the order they are looked for (earlier kinds win overlaps).
KINDS = ("api_key", "email", "iban", "card", "ssn", "phone")

_PLACEHOLDERS: Mapping[str, str] = {
    "api_key": "[API_KEY]",
    "email": "[EMAIL]",
    "iban": "[IBAN]",
    "card": "[CARD]",
    "ssn": "[SSN]",
    "phone": "[PHONE]",
}

_PATTERNS: Mapping[str, re.Pattern[str]] = {
    "api_key": API_KEY,
    "email": re.compile(
        r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
    ),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"),
    "card": re.compile(r"(?<![\d+-])\d(?:[ -]?\d){12,18}(?![\d-])"),
    "ssn": re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"),
    "phone": re.compile(
        r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?"
        r"\d{2,4}(?:[ .-]\d{2,4}){1,4}(?!\w|[.-]\d)"
        r"|(?<![\w+])\+\d{8,15}(?!\w)"
    ),
}

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


def luhn_valid(digits: str) -> bool:
    """Whether a string of digits passes the Luhn check (payment card numbers)."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _iban_valid(text: str) -> bool:
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def _accept(kind: str, text: str) -> bool:
    if kind == "card":
        digits = re.sub(r"\D", "", text)
        return 13 <= len(digits) <= 19 and luhn_valid(digits)
    if kind == "iban":
        return _iban_valid(text)
    if kind == "phone":
        digits = re.sub(r"\D", "", text)
        if not 7 <= len(digits) <= 15:
            return False
        return not (_ISO_DATE.fullmatch(text) or _DOTTED_QUAD.fullmatch(text))
    return True


@attrs.frozen
class Finding:
    """One piece of PII: its kind and where it is (``text[start:end]``)."""

    kind: str
    start: int
    end: int


def find_pii(text: str, kinds: Iterable[str] = KINDS) -> list[Finding]:
    """Every piece of PII in ``text``, in order; earlier kinds of :data:`KINDS` win overlaps."""
    wanted = set(kinds)
    taken: list[Finding] = []
    for kind in KINDS:
        if kind not in wanted:
            continue
        for match in _PATTERNS[kind].finditer(text):
            start, end = match.span()
            if any(start < f.end and f.start < end for f in taken):
                continue
            if _accept(kind, match.group()):
                taken.append(Finding(kind, start, end))
    return sorted(taken, key=lambda f: f.start)


def redact(text: str, kinds: Iterable[str] = KINDS) -> tuple[str, list[Finding]]:
    """``text`` with each piece of PII replaced by its placeholder, and the findings."""
    findings = find_pii(text, kinds)
    if not findings:
        return text, findings
    parts = []
    position = 0
    for finding in findings:
        parts.append(text[position : finding.start])
        parts.append(_PLACEHOLDERS[finding.kind])
        position = finding.end
    parts.append(text[position:])
    return "".join(parts), findings


def _rule(findings: Sequence[Finding]) -> str:
    kinds = sorted({f.kind for f in findings}, key=KINDS.index)
    return "pii:" + ",".join(kinds)


@attrs.frozen(kw_only=True)
class PiiSettings:
    """The ``[stages.pii_redactor]`` table, validated."""

    #: ``redact`` replaces PII with placeholders; ``block`` stops the turn.
    action: Literal["redact", "block"] = "redact"
    #: The kinds looked for.
    kinds: tuple[str, ...] = KINDS
    #: Judge (and redact) the user's messages.
    check_input: bool = True
    #: Judge (and redact) the answer.
    check_output: bool = True
    #: Judge tool-call arguments (a tool call cannot be rewritten: only ``block`` acts).
    check_tool_calls: bool = True

    @classmethod
    def from_table(cls, table: Mapping[str, Any], source: str | None = None) -> PiiSettings:
        """Validate a settings table; raises :class:`ConfigError` naming the key."""

        def fail(key: str, message: str) -> ConfigError:
            return ConfigError(message, path=source, key=f"stages.{STAGE}.{key}")

        known = {"action", "kinds", "check_input", "check_output", "check_tool_calls"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise fail(unknown[0], f"unknown setting (known: {', '.join(sorted(known))})")
        kwargs: dict[str, Any] = {}
        if "action" in table:
            if table["action"] not in ("redact", "block"):
                raise fail("action", f"must be redact or block, got {table['action']!r}")
            kwargs["action"] = table["action"]
        if "kinds" in table:
            kinds = table["kinds"]
            if not isinstance(kinds, (list, tuple)) or not kinds:
                raise fail("kinds", f"must be a non-empty list of {', '.join(KINDS)}")
            for kind in kinds:
                if kind not in KINDS:
                    raise fail("kinds", f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
            kwargs["kinds"] = tuple(kinds)
        for key in ("check_input", "check_output", "check_tool_calls"):
            if key in table:
                if not isinstance(table[key], bool):
                    raise fail(key, f"must be true or false, got {table[key]!r}")
                kwargs[key] = table[key]
        return cls(**kwargs)


@attrs.define
class PiiRedactor:
    """The ``pii_redactor`` stage; also a guardrails provider (see the module docstring).

    :param settings: the settings; ``None`` reads ``[stages.pii_redactor]`` at ``configure``.
    """

    settings: PiiSettings | None = None
    #: Verdicts of the turns judged while working alone (with the guardrails
    #: stage, they are recorded by that stage).
    verdict_log: VerdictLog = attrs.field(factory=VerdictLog)
    #: Whether it acts alone (no ``guardrails`` stage in the pipeline).
    standalone: bool = attrs.field(default=True, init=False)

    @hookimpl
    def addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
        declare_hooks(pluginmanager)

    @hookimpl
    def configure(self, pipeline: Pipeline) -> None:
        if self.settings is None:
            self.settings = PiiSettings.from_table(
                pipeline.config.stage(STAGE), pipeline.config.source
            )
        self.standalone = pipeline.plugins.pm.get_plugin("guardrails") is None

    @property
    def _settings(self) -> PiiSettings:
        if self.settings is None:
            self.settings = PiiSettings()
        return self.settings

    def judge(self, text: str) -> Verdict | None:
        """The verdict on ``text``: ``None`` when it holds no PII."""
        settings = self._settings
        redacted, findings = redact(text, settings.kinds)
        if not findings:
            return None
        rule = _rule(findings)
        if settings.action == "block":
            kinds = ", ".join(sorted({f.kind for f in findings}, key=KINDS.index))
            return Verdict(
                rule=rule, decision="block", plugin=STAGE, backend="regex", detail=f"found {kinds}"
            )
        return Verdict(
            rule=rule, decision="rewrite", plugin=STAGE, backend="regex", detail=redacted
        )

    # -- as a guardrails provider -------------------------------------------------------

    @hookimpl
    def guardrails_check_input(self, text: str) -> Verdict | None:
        return self.judge(text) if self._settings.check_input else None

    @hookimpl
    def guardrails_check_output(self, text: str) -> Verdict | None:
        return self.judge(text) if self._settings.check_output else None

    @hookimpl
    def guardrails_check_tool_call(self, call: ToolCall) -> Verdict | None:
        settings = self._settings
        if not settings.check_tool_calls or settings.action != "block":
            return None
        return self.judge(call.arguments)

    # -- alone ----------------------------------------------------------------------------

    @hookimpl(tryfirst=True)
    def pre_input(self, turn: Turn, pipeline: Pipeline) -> Turn | Block | None:
        if not self.standalone or not self._settings.check_input:
            return None
        messages = list(turn.messages)
        changed = False
        for index, message in enumerate(messages):
            if message.role is not Role.USER or not message.content:
                continue
            verdict = self.judge(message.content)
            if verdict is None:
                continue
            publish_verdict(pipeline, turn, _summarised(verdict, message.content), self.verdict_log)
            if verdict.decision == "block":
                return Block(reason=f"input: {verdict.detail}", plugin=STAGE, rule=verdict.rule)
            messages[index] = attrs.evolve(message, content=verdict.detail)
            changed = True
        return attrs.evolve(turn, messages=messages) if changed else None

    @hookimpl(tryfirst=True)
    def post_output(self, turn: Turn, output: Output, pipeline: Pipeline) -> str | Block | None:
        if not self.standalone or not self._settings.check_output:
            return None
        verdict = self.judge(output.text)
        if verdict is None:
            return None
        publish_verdict(pipeline, turn, _summarised(verdict, output.text), self.verdict_log)
        if verdict.decision == "block":
            return Block(reason=f"output: {verdict.detail}", plugin=STAGE, rule=verdict.rule)
        return verdict.detail


def _summarised(verdict: Verdict, text: str) -> Verdict:
    if verdict.decision != "rewrite":
        return verdict
    return attrs.evolve(verdict, detail=f"redacted ({len(text)} -> {len(verdict.detail)} chars)")


def create_plugin() -> PiiRedactor:
    """The stage object registered as ``pii_redactor`` (one per pipeline)."""
    return PiiRedactor()
