"""Who is calling: caller records, their credentials, and the in-memory caller table.

- :mod:`tokens`: mint, parse and hash service tokens (``cgt_<public id>_<secret>``).
- :mod:`records`: a credential as the table holds it, and the one rule that decides
  whether it may call now (revoked, expired, rotated out).
- :mod:`store`: the callers and credentials in Postgres (SQL lives here and in usage/).
- :mod:`table`: every credential in memory, refreshed from Postgres within a second,
  so that no call waits on the database to be authenticated.
- :mod:`commands`: ``chatgate callers create | list | revoke | rotate``.

Nothing here imports grpc: the rpc edge reads the ``authorization`` metadata and asks
the table for the :class:`~chatgate_server.domain.Caller`.
"""
