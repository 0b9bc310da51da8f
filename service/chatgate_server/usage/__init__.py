"""The usage ledger: one row per request in Postgres, for billing, quotas and abuse.

- ``pricing``: model prices and :func:`~chatgate_server.usage.pricing.cost_of`.
- ``ledger``: the bounded in-memory queue and background writer (off the request path).
- ``store``: the SQL that writes batches of :class:`~chatgate_server.domain.UsageRecord`
  and keeps the daily roll-up.
- ``partitions``: monthly partitions of ``usage_records``, created ahead of time.
- ``migrate``: the versioned SQL files in ``migrations/`` and their runner.

Only this package holds SQL.
"""
