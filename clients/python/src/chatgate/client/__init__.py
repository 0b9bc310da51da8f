"""A small, typed client for chatgate, over the generated ``chatgate.v1`` stubs.

::

    from chatgate.client import AsyncClient, build_request, system, user

    async with AsyncClient("chatgate:50051", token=TOKEN, timeout=30) as client:
        request = build_request(
            "gpt-4o-mini", [system("Be brief."), user("Hello!")],
            user_id="user-42", tags={"feature": "greeting"},
        )
        async for event in client.complete(request):      # typed events, as they arrive
            ...
        completion = await client.collect(request)       # or the whole thing at once

:class:`Client` is the same API, blocking. Every failure is a :class:`ChatgateError`
carrying the status code, the reason, and RetryInfo / QuotaFailure / BadRequest
details. See docs/CALLING.md for deadlines, status codes and when to retry.
"""

from chatgate.client.aio import AsyncClient, AsyncCompletionStream
from chatgate.client.channel import DEFAULT_OPTIONS, SERVICE_CONFIG, channel_options, tls_credentials
from chatgate.client.errors import (
    KNOWN_REASONS,
    LIMIT_REASONS,
    ChatgateError,
    ErrorReason,
    FieldViolation,
    LimitReason,
    QuotaViolation,
)
from chatgate.client.events import (
    Allowance,
    ContentDelta,
    Cost,
    Event,
    Finished,
    FinishReason,
    LimitKind,
    Outcome,
    RefusalDelta,
    Started,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
    UsageSource,
)
from chatgate.client.request import (
    assistant,
    build_request,
    developer,
    force_tool,
    function_tool,
    json_object_format,
    json_schema_format,
    system,
    tool_result,
    user,
)
from chatgate.client.result import Completion, ToolCall
from chatgate.client.sync import Client, CompletionStream
from chatgate.client.timeouts import DEFAULT_TIMEOUT

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_TIMEOUT",
    "KNOWN_REASONS",
    "LIMIT_REASONS",
    "SERVICE_CONFIG",
    "Allowance",
    "AsyncClient",
    "AsyncCompletionStream",
    "ChatgateError",
    "Client",
    "Completion",
    "CompletionStream",
    "ContentDelta",
    "Cost",
    "ErrorReason",
    "Event",
    "FieldViolation",
    "FinishReason",
    "Finished",
    "LimitKind",
    "LimitReason",
    "Outcome",
    "QuotaViolation",
    "RefusalDelta",
    "Started",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "TopLogprob",
    "Usage",
    "UsageSource",
    "assistant",
    "build_request",
    "channel_options",
    "developer",
    "force_tool",
    "function_tool",
    "json_object_format",
    "json_schema_format",
    "system",
    "tls_credentials",
    "tool_result",
    "user",
]
