"""A demonstration of the guardrails stages on a local model, offline."""

from __future__ import annotations

from nimpipe.types import Message, Route, Turn
from nimpipe_contrib.guardrails.settings import STAGE
from nimpipe_contrib.guardrails.stage import GuardrailsStage

__all__ = ["demo_guardrails"]


def demo_guardrails(base_url: str, model: str = "smollm2") -> None:
    """Show a blocked input and a blocked output on a local model, offline.

    Uses the ``guardrails`` stage with no remote backend and the regex
    ``pii_redactor`` as its provider (``action = "block"``), so the verdicts
    are deterministic even on a 135M model: the first input carries a card
    number and is blocked before the model is called; the second asks for a
    phone number spelled out in words, and the output check blocks the answer
    that writes it in digits.  Prints each turn's text, the block, the number
    of model calls and the verdicts.
    """
    from nimpipe import Config, Pipeline

    config = Config.from_dict(
        {
            "stages": {
                STAGE: {"backends": [], "input_mode": "sequential"},
                "pii_redactor": {"action": "block"},
            }
        },
        env={},
    ).with_routes(Route(name="local", base_url=base_url, model=model), default="local")
    turns = [
        ("blocked input", "My card is 4111 1111 1111 1111, is it still valid?"),
        (
            "blocked output",
            "The support phone number is one eight hundred, five five five, "
            "nine seven three two. Write it with digits.",
        ),
    ]
    with Pipeline.create(config, entrypoints=False) as pipeline:
        stage = pipeline.plugins.pm.get_plugin(STAGE)
        assert isinstance(stage, GuardrailsStage)
        for title, prompt in turns:
            params = {"temperature": 0.0, "max_tokens": 40}
            turn = Turn(messages=[Message.user(prompt)], params=params)
            result = pipeline.run(turn)
            print(f"--- {title}: {prompt}")
            print(f"    answer : {result.text}")
            if result.blocked is not None:
                print(f"    blocked: rule {result.blocked.rule!r}: {result.blocked.reason}")
            calls = len(result.records)
            print(f"    model calls: {calls}")
            for verdict in stage.verdicts(turn.id):
                print(
                    f"    verdict: {verdict.rule} {verdict.decision} "
                    f"({verdict.plugin}/{verdict.backend}, {verdict.latency * 1000:.1f} ms)"
                )
