"""The manifests' way to the database works: DATABASE_URL names a libpq service, and the
service file (host, database, user, password), mounted from a Secret, holds the rest.

deploy/kubernetes sets ``DATABASE_URL=service=chatgate`` and ``PGSERVICEFILE`` so that
the password is a file, never an environment variable. This runs the real ``chatgate
migrate`` with exactly those two values (the file written as kubelet writes a Secret's,
group-readable 0440) against a fresh database, which it can only find through the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import _admin_url
from tests.databases import throwaway_database
from tests.kubernetes import environment, rendered


def test_migrate_finds_the_database_through_the_service_file(tmp_path: Path) -> None:
    objects = rendered("base")
    job = objects.one("Job", "chatgate-migrate")["spec"]["template"]
    env = environment(objects, job["spec"]["containers"][0])
    with throwaway_database(_admin_url(), "chatgate_k8s") as url:
        params = conninfo_to_dict(url)
        service = env["DATABASE_URL"].removeprefix("service=")
        fields = [f"{key}={params[key]}" for key in ("host", "port", "dbname", "user") if key in params]
        lines = [f"[{service}]", *fields]
        service_file = tmp_path / "pg_service.conf"
        service_file.write_text("\n".join([*lines, "password=not-in-the-environment", ""]))
        service_file.chmod(0o440)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CHATGATE_", "DATABASE_URL"))}
        ran = subprocess.run(
            [sys.executable, "-m", "chatgate_server", "migrate"],
            env={**base, "DATABASE_URL": env["DATABASE_URL"], "PGSERVICEFILE": str(service_file)},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert "not-in-the-environment" not in ran.stdout + ran.stderr
        with psycopg.connect(url) as conn:
            applied = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert applied is not None and applied[0] > 0
