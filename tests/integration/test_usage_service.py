"""UsageService over gRPC on real rows: groupings and filters sum to the rows, pages are stable,
and a caller sees only its own tenant."""

from __future__ import annotations

import base64
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, time, timedelta
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import timestamp_pb2
from grpc_status import rpc_status
from psycopg_pool import AsyncConnectionPool

from chatgate.v1 import usage_pb2 as pb
from chatgate.v1 import usage_pb2_grpc
from chatgate_server.app import App
from chatgate_server.domain import ANONYMOUS_CALLER, Outcome, TokenUsage, UsageRecord
from chatgate_server.usage.pricing import cost_of
from chatgate_server.usage.reports import Dimension, PageToken, UsageQuery
from chatgate_server.usage.store import UsageStore
from tests.integration.conftest import AppFactory

TENANT = ANONYMOUS_CALLER.tenant  # what an unauthenticated caller is scoped to
BASE = datetime.combine(datetime.now(UTC).date() - timedelta(days=6), time(), tzinfo=UTC)
MODELS = ("gpt-4o", "gpt-4o-mini", "no-such-model")
Key = tuple[str, ...]


def ts(t: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def make_records(users: list[str], tenant: str, n: int, seed: int) -> list[UsageRecord]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        model = rng.choice(MODELS)
        usage = TokenUsage(
            input_tokens=(i := rng.randint(0, 5000)),
            cached_input_tokens=rng.randint(0, i),
            output_tokens=(o := rng.randint(0, 900)),
            reasoning_tokens=rng.randint(0, o),
        )
        tags = rng.choice([{}, {"feature": "alpha"}, {"feature": "beta", "team": "x"}])
        tier = rng.choice([None, "default", "flex", "priority"])
        fallback = rng.choice([None, None, "gpt-4o-mini"])
        records.append(
            UsageRecord(
                request_id=f"us-{uuid.uuid4().hex}",
                tenant=tenant,
                caller_service="svc",
                user_id=rng.choice(users),
                requested_model=model,
                resolved_model=None,
                upstream_response_id=None,
                usage=usage,
                cost=cost_of(model, usage),
                outcome=Outcome.COMPLETED,
                grpc_status="OK",
                finish_reason="stop",
                attempts=1,
                time_to_first_token_ms=None,
                duration_ms=1.0,
                started_at=BASE
                + timedelta(minutes=rng.randint(0, 5 * 24 * 60 - 1), seconds=rng.randint(0, 59)),
                tags=tags,
                service_tier=tier,
                fallback_model=fallback,
            )
        )
    return records


def totals(records: Iterable[UsageRecord]) -> tuple[int, ...]:
    t = [0] * 8
    for r in records:
        u = r.usage
        for i, v in enumerate(
            (1, u.input_tokens, u.output_tokens, u.cached_input_tokens, u.reasoning_tokens, u.total_tokens)
        ):
            t[i] += v
        if r.cost.usd_micros is None:
            t[7] += 1
        else:
            t[6] += r.cost.usd_micros
    return tuple(t)


def got_totals(t: pb.UsageTotals) -> tuple[int, ...]:
    return (
        t.requests,
        t.input_tokens,
        t.output_tokens,
        t.cached_input_tokens,
        t.reasoning_tokens,
        t.total_tokens,
        t.cost_usd_micros,
        t.unpriced_requests,
    )


def expected_groups(
    records: Iterable[UsageRecord], key: Callable[[UsageRecord], Key]
) -> dict[Key, tuple[int, ...]]:
    by: dict[Key, list[UsageRecord]] = defaultdict(list)
    for r in records:
        by[key(r)].append(r)
    return {k: totals(v) for k, v in sorted(by.items())}


Dims = list[pb.UsageDimension.ValueType]
FIELDS: dict[Any, str] = {
    pb.USAGE_DIMENSION_TENANT: "tenant",
    pb.USAGE_DIMENSION_USER: "user_id",
    pb.USAGE_DIMENSION_MODEL: "model",
    pb.USAGE_DIMENSION_DAY: "day",
    pb.USAGE_DIMENSION_TAG: "tag_value",
    pb.USAGE_DIMENSION_SERVICE_TIER: "service_tier",
    pb.USAGE_DIMENSION_FALLBACK: "fallback_model",
}


def got_groups(groups: Iterable[pb.UsageGroup], dims: Dims) -> dict[Key, tuple[int, ...]]:
    return {tuple(getattr(g, FIELDS[d]) for d in dims): got_totals(g.totals) for g in groups}


@pytest.fixture(scope="module")
def all_users() -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"svc-user-{tag}-{c}" for c in "abcde"]


@pytest.fixture(scope="module")
def users(all_users: list[str]) -> list[str]:
    """The users with rows; the first and last of all_users get rows mid-pagination only."""
    return all_users[1:4]


@pytest.fixture(scope="module")
async def data(migrated_database_url: str, users: list[str]) -> AsyncIterator[list[UsageRecord]]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        migrated_database_url, min_size=1, max_size=2, open=False
    )
    await pool.open(wait=True)
    try:
        store = UsageStore(pool)
        mine = make_records(users, TENANT, 400, seed=1)
        # The same users under another tenant: a caller of "default" must never see these.
        theirs = make_records(users, f"other-{uuid.uuid4().hex[:6]}", 100, seed=2)
        await store.insert(mine)
        await store.insert(theirs)
        yield mine
    finally:
        await pool.close()


@pytest.fixture
async def usage(app: App) -> AsyncIterator[usage_pb2_grpc.UsageServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield usage_pb2_grpc.UsageServiceStub(channel)


async def get_all(
    stub: usage_pb2_grpc.UsageServiceAsyncStub, req: pb.GetUsageRequest
) -> tuple[list[pb.GetUsageResponse], list[pb.UsageGroup]]:
    pages: list[pb.GetUsageResponse] = []
    token = req.page_token
    while True:
        page_req = pb.GetUsageRequest()
        page_req.CopyFrom(req)
        page_req.page_token = token
        page = await stub.GetUsage(page_req, timeout=30)
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages, [g for p in pages for g in p.groups]


# Whole days in the middle (read from the roll-up) and partial days at both ends (rows).
START = BASE + timedelta(hours=10, minutes=17)
END = BASE + timedelta(days=4, hours=15, minutes=3)


def in_window(records: list[UsageRecord]) -> list[UsageRecord]:
    return [r for r in records if START <= r.started_at < END]


@pytest.mark.parametrize(
    ("dims", "key"),
    [
        ([pb.USAGE_DIMENSION_USER], lambda r: (r.user_id,)),
        ([pb.USAGE_DIMENSION_DAY], lambda r: (r.started_at.date().isoformat(),)),
        (
            [pb.USAGE_DIMENSION_USER, pb.USAGE_DIMENSION_DAY, pb.USAGE_DIMENSION_MODEL],
            lambda r: (r.user_id, r.started_at.date().isoformat(), r.requested_model),
        ),
        ([pb.USAGE_DIMENSION_MODEL, pb.USAGE_DIMENSION_TENANT], lambda r: (r.requested_model, r.tenant)),
        ([pb.USAGE_DIMENSION_TAG, pb.USAGE_DIMENSION_USER], lambda r: (r.tags.get("feature", ""), r.user_id)),
        # Kept on the rows only: the whole days in the window are read from the rows too.
        (
            [pb.USAGE_DIMENSION_SERVICE_TIER, pb.USAGE_DIMENSION_USER],
            lambda r: (r.service_tier or "", r.user_id),
        ),
        ([pb.USAGE_DIMENSION_FALLBACK], lambda r: (r.fallback_model or "",)),
    ],
)
async def test_groupings_sum_to_the_rows(
    usage: usage_pb2_grpc.UsageServiceAsyncStub,
    data: list[UsageRecord],
    users: list[str],
    dims: Dims,
    key: Callable[[UsageRecord], Key],
) -> None:
    req = pb.GetUsageRequest(
        start_time=ts(START),
        end_time=ts(END),
        group_by=dims,
        tag_key="feature" if pb.USAGE_DIMENSION_TAG in dims else "",
        user_ids=users,
        page_size=1000,
    )
    reply = await usage.GetUsage(req, timeout=30)
    want = in_window(data)
    assert got_totals(reply.totals) == totals(want)
    assert got_groups(reply.groups, dims) == expected_groups(want, key)
    assert list(got_groups(reply.groups, dims)) == sorted(got_groups(reply.groups, dims))  # key order
    assert reply.start_time.ToDatetime(tzinfo=UTC) == START
    assert reply.end_time.ToDatetime(tzinfo=UTC) == END


async def test_filters_narrow_the_rows(
    usage: usage_pb2_grpc.UsageServiceAsyncStub, data: list[UsageRecord], users: list[str]
) -> None:
    req = pb.GetUsageRequest(
        start_time=ts(START),
        end_time=ts(END),
        group_by=[pb.USAGE_DIMENSION_USER],
        user_ids=users[:2],
        models=["gpt-4o", "no-such-model"],
        tags={"feature": "beta"},
    )
    reply = await usage.GetUsage(req, timeout=30)
    want = [
        r
        for r in in_window(data)
        if r.user_id in users[:2]
        and r.requested_model in ("gpt-4o", "no-such-model")
        and r.tags.get("feature") == "beta"
    ]
    assert want, "the filter should match something"
    assert got_totals(reply.totals) == totals(want)
    assert got_groups(reply.groups, [pb.USAGE_DIMENSION_USER]) == expected_groups(
        want, lambda r: (r.user_id,)
    )
    assert reply.totals.unpriced_requests == sum(1 for r in want if r.requested_model == "no-such-model")


async def test_a_caller_sees_only_its_own_tenant(
    usage: usage_pb2_grpc.UsageServiceAsyncStub, data: list[UsageRecord], users: list[str]
) -> None:
    reply = await usage.GetUsage(
        pb.GetUsageRequest(
            start_time=ts(BASE),
            end_time=ts(BASE + timedelta(days=6)),
            group_by=[pb.USAGE_DIMENSION_TENANT],
            user_ids=users,
        ),
        timeout=30,
    )
    assert [g.tenant for g in reply.groups] == [TENANT]
    assert got_totals(reply.totals) == totals(data)  # the other tenant's rows are not counted


async def test_pages_cover_every_group_once_in_order_and_stay_stable_as_rows_arrive(
    usage: usage_pb2_grpc.UsageServiceAsyncStub,
    data: list[UsageRecord],
    all_users: list[str],
    migrated_database_url: str,
) -> None:
    users = all_users
    dims = [pb.USAGE_DIMENSION_USER, pb.USAGE_DIMENSION_DAY, pb.USAGE_DIMENSION_MODEL]
    req = pb.GetUsageRequest(
        start_time=ts(START), end_time=ts(END), group_by=dims, user_ids=users, page_size=7
    )
    whole = await usage.GetUsage(
        pb.GetUsageRequest(
            start_time=ts(START), end_time=ts(END), group_by=dims, user_ids=users, page_size=1000
        ),
        timeout=30,
    )
    pages, groups = await get_all(usage, req)
    assert len(pages) == -(-len(whole.groups) // 7)
    assert all(len(p.groups) == 7 for p in pages[:-1])
    assert [got_groups([g], dims) for g in groups] == [got_groups([g], dims) for g in whole.groups]
    assert all(got_totals(p.totals) == got_totals(whole.totals) for p in pages)

    # Rows arrive between pages, for groups before and after the cursor: the pages
    # already read are not repeated and the ones still to come are not skipped.
    first = await usage.GetUsage(req, timeout=30)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        migrated_database_url, min_size=1, max_size=1, open=False
    )
    await pool.open(wait=True)
    try:
        # Users sorting before and after those with rows so far.
        late = make_records([users[0], users[-1]], TENANT, 20, seed=3)
        late = [r for r in late if START <= r.started_at < END]
        await UsageStore(pool).insert(late)
    finally:
        await pool.close()
    rest_req = pb.GetUsageRequest()
    rest_req.CopyFrom(req)
    rest_req.page_token = first.next_page_token
    _, rest = await get_all(usage, rest_req)
    seen = [tuple(getattr(g, FIELDS[d]) for d in dims) for g in [*first.groups, *rest]]
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen)
    original = [tuple(getattr(g, FIELDS[d]) for d in dims) for g in whole.groups]
    assert set(original) <= set(seen)


async def test_an_open_window_is_fixed_by_the_first_page(
    usage: usage_pb2_grpc.UsageServiceAsyncStub, data: list[UsageRecord], users: list[str]
) -> None:
    req = pb.GetUsageRequest(
        start_time=ts(BASE), group_by=[pb.USAGE_DIMENSION_DAY], user_ids=users, page_size=2
    )
    first = await usage.GetUsage(req, timeout=30)
    assert first.next_page_token
    req.page_token = first.next_page_token
    second = await usage.GetUsage(req, timeout=30)
    assert second.end_time == first.end_time
    assert got_totals(second.totals) == got_totals(first.totals) == totals(data)


async def invalid(stub: usage_pb2_grpc.UsageServiceAsyncStub, req: pb.GetUsageRequest) -> list[str]:
    """The field violations of an INVALID_ARGUMENT answer."""
    from google.rpc import error_details_pb2

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetUsage(req, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_bad_requests_name_their_fields(usage: usage_pb2_grpc.UsageServiceAsyncStub) -> None:
    assert "start_time" in await invalid(usage, pb.GetUsageRequest())
    assert "tag_key" in await invalid(
        usage, pb.GetUsageRequest(start_time=ts(BASE), group_by=[pb.USAGE_DIMENSION_TAG])
    )
    assert "end_time" in await invalid(
        usage, pb.GetUsageRequest(start_time=ts(BASE), end_time=ts(BASE - timedelta(hours=1)))
    )
    assert "page_size" in await invalid(usage, pb.GetUsageRequest(start_time=ts(BASE), page_size=5000))
    assert "page_token" in await invalid(
        usage, pb.GetUsageRequest(start_time=ts(BASE), page_token="garbage!")
    )


async def test_a_page_token_only_works_for_its_own_query(
    usage: usage_pb2_grpc.UsageServiceAsyncStub, data: list[UsageRecord], users: list[str]
) -> None:
    req = pb.GetUsageRequest(
        start_time=ts(BASE), group_by=[pb.USAGE_DIMENSION_DAY], user_ids=users, page_size=1
    )
    token = (await usage.GetUsage(req, timeout=30)).next_page_token
    other = pb.GetUsageRequest(
        start_time=ts(BASE),
        group_by=[pb.USAGE_DIMENSION_DAY],
        user_ids=users[:1],
        page_size=1,
        page_token=token,
    )
    assert await invalid(usage, other) == ["page_token"]


def at(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


LAST_DAY = int(datetime(9999, 12, 31, 12, tzinfo=UTC).timestamp())


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"start_time": at(2**62)}, "start_time"),  # past Timestamp's range
        ({"start_time": at(-(2**62))}, "start_time"),
        ({"start_time": ts(BASE), "end_time": at(0, nanos=-1)}, "end_time"),
        # Valid Timestamps at the end of the calendar: day arithmetic overflowed.
        ({"start_time": at(LAST_DAY), "end_time": at(LAST_DAY + 3600)}, "start_time"),
        ({"start_time": ts(BASE), "user_ids": ["svc\x00user"]}, "user_ids[0]"),
        ({"start_time": ts(BASE), "models": ["ok", "gpt\x00"]}, "models[1]"),
        ({"start_time": ts(BASE), "models": ["m" * 300]}, "models[0]"),
        ({"start_time": ts(BASE), "tags": {"feature": "a\x00"}}, "tags[feature]"),
        ({"start_time": ts(BASE), "tags": {"k\x00": "v"}}, "tags[k\x00]"),
        (
            {"start_time": ts(BASE), "group_by": [pb.USAGE_DIMENSION_TAG], "tag_key": "f\x00"},
            "tag_key",
        ),
    ],
)
async def test_out_of_range_times_and_nul_filters_name_their_fields(
    usage: usage_pb2_grpc.UsageServiceAsyncStub, fields: dict[str, Any], field: str
) -> None:
    # Each of these was INTERNAL (a ValueError, an OverflowError or Postgres refusing NUL).
    assert field in await invalid(usage, pb.GetUsageRequest(**fields))


def query_of(req: pb.GetUsageRequest) -> UsageQuery:
    """The query the service builds for ``req``: its fingerprint is public knowledge."""
    return UsageQuery(
        start=req.start_time.ToDatetime(tzinfo=UTC),
        end=datetime.now(UTC),
        group_by=(Dimension.DAY,),
        tenant=TENANT,
        user_ids=tuple(req.user_ids),
    )


async def test_a_forged_or_changed_page_token_is_refused(
    usage: usage_pb2_grpc.UsageServiceAsyncStub, data: list[UsageRecord], users: list[str]
) -> None:
    req = pb.GetUsageRequest(
        start_time=ts(BASE), group_by=[pb.USAGE_DIMENSION_DAY], user_ids=users, page_size=1
    )
    token = (await usage.GetUsage(req, timeout=30)).next_page_token
    assert token
    query = query_of(req)
    end = datetime.now(UTC).isoformat()
    payload = {"q": query.fingerprint(), "e": end, "a": ["not-a-day"]}
    forged = [
        # The old unsigned form, with the right fingerprint: a bad day reached Postgres.
        base64.urlsafe_b64encode(orjson.dumps(payload)).decode().rstrip("="),
        # Well formed and signed, but not with this deployment's key.
        PageToken(query.fingerprint(), datetime.now(UTC), ("2026-01-01",)).encode(b"k" * 32),
        # A real token with one character of its payload changed.
        ("B" if token[5] != "B" else "C").join((token[:5], token[6:])),
        token + "A",
        token.replace(".", ".."),
    ]
    for bad in forged:
        req.page_token = bad
        assert await invalid(usage, req) == ["page_token"], bad


async def test_a_page_token_works_on_every_replica_with_the_same_key(
    app: App, start_app: AppFactory, data: list[UsageRecord], users: list[str]
) -> None:
    req = pb.GetUsageRequest(
        start_time=ts(BASE), group_by=[pb.USAGE_DIMENSION_DAY], user_ids=users, page_size=1
    )
    other = await start_app()  # another process of the deployment: same OpenAI key
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as one,
        grpc.aio.insecure_channel(f"127.0.0.1:{other.port}") as two,
    ):
        first = await usage_pb2_grpc.UsageServiceStub(one).GetUsage(req, timeout=30)
        req.page_token = first.next_page_token
        second = await usage_pb2_grpc.UsageServiceStub(two).GetUsage(req, timeout=30)
    assert second.groups and second.groups[0].day > first.groups[0].day
