"""The NemoGuard safety services as check backends: content safety, topic control, jailbreak."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import attrs

from nimpipe.errors import BackendUnavailable
from nimpipe.stage import scrub
from nimpipe.types import ToolCall, Verdict
from nimpipe_contrib.guardrails.backends.base import elapsed, excerpt, render_tool_call
from nimpipe_contrib.guardrails.backends.http import JsonClient, chat_reply, error_text

__all__ = [
    "CONTENT_SAFETY_PROMPT",
    "ContentSafetyBackend",
    "JailbreakBackend",
    "TopicControlBackend",
]

#: The NemoGuard content-safety prompt; ``{conversation}`` is replaced by the
#: ``user: ...`` (and ``response: agent: ...``) lines.
CONTENT_SAFETY_PROMPT = """\
Task: Check if there is unsafe content in the user or agent messages in the below \
conversation in accordance with our safety policy with the below categories. Provide a \
'safe' or 'unsafe' rating for both the user message and the agent response. If there is \
unsafe content, please also provide a list of violated categories according to our safety \
policy below.

<BEGIN UNSAFE CONTENT CATEGORIES>
S1: Violence.
S2: Sexual.
S3: Criminal Planning/Confessions.
S4: Guns and Illegal Weapons.
S5: Controlled/Regulated Substances.
S6: Suicide and Self Harm.
S7: Sexual (minor).
S8: Hate/Identity Hate.
S9: PII/Privacy.
S10: Harassment.
S11: Threat.
S12: Profanity.
S13: Needs Caution.
S14: Other.
S15: Manipulation.
S16: Fraud/Deception.
S17: Malware.
S18: High Risk Gov Decision Making.
S19: Political/Misinformation/Conspiracy.
S20: Copyright/Trademark/Plagiarism.
S21: Unauthorized Advice.
S22: Illegal Activity.
S23: Immoral/Unethical.
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

{conversation}

<END CONVERSATION>

Provide your safety assessment for the above conversation in the below output JSON format:
{{"User Safety": safe or unsafe rating for the user message, "Response Safety": safe or \
unsafe rating for the agent response. Omit if no agent response present. "Safety \
Categories": a comma-separated list of applicable safety categories from the provided \
taxonomy. Omit if all safe.}}

Do not include anything other than the output JSON in your response.
Output JSON: """


def _json_object(backend: str, text: str) -> Mapping[str, Any]:
    """The first JSON object in a model's reply (models wrap it in prose or fences)."""
    start = text.find("{")
    if start >= 0:
        try:
            value, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            value = None
        if isinstance(value, Mapping):
            return value
    raise BackendUnavailable(backend, f"the reply is not a JSON verdict: {excerpt(text, 120)!r}")


@attrs.define(kw_only=True)
class _ChatBackend:
    """A NemoGuard model behind an OpenAI-compatible chat endpoint."""

    base_url: str
    model: str
    timeout: float = 10.0
    api_key: str | None = attrs.field(default=None, repr=False)
    name: str = "chat"
    _http: JsonClient = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self._http = JsonClient(self.name, self.timeout, self.api_key)

    async def start(self) -> None:
        """Nothing to load."""

    async def _ask(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, float]:
        body = {"model": self.model, "messages": messages, "temperature": 0.0}
        body["max_tokens"] = max_tokens
        started = time.perf_counter()
        status, data = await self._http.post_json(f"{self.base_url}/chat/completions", body)
        return chat_reply(self.name, status, data), elapsed(started)

    async def aclose(self) -> None:
        await self._http.aclose()


@attrs.define(kw_only=True)
class ContentSafetyBackend(_ChatBackend):
    """NemoGuard content safety (``llama-3.1-nemoguard-8b-content-safety``).

    Input: judged on ``"User Safety"``; output and tool calls: on
    ``"Response Safety"``.  The violated categories go in the verdict's
    ``detail``.  A reply without a JSON verdict is :class:`BackendUnavailable`.
    """

    name: str = "content_safety"
    #: The prompt template (``{conversation}`` placeholder).
    prompt: str = CONTENT_SAFETY_PROMPT
    rule: str = "content safety"

    async def _judge(self, conversation: str, key: str) -> Verdict:
        content = self.prompt.format(conversation=conversation)
        reply, latency = await self._ask([{"role": "user", "content": content}], 64)
        verdict = _json_object(self.name, reply)
        rating = verdict.get(key)
        if not isinstance(rating, str) or rating.strip().lower() not in ("safe", "unsafe"):
            raise BackendUnavailable(self.name, f"no {key!r} rating in {excerpt(reply, 120)!r}")
        categories = scrub(str(verdict.get("Safety Categories") or ""))
        if rating.strip().lower() == "unsafe":
            return Verdict(
                rule=self.rule,
                decision="block",
                backend=self.name,
                latency=latency,
                detail=categories or key,
            )
        return Verdict(rule=self.rule, decision="pass", backend=self.name, latency=latency)

    async def check_input(self, text: str, model: str) -> Verdict | None:
        """Judge the user message."""
        return await self._judge(f"user: {text}", "User Safety")

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None:
        """Judge the agent's answer to ``prompt``."""
        return await self._judge(f"user: {prompt}\n\nresponse: agent: {text}", "Response Safety")

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None:
        """Judge a proposed tool call as the agent's response."""
        return await self.check_output(prompt, render_tool_call(call), model)


@attrs.define(kw_only=True)
class TopicControlBackend(_ChatBackend):
    """NemoGuard topic control (``llama-3.1-nemoguard-8b-topic-control``): input only.

    The system prompt states what the assistant may talk about; the model
    answers ``on-topic`` or ``off-topic``.  Anything else is
    :class:`BackendUnavailable`.
    """

    name: str = "topic_control"
    #: The allowed-topics instructions (the system prompt).
    system_prompt: str = ""
    rule: str = "topic control"

    async def check_input(self, text: str, model: str) -> Verdict | None:
        """Judge whether the user message stays on the allowed topics."""
        system = self.system_prompt.strip()
        system += (
            '\n\nIf any of the above conditions are violated, please respond with "off-topic". '
            'Otherwise, respond with "on-topic". '
            'You must respond with "on-topic" or "off-topic".'
        )
        messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        reply, latency = await self._ask(messages, 8)
        answer = reply.strip().strip(".\"'").lower()
        if answer == "off-topic":
            return Verdict(
                rule=self.rule, decision="block", backend=self.name, latency=latency, detail=answer
            )
        if answer == "on-topic":
            return Verdict(rule=self.rule, decision="pass", backend=self.name, latency=latency)
        raise BackendUnavailable(
            self.name, f"expected on-topic or off-topic, got {excerpt(reply, 80)!r}"
        )

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None:
        """Topic control judges input only."""
        return None

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None:
        """Topic control judges input only."""
        return None


@attrs.define(kw_only=True)
class JailbreakBackend:
    """NemoGuard jailbreak detection: ``POST {url}/v1/classify {"input": text}``; input only.

    :param url: the service root (``/v1/classify`` is appended unless the URL
        already ends with ``/classify``).
    :param threshold: when set, block on ``score >= threshold`` instead of the
        service's ``jailbreak`` flag.
    """

    url: str
    timeout: float = 10.0
    api_key: str | None = attrs.field(default=None, repr=False)
    threshold: float | None = None
    name: str = "jailbreak"
    rule: str = "jailbreak detection"
    _http: JsonClient = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        url = self.url.rstrip("/")
        if not url.endswith("/classify"):
            url = f"{url[:-3] if url.endswith('/v1') else url}/v1/classify"
        self.url = url
        self._http = JsonClient(self.name, self.timeout, self.api_key)

    async def start(self) -> None:
        """Nothing to load."""

    async def check_input(self, text: str, model: str) -> Verdict | None:
        """Classify the user message."""
        started = time.perf_counter()
        status, data = await self._http.post_json(self.url, {"input": text})
        latency = elapsed(started)
        if status != 200 or not isinstance(data, Mapping):
            raise BackendUnavailable(self.name, f"HTTP {status}: {error_text(data)}")
        flag = data.get("jailbreak")
        score = data.get("score")
        if not isinstance(flag, bool):
            raise BackendUnavailable(self.name, f"no boolean 'jailbreak' in {excerpt(data, 120)}")
        numeric = isinstance(score, (int, float)) and not isinstance(score, bool)
        value = float(score) if numeric else None  # type: ignore[arg-type]
        if self.threshold is not None and value is not None:
            flag = value >= self.threshold
        detail = f"score {value:.3f}" if value is not None else ""
        return Verdict(
            rule=self.rule,
            decision="block" if flag else "pass",
            backend=self.name,
            latency=latency,
            detail=detail,
        )

    async def check_output(self, prompt: str, text: str, model: str) -> Verdict | None:
        """Jailbreak detection judges input only."""
        return None

    async def check_tool_call(self, prompt: str, call: ToolCall, model: str) -> Verdict | None:
        """Jailbreak detection judges input only."""
        return None

    async def aclose(self) -> None:
        await self._http.aclose()
