"""Stages for nimpipe.

Each stage is one module registered as an ordinary plugin under a short name
(see ``nimpipe.plugins.CONTRIB_STAGES``): ``catalog``, ``health``,
``guardrails``, ``pii``, ``ledger``, ``budget``, ``router``, ``cascade``.
Modules whose names start with an underscore, and ``prometheus``,
``pricing``, ``route_reasons``, ``guardrails_backends`` and
``guardrails_hooks``, are shared building blocks, not stages.
"""
