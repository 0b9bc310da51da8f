"""UsageService: a report request in, the caller's tenant's usage out.

Only proto ⇄ domain here; the queries are ``usage/reports.py``. The tenant is the one of
the caller the edge resolved, so a caller cannot read another tenant's usage; only a
caller holding the operator role may name another tenant in the request.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2

from chatgate.v1 import usage_pb2 as pb
from chatgate.v1 import usage_pb2_grpc
from chatgate_server.auth.records import OPERATOR_ROLE
from chatgate_server.domain import Caller
from chatgate_server.errors import FieldViolation, InvalidRequest, PermissionDenied
from chatgate_server.rpc.convert import (
    MAX_MODEL_CHARS,
    MAX_TAG_KEY_CHARS,
    MAX_TAG_VALUE_CHARS,
    MAX_USER_ID_CHARS,
)
from chatgate_server.rpc.edge import current_caller
from chatgate_server.usage.reports import (
    DEFAULT_PAGE_SIZE,
    EARLIEST,
    LATEST,
    MAX_PAGE_SIZE,
    Dimension,
    PageToken,
    Totals,
    UsagePage,
    UsageQuery,
    UsageReports,
)

_DIMENSIONS = {
    pb.USAGE_DIMENSION_TENANT: Dimension.TENANT,
    pb.USAGE_DIMENSION_USER: Dimension.USER,
    pb.USAGE_DIMENSION_MODEL: Dimension.MODEL,
    pb.USAGE_DIMENSION_DAY: Dimension.DAY,
    pb.USAGE_DIMENSION_TAG: Dimension.TAG,
    pb.USAGE_DIMENSION_DEPLOYMENT: Dimension.DEPLOYMENT,
    pb.USAGE_DIMENSION_FALLBACK: Dimension.FALLBACK,
    pb.USAGE_DIMENSION_SERVICE_TIER: Dimension.SERVICE_TIER,
}
_GROUP_FIELDS = {
    Dimension.TENANT: "tenant",
    Dimension.USER: "user_id",
    Dimension.MODEL: "model",
    Dimension.DAY: "day",
    Dimension.TAG: "tag_value",
    Dimension.DEPLOYMENT: "deployment",
    Dimension.FALLBACK: "fallback_model",
    Dimension.SERVICE_TIER: "service_tier",
}
MAX_FILTER_VALUES = 100
MAX_TAG_FILTERS = 16


def to_query(
    msg: pb.GetUsageRequest, caller: Caller, now: datetime, page_token_key: bytes
) -> tuple[UsageQuery, int, PageToken | None]:
    """Validate ``msg``; return the query (scoped to ``caller``'s tenant), the page size and
    the parsed page token. Raises InvalidRequest with every violation."""
    v: list[FieldViolation] = []
    start = _time(msg.start_time, "start_time", v) if msg.HasField("start_time") else None
    if not msg.HasField("start_time"):
        v.append(FieldViolation("start_time", "required"))
    end = _time(msg.end_time, "end_time", v) if msg.HasField("end_time") else now
    if not 0 <= msg.page_size <= MAX_PAGE_SIZE:
        v.append(FieldViolation("page_size", f"between 1 and {MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE})"))
    group_by = []
    for i, d in enumerate(msg.group_by):
        dimension = _DIMENSIONS.get(d)
        if dimension is None:
            v.append(FieldViolation(f"group_by[{i}]", "not a known dimension"))
        else:
            group_by.append(dimension)
    if len(msg.user_ids) > MAX_FILTER_VALUES or len(msg.models) > MAX_FILTER_VALUES:
        v.append(
            FieldViolation("user_ids", f"at most {MAX_FILTER_VALUES} users and {MAX_FILTER_VALUES} models")
        )
    else:
        _texts(v, ((f"user_ids[{i}]", u) for i, u in enumerate(msg.user_ids)), MAX_USER_ID_CHARS)
        _texts(v, ((f"models[{i}]", m) for i, m in enumerate(msg.models)), MAX_MODEL_CHARS)
    _texts(v, [("tag_key", msg.tag_key)], MAX_TAG_KEY_CHARS)
    if len(msg.tags) > MAX_TAG_FILTERS:
        v.append(FieldViolation("tags", f"at most {MAX_TAG_FILTERS} tags"))
    else:
        for key, value in msg.tags.items():
            path = f"tags[{key[:MAX_TAG_KEY_CHARS]}]"
            _texts(v, [(path, key)], MAX_TAG_KEY_CHARS)
            _texts(v, [(path, value)], MAX_TAG_VALUE_CHARS)
    if v or start is None or end is None:
        raise InvalidRequest(v)
    query = UsageQuery(
        start=start,
        end=end,
        group_by=tuple(group_by),
        tag_key=msg.tag_key or None,
        tenant=_tenant(msg, caller),
        user_ids=tuple(msg.user_ids),
        models=tuple(msg.models),
        tags=dict(msg.tags),
    )
    token = PageToken.decode(msg.page_token, query, page_token_key) if msg.page_token else None
    if token is not None:
        # The window an open-ended report was first computed for, on every page.
        query = replace(query, end=token.end)
    query.validate()
    return query, msg.page_size or DEFAULT_PAGE_SIZE, token


def _tenant(msg: pb.GetUsageRequest, caller: Caller) -> str:
    """The tenant reported on: the caller's own, or the one named by an operator."""
    if not msg.tenant or msg.tenant == caller.tenant:
        return caller.tenant
    if OPERATOR_ROLE not in caller.roles:
        raise PermissionDenied(
            f"caller {caller.tenant}/{caller.service} may read only its own tenant's usage"
            f" (another tenant needs the {OPERATOR_ROLE} role)"
        )
    return msg.tenant


def _time(value: timestamp_pb2.Timestamp, field: str, v: list[FieldViolation]) -> datetime | None:
    try:
        t = value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):  # seconds or nanos outside Timestamp's range
        t = None
    if t is None or not EARLIEST <= t <= LATEST:
        v.append(FieldViolation(field, f"a time from {EARLIEST:%Y-%m-%d} to {LATEST:%Y-%m-%d} UTC"))
        return None
    return t


def _texts(v: list[FieldViolation], items: Iterable[tuple[str, str]], limit: int) -> None:
    """Filter values (field path, text): bounded like the columns they match, and
    without NUL (which Postgres text cannot hold, so it could never match)."""
    for path, text in items:
        if len(text) > limit or "\x00" in text:
            v.append(FieldViolation(path, f"at most {limit} characters, without NUL"))


def _totals(t: Totals) -> pb.UsageTotals:
    return pb.UsageTotals(
        requests=t.requests,
        input_tokens=t.input_tokens,
        output_tokens=t.output_tokens,
        cached_input_tokens=t.cached_input_tokens,
        reasoning_tokens=t.reasoning_tokens,
        total_tokens=t.total_tokens,
        cost_usd_micros=t.cost_usd_micros,
        unpriced_requests=t.unpriced_requests,
    )


def _timestamp(t: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t)
    return ts


def to_response(query: UsageQuery, page: UsagePage, page_token_key: bytes) -> pb.GetUsageResponse:
    groups = []
    for g in page.groups:
        fields = {_GROUP_FIELDS[d]: value for d, value in g.key.items()}
        groups.append(pb.UsageGroup(totals=_totals(g.totals), **fields))
    token = ""
    if page.next_after is not None:
        token = PageToken(query.fingerprint(), query.end, page.next_after).encode(page_token_key)
    return pb.GetUsageResponse(
        totals=_totals(page.totals),
        groups=groups,
        next_page_token=token,
        start_time=_timestamp(query.start),
        end_time=_timestamp(query.end),
    )


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    """Serves chatgate.v1.UsageService over the usage reports."""

    def __init__(
        self,
        reports: UsageReports,
        *,
        page_token_key: bytes | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """``page_token_key`` signs page tokens (usage/reports.page_token_key); without
        one, a random key: tokens then work only on this process."""
        self._reports = reports
        self._key = page_token_key or secrets.token_bytes(32)
        self._clock = clock or (lambda: datetime.now(UTC))

    async def GetUsage(
        self,
        request: pb.GetUsageRequest,
        context: grpc.aio.ServicerContext[pb.GetUsageRequest, pb.GetUsageResponse],
    ) -> pb.GetUsageResponse:
        query, page_size, token = to_query(request, current_caller(), self._clock(), self._key)
        page = await self._reports.report(query, limit=page_size, after=token.after if token else None)
        return to_response(query, page, self._key)
