"""Routing: the ``router`` and ``cascade`` stages, and why each call went where it went.

- :mod:`.router`: the ``router`` stage (rules on turn features, context fit,
  the cost optimiser, route health);
- :mod:`.cascade`: the ``cascade`` stage (cheap tier first, escalate while the
  answer is poor, fail over on errors) and its settings;
- :mod:`.scorers`: the cascade's local answer scorers;
- :mod:`.reasons`: the per-pipeline notes of why each call went to its route
  (the ledger stores them as ``routing_reason``).

Importing the package loads none of them.
"""
