"""The chaos soak: the real service under faults, audited afterwards.

``python -m bench.soak --seconds 600`` runs chatgate (a real ``chatgate serve``
process) against the simulator with fault bursts and against Postgres through a proxy
that is cut and restored, while callers send calls with random deadlines and cancels;
midway chatgate gets one SIGTERM and, later, one kill -9 while Postgres hangs, and is
restarted each time on the same spool. Afterwards it audits what a user and a billing
team would check — calls against usage rows, statuses against the error model, memory, leftover upstream
connections, the OpenAI key in logs and rows, health latency under load — prints the
figures and exits non-zero if any check fails. ``tests/integration/test_soak.py`` runs a
60 s version in the test command; docs/RELIABILITY.md has a long run's figures.

Modules: ``world`` (the processes and the database), ``traffic`` (the callers),
``audit`` (the checks), ``__main__`` (the timeline and the report).
"""
