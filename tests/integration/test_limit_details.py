"""What a caller sees of limits, end to end: allowances on the first event, and refusals
it can act on — through a real chatgate whose admission chain holds a scripted policy
(tests/integration/scripted_limits.py), read by the Python client and by grpcurl.

The Node client's side of the same is clients/node/test/limits.test.mjs, run by
test_node_client.py against the same policy.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from chatgate.client import (
    Allowance,
    AsyncClient,
    ChatgateError,
    Client,
    LimitKind,
    QuotaViolation,
    Started,
    build_request,
)
from chatgate_server.app import App
from tests.conftest import REPO_ROOT
from tests.integration.conftest import AppFactory
from tests.integration.scripted_limits import (
    ADMITTED_USER,
    BLOCKED_USER,
    MONTHLY_USER,
    ONCE_USER,
    PER_MINUTE_USER,
    ScriptedLimits,
)

# ALLOWANCES of scripted_limits.py, as the client types them.
EXPECTED_ALLOWANCES = (
    Allowance(
        "tenant:scripted",
        LimitKind.TOKENS_PER_MINUTE,
        30_000,
        29_400,
        datetime(2030, 1, 1, 0, 0, 30, 250_000, tzinfo=UTC),
    ),
    Allowance(
        f"user:scripted/{ADMITTED_USER}/model:gpt-4o-mini",
        LimitKind.REQUESTS_PER_MINUTE,
        60,
        59,
        datetime(2030, 1, 1, 0, 0, 1, tzinfo=UTC),
    ),
    Allowance(
        "tenant:scripted",
        LimitKind.SPEND_PER_MONTH,
        5_000_000_000,
        4_999_000_000,
        datetime(2030, 2, 1, tzinfo=UTC),
    ),
    Allowance("caller:scripted/billing", LimitKind.CONCURRENT_STREAMS, 4, 3, None),
)


@pytest.fixture
async def limited(start_app: AppFactory) -> App:
    return await start_app(extra_policies=(ScriptedLimits(),))


@pytest.fixture
async def client(limited: App) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{limited.port}", timeout=10) as c:
        yield c


async def refusal(client: AsyncClient, user_id: str) -> ChatgateError:
    with pytest.raises(ChatgateError) as caught:
        await client.collect(build_request("gpt-4o-mini", "hello", user_id=user_id))
    return caught.value


async def test_the_first_event_carries_each_limits_headroom(client: AsyncClient) -> None:
    events = [e async for e in client.complete(build_request("gpt-4o-mini", "hi", user_id=ADMITTED_USER))]
    started = events[0]
    assert isinstance(started, Started)
    assert started.allowances == EXPECTED_ALLOWANCES
    tokens = started.allowances[0]
    assert tokens.kind == "tokens_per_minute"  # a readable name, as operators write it
    assert tokens.resets_at is not None and tokens.resets_at.utcoffset() is not None  # aware
    completion = await client.collect(build_request("gpt-4o-mini", "hi", user_id=ADMITTED_USER))
    assert completion.allowances == EXPECTED_ALLOWANCES and completion.text


async def test_no_limit_means_no_allowances(client: AsyncClient) -> None:
    completion = await client.collect(build_request("gpt-4o-mini", "hi", user_id="someone-unlimited"))
    assert completion.allowances == () and completion.finished


async def test_a_per_minute_refusal_says_which_limit_whose_and_when_to_come_back(
    client: AsyncClient,
) -> None:
    error = await refusal(client, PER_MINUTE_USER)
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.known_reason == "TOKENS_PER_MINUTE_EXCEEDED" and error.limit_exceeded
    assert error.quota_violations == (
        QuotaViolation(f"user:scripted/{PER_MINUTE_USER}", "tokens_per_minute 10000 reached"),
        QuotaViolation("tenant:scripted", "tokens_per_minute 30000 reached"),
    )
    assert error.retry_delay == 12.0
    assert error.waiting_helps and error.retryable
    assert error.events_received == 0


async def test_a_spent_monthly_budget_says_waiting_does_not_help(client: AsyncClient) -> None:
    error = await refusal(client, MONTHLY_USER)
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.known_reason == "SPEND_PER_MONTH_EXCEEDED" and error.limit_exceeded
    assert [v.subject for v in error.quota_violations] == ["tenant:scripted"]
    assert error.retry_delay is None
    assert not error.waiting_helps and not error.retryable


async def test_a_block_is_permission_denied_with_its_reason(client: AsyncClient) -> None:
    error = await refusal(client, BLOCKED_USER)
    assert error.code is grpc.StatusCode.PERMISSION_DENIED
    assert error.known_reason == "BLOCKED" and not error.limit_exceeded
    assert "abuse review" in error.message
    assert error.retry_delay is None and not error.waiting_helps and not error.retryable


async def test_every_refused_call_leaves_a_rejected_row(
    client: AsyncClient, limited: App, migrated_database_url: str
) -> None:
    for user_id in (PER_MINUTE_USER, MONTHLY_USER, BLOCKED_USER):
        await refusal(client, user_id)
    assert limited.ledger is not None
    await limited.ledger.flush()
    with psycopg.connect(migrated_database_url) as conn:
        rows = conn.execute(
            "SELECT user_id, outcome, grpc_status, attempts, cost_usd_micros FROM usage_records"
            " WHERE user_id = ANY(%s) AND started_at > now() - interval '1 minute'",
            [[PER_MINUTE_USER, MONTHLY_USER, BLOCKED_USER]],
        ).fetchall()
    by_user = {row[0]: row[1:] for row in rows}
    assert by_user[PER_MINUTE_USER] == ("rejected", "RESOURCE_EXHAUSTED", 0, 0)
    assert by_user[MONTHLY_USER] == ("rejected", "RESOURCE_EXHAUSTED", 0, 0)
    assert by_user[BLOCKED_USER] == ("rejected", "PERMISSION_DENIED", 0, 0)


async def test_the_blocking_client_exposes_the_same(limited: App) -> None:
    def run() -> tuple[tuple[Allowance, ...], ChatgateError]:
        with Client(f"127.0.0.1:{limited.port}", timeout=10) as client:
            completion = client.collect(build_request("gpt-4o-mini", "hi", user_id=ADMITTED_USER))
            with pytest.raises(ChatgateError) as caught:
                client.collect(build_request("gpt-4o-mini", "hi", user_id=PER_MINUTE_USER))
            return completion.allowances, caught.value

    # In a thread: the server shares this test's event loop.
    allowances, error = await asyncio.to_thread(run)
    assert allowances == EXPECTED_ALLOWANCES
    assert error.retry_delay == 12.0 and len(error.quota_violations) == 2 and error.waiting_helps


# --- the documented handling ------------------------------------------------------


def documented_example(relative: str) -> str:
    """The limit-handling example (the ```python block defining collect_within_limits)."""
    text = (REPO_ROOT / relative).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    (example,) = [b for b in blocks if "async def collect_within_limits(" in b]
    return str(example)


async def test_the_documented_example_waits_when_it_helps_and_gives_up_when_not(
    client: AsyncClient,
) -> None:
    example = documented_example("docs/CALLING.md")
    assert documented_example("clients/python/README.md") == example
    namespace: dict[str, Any] = {}
    exec(compile(example, "docs/CALLING.md", "exec"), namespace)  # our own docs, run as written
    collect_within_limits, over_limit = namespace["collect_within_limits"], namespace["OverLimit"]

    admitted = await collect_within_limits(client, build_request("gpt-4o-mini", "hi", user_id=ADMITTED_USER))
    assert admitted.allowances == EXPECTED_ALLOWANCES
    # Refused once with RetryInfo 0.2 s: it waits, and the same request — under the same
    # request_id, which the refusal did not use up — goes through.
    once = build_request("gpt-4o-mini", "hi", user_id=ONCE_USER, request_id=f"once-{uuid.uuid4().hex}")
    waited = await collect_within_limits(client, once)
    assert waited.finished and waited.request_id == once.request_id
    # RetryInfo 12 s is more than it may wait; a spent month has none; a block is no limit.
    over_per_minute = r"TOKENS_PER_MINUTE_EXCEEDED for user:scripted/limits-per-minute, tenant:scripted"
    with pytest.raises(over_limit, match=over_per_minute):
        await collect_within_limits(
            client, build_request("gpt-4o-mini", "hi", user_id=PER_MINUTE_USER), max_wait_s=5
        )
    with pytest.raises(over_limit, match="SPEND_PER_MONTH_EXCEEDED for tenant:scripted"):
        await collect_within_limits(client, build_request("gpt-4o-mini", "hi", user_id=MONTHLY_USER))
    with pytest.raises(ChatgateError, match="BLOCKED"):
        await collect_within_limits(client, build_request("gpt-4o-mini", "hi", user_id=BLOCKED_USER))


# --- grpcurl: what a caller without our clients sees --------------------------------


async def grpcurl(app: App, user_id: str) -> tuple[int, str, str]:
    grpcurl_bin = Path(sys.executable).parent / "grpcurl"
    body = json.dumps(
        {"model": "gpt-4o-mini", "user_id": user_id, "messages": [{"role": "ROLE_USER", "text": "hi"}]}
    )
    proc = await asyncio.create_subprocess_exec(
        str(grpcurl_bin),
        "-plaintext",
        "-max-time",
        "20",
        "-d",
        body,
        f"127.0.0.1:{app.port}",
        "chatgate.v1.ChatService/Complete",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode or 0, out.decode(), err.decode()


def first_json(text: str) -> Any:
    obj, _ = json.JSONDecoder().raw_decode(text.strip())
    return obj


async def test_grpcurl_shows_the_allowances_and_the_refusal_details(limited: App) -> None:
    code, out, err = await grpcurl(limited, ADMITTED_USER)
    assert code == 0, err
    allowances = first_json(out)["started"]["allowances"]
    assert allowances[0] == {
        "subject": "tenant:scripted",
        "kind": "LIMIT_KIND_TOKENS_PER_MINUTE",
        "limit": "30000",  # int64 is a JSON string
        "remaining": "29400",
        "resets_at": "2030-01-01T00:00:30.250Z",
    }
    assert "resets_at" not in allowances[3]  # concurrent streams never reset

    code, out, err = await grpcurl(limited, PER_MINUTE_USER)
    assert code != 0 and out.strip() == ""
    assert "Code: ResourceExhausted" in err, err
    # grpcurl prints each detail as "  N)\t<JSON>" under "Details:".
    info, retry, quota = (json.loads(line.split("\t", 1)[1]) for line in err.splitlines() if ")\t{" in line)
    assert info["reason"] == "TOKENS_PER_MINUTE_EXCEEDED" and info["domain"] == "chatgate"
    assert retry == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retry_delay": "12s"}
    assert quota["violations"] == [
        {"subject": f"user:scripted/{PER_MINUTE_USER}", "description": "tokens_per_minute 10000 reached"},
        {"subject": "tenant:scripted", "description": "tokens_per_minute 30000 reached"},
    ]
