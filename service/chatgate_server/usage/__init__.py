"""The usage ledger: one row per request in Postgres, for billing, quotas and abuse.

- ``pricing``: the price table (``prices.csv``, CHATGATE_PRICES_FILE over it) and what a call costs.
- ``ledger``: the in-memory queue, the background writer and the spool replayer (off
  the request path); ``spool``: the on-disk spool while Postgres is away.
- ``admission``: caller-supplied request ids (retry admitted, reuse refused).
- ``store``: the SQL that writes batches of :class:`~chatgate_server.domain.UsageRecord`
  and keeps the daily roll-up.
- ``partitions``: monthly partitions of ``usage_records``, created ahead of time.
- ``migrate``: the versioned SQL files in ``migrations/`` and their runner.
- ``reports``: totals and breakdowns over a window (UsageService and ``chatgate usage``).
- ``maintenance``: retention and repricing; ``commands``: the operator CLI commands.

Only this package holds SQL.
"""
