"""GenAI client spans and metrics for upstream attempts (semantic conventions v1.41).

One CLIENT span per attempt, named ``chat {model}``: request attributes are computed
once per request and reused by every attempt; response attributes (id, model, finish
reasons, token counts, time to first chunk) go on the attempt that streamed. Nothing
here runs per chunk.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.util.types import AttributeValue

from chatgate_server.domain import CompletionRequest, FinishReason, JsonSchemaFormat, TokenUsage
from chatgate_server.errors import UpstreamError
from chatgate_server.telemetry import Telemetry
from chatgate_server.upstream.deployment import Deployment


def error_type(error: BaseException) -> str:
    """A low-cardinality ``error.type``: the HTTP status when there was one, else the class."""
    status = getattr(error, "http_status", None)
    if isinstance(error, UpstreamError) and status is not None:
        return str(status)
    if isinstance(error, TimeoutError):
        return "timeout"
    return type(error).__name__


def deployment_attributes(deployment: Deployment) -> dict[str, AttributeValue]:
    """Where an attempt went: the provider, its address and the deployment's name."""
    upstream = deployment.upstream
    attrs: dict[str, AttributeValue] = {
        "gen_ai.provider.name": upstream.name,
        "chatgate.deployment": deployment.name,
    }
    address = getattr(upstream, "server_address", None)
    port = getattr(upstream, "server_port", None)
    if address:
        attrs["server.address"] = address
    if port:
        attrs["server.port"] = port
    return attrs


def request_attributes(request: CompletionRequest) -> dict[str, AttributeValue]:
    s = request.sampling
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": request.model,
        "gen_ai.request.stream": True,
        "openai.api.type": "chat_completions",
        "gen_ai.output.type": "json" if request.response_format not in (None, "text") else "text",
    }
    optional: dict[str, Any] = {
        "gen_ai.request.max_tokens": s.max_completion_tokens,
        "gen_ai.request.temperature": s.temperature,
        "gen_ai.request.top_p": s.top_p,
        "gen_ai.request.frequency_penalty": s.frequency_penalty,
        "gen_ai.request.presence_penalty": s.presence_penalty,
        "gen_ai.request.seed": s.seed,
        "openai.request.service_tier": request.service_tier,
        # No semantic convention names these yet.
        "chatgate.request.reasoning_effort": s.reasoning_effort,
        "chatgate.request.verbosity": s.verbosity,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    if s.stop:
        attrs["gen_ai.request.stop_sequences"] = list(s.stop)
    if isinstance(request.response_format, JsonSchemaFormat):
        attrs["gen_ai.output.type"] = "json"
    return attrs


class AttemptTelemetry:
    """Spans and metrics for one request's upstream attempts."""

    __slots__ = ("_attrs", "_metric_attrs", "_request_metric_attrs", "_telemetry")

    def __init__(self, telemetry: Telemetry, request: CompletionRequest) -> None:
        self._telemetry = telemetry
        self._attrs = request_attributes(request) if telemetry.tracing else {}
        self._request_metric_attrs: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": request.model,
        }
        self._metric_attrs = self._request_metric_attrs

    def start(self, model: str, deployment: Deployment) -> tuple[Span, float]:
        """An attempt's span; the metrics that follow carry its deployment."""
        where = deployment_attributes(deployment)
        self._metric_attrs = {
            **self._request_metric_attrs,
            "gen_ai.provider.name": where["gen_ai.provider.name"],
            "chatgate.deployment": deployment.name,
        }
        span = self._telemetry.tracer.start_span(
            f"chat {model}",
            kind=SpanKind.CLIENT,
            attributes={**self._attrs, **where} if self._attrs else where,
        )
        return span, time.monotonic()

    def failed(self, span: Span, started: float, error: BaseException) -> None:
        kind = error_type(error)
        span.set_attribute("error.type", kind)
        span.set_status(StatusCode.ERROR, kind)
        span.end()
        self._telemetry.operation_duration.record(
            time.monotonic() - started, {**self._metric_attrs, "error.type": kind}
        )

    def streamed(
        self,
        span: Span,
        started: float,
        *,
        first_chunk_at: float | None,
        response_id: str | None,
        response_model: str | None,
        finish_reason: FinishReason | None,
        usage: TokenUsage,
        error: BaseException | None,
    ) -> None:
        """The attempt that reached its first chunk ended (completed, cut or failed)."""
        t = self._telemetry
        attrs = dict(self._metric_attrs)
        if response_model:
            attrs["gen_ai.response.model"] = response_model
        if span.is_recording():
            if response_id:
                span.set_attribute("gen_ai.response.id", response_id)
            if response_model:
                span.set_attribute("gen_ai.response.model", response_model)
            if finish_reason:
                span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
            span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
            span.set_attribute("gen_ai.usage.cache_read.input_tokens", usage.cached_input_tokens)
            span.set_attribute("gen_ai.usage.reasoning.output_tokens", usage.reasoning_tokens)
            span.set_attribute("chatgate.usage.source", usage.source)
            if first_chunk_at is not None:
                span.set_attribute("gen_ai.response.time_to_first_chunk", first_chunk_at - started)
        if error is not None:
            kind = error_type(error)
            attrs["error.type"] = kind
            span.set_attribute("error.type", kind)
            span.set_status(StatusCode.ERROR, kind)
        span.end()
        t.operation_duration.record(time.monotonic() - started, attrs)
        if first_chunk_at is not None:
            t.time_to_first_chunk.record(first_chunk_at - started, attrs)
        t.token_usage.record(usage.input_tokens, {**attrs, "gen_ai.token.type": "input"})
        t.token_usage.record(usage.output_tokens, {**attrs, "gen_ai.token.type": "output"})
