"""Shared fixtures.

Postgres: tests need ``DATABASE_URL`` (the README's test command provides one: the
machine's server, or an embedded one). They never skip without it: they fail. Each
test session works in its own freshly created database, dropped at the end, so runs
never see each other's rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.databases import throwaway_database

REPO_ROOT = Path(__file__).resolve().parent.parent


def _admin_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if not url:
        pytest.fail("DATABASE_URL is not set: run the tests with the README's test command")
    return url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh, empty database for this test session; dropped afterwards."""
    with throwaway_database(_admin_url(), "chatgate_test") as url:
        yield url
