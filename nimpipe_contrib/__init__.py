"""Stages for nimpipe.

Each stage is one module registered as an ordinary plugin under a short name
(see ``nimpipe.plugins.CONTRIB_STAGES``): ``nim.catalog``, ``nim.health``,
``ledger``, ``budget``, ``guardrails.stage``, ``guardrails.pii``,
``routing.router``, ``routing.cascade``.  The packages ``nim``, ``guardrails``
and ``routing`` hold a subsystem each (see their docstrings); their other
modules, modules whose names start with an underscore, and ``pricing``
are shared building blocks, not stages.
"""
