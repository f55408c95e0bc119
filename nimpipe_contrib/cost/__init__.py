"""The cost stages: prices, the ledger of every call, budgets and cost reports.

- :mod:`.prices`: per-token prices (route settings, the bundled snapshot).
- :mod:`.ledger`: the ``ledger`` stage (every call's record, SQLite or PostgreSQL).
- :mod:`.store`: the ledger's tables and SQL.
- :mod:`.budget`: the ``budget`` stage (day, month and agent limits).
"""
