"""Guardrails: the ``guardrails`` and ``pii_redactor`` stages, their backends and hooks.

One job per module:

- :mod:`.settings`: the ``[stages.guardrails]`` table, its defaults and checks;
- :mod:`.stage`: the ``guardrails`` stage (registered under that name);
- :mod:`.companions`: the plugins the stage registers next to itself for
  optional jobs (provider input checks, tool calls, guarded generation);
- :mod:`.judge`: how verdicts become a decision (block, rewrite, let through);
- :mod:`.generation`: guarded generation, the model call made through NeMo;
- :mod:`.verdicts`: the rules the stages give, the per-turn verdict log,
  publishing a verdict;
- :mod:`.checkers`: the checker hookspecs (``guardrails_check_input``,
  ``guardrails_check_output``, ``guardrails_check_tool_call``) through which
  any plugin becomes a guardrails provider;
- :mod:`.backends`: NeMo Guardrails as a microservice or in process, and the
  NemoGuard safety services;
- :mod:`.pii`: the ``pii_redactor`` stage (regex PII redaction);
- :mod:`.demo`: :func:`~.demo.demo_guardrails`, both stages on a local model.

Importing the package loads none of them.
"""
