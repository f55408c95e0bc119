"""The cost stages: prices, the ledger of every call, budgets and cost reports.

- :mod:`.prices`: per-token prices (route settings, the bundled snapshot).
- :mod:`.ledger`: the ``ledger`` stage and :class:`~.ledger.Ledger` (every call's record).
- :mod:`.writer`: the ledger's queue, batch writer thread, quarantine and spill file.
- :mod:`.rows`: a call record as a checked, cleaned row (or quarantine JSON).
- :mod:`.reports`: spend reports, their table, and ``nimpipe cost``.
- :mod:`.telemetry`: the ledger's optional OpenTelemetry export.
- :mod:`.store`: the ledger's tables and SQL.
- :mod:`.budget`: the ``budget`` stage (day, month and agent limits).
"""
