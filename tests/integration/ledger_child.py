"""A process with a usage ledger, for tests that kill it: ``python -m tests.integration.ledger_child
URL SPOOL_DIR TENANT COUNT``.

Writes a few rows and waits until they are stored (the pool is connected), prints
``ready``; on a line on stdin submits COUNT rows and prints ``submitted``; then waits
to be killed. The write timeout is a minute: only spooling a stuck write early can put
the rows on disk in time.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from chatgate_server.usage.ledger import UsageLedger
from chatgate_server.usage.spool import Spool
from chatgate_server.usage.store import UsageStore
from tests.integration.test_ledger import make_record


async def main(url: str, spool_dir: Path, tenant: str, count: int) -> None:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(url, min_size=1, max_size=4, open=False)
    await pool.open(wait=True, timeout=30)
    spool = Spool(spool_dir, max_bytes=10**8)
    spool.open()
    ledger = UsageLedger(UsageStore(pool), spool, write_timeout_s=60.0, retry_base_s=0.05, retry_cap_s=0.2)
    ledger.start()
    for n in range(3):
        ledger.submit(make_record(tenant, n))
    async with asyncio.timeout(30):
        await ledger.wait_stored()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    for n in range(3, 3 + count):
        ledger.submit(make_record(tenant, n))
    print("submitted", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
