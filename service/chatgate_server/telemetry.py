"""OpenTelemetry: tracer and meter set-up from the standard variables, and chatgate's
instruments.

Tracing and metrics export by OTLP/gRPC when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the
per-signal ``…_TRACES_ENDPOINT`` / ``…_METRICS_ENDPOINT``) is set and
``OTEL_SDK_DISABLED`` is not true. Everything else — service name, resource
attributes, sampler, batch sizes, headers — is the SDK's own reading of the standard
``OTEL_*`` variables. With no endpoint, the API's no-op tracer and meter are used, so
tracing off costs nothing but a few attribute-free calls per request.

Names follow the GenAI semantic conventions (REFERENCE.md): one CLIENT span per upstream
attempt named ``chat {model}``; ``gen_ai.client.token.usage``,
``gen_ai.client.operation.duration`` and ``…time_to_first_chunk`` histograms with the
conventions' buckets. Prompts and completions are never recorded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

INSTRUMENTATION = "chatgate"

# Bucket boundaries from the GenAI semantic conventions.
TOKEN_BUCKETS = [float(4**i) for i in range(14)]  # 1, 4, 16, … 67108864
DURATION_BUCKETS = [0.01 * 2**i for i in range(14)]  # 0.01 … 81.92 s
_MAX_UNPRICED_MODELS = 100


def _enabled(env: Mapping[str, str], signal: str) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get(f"OTEL_{signal}_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))


@dataclass
class Providers:
    """The SDK providers chatgate created (None where that signal is off)."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    def shutdown(self) -> None:
        """Flush and stop exporters (at process exit, after the last span)."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def providers_from_env(env: Mapping[str, str] | None = None) -> Providers:
    """OTLP/gRPC exporters for the signals whose endpoint is configured."""
    e = os.environ if env is None else env
    result = Providers()
    resource = Resource.create()  # reads OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource.create({"service.name": "chatgate"}))
    if _enabled(e, "TRACES"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        result.tracer_provider = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
        result.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if _enabled(e, "METRICS"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers: list[MetricReader] = [PeriodicExportingMetricReader(OTLPMetricExporter())]
        result.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    return result


class Telemetry:
    """The tracer and instruments chatgate's code records into."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        tp = tracer_provider or trace.NoOpTracerProvider()
        mp = meter_provider or metrics.NoOpMeterProvider()
        self.tracer = tp.get_tracer(INSTRUMENTATION)
        self.tracing = tracer_provider is not None
        meter = mp.get_meter(INSTRUMENTATION)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Tokens used per upstream call, by gen_ai.token.type (input, output)",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Duration of upstream chat calls, first request byte to last chunk",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.time_to_first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time from the upstream request to its first chunk",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.active_streams = meter.create_up_down_counter(
            "chatgate.streams.active", unit="{stream}", description="Complete calls in progress"
        )
        # Each worker is its own process: its CPU time says how close it is to its core.
        # Under overload grpc.aio admits calls only as running ones finish, so the excess
        # waits inside gRPC, where chatgate's spans, rows and call metrics cannot see it;
        # a worker using ~1 s of CPU per second is that signal (docs/PERFORMANCE.md).
        meter.create_observable_counter(
            "process.cpu.time",
            callbacks=[_process_cpu_time],
            unit="s",
            description="CPU time this worker process has used, by cpu.mode",
        )
        # A model with no price row bills nothing until an operator adds one: this is
        # the signal to do so (the log says it once per model).
        self.unpriced_calls = meter.create_counter(
            "chatgate.usage.unpriced",
            unit="{call}",
            description="Calls recorded with cost unknown because their model has no price row, by model",
        )
        self._unpriced_models: set[str] = set()
        # A rise says someone is calling with a bad, revoked or expired credential (or a
        # client was not given its new token): the reason is one of a handful of codes.
        self.auth_failures = meter.create_counter(
            "chatgate.auth.failures",
            unit="{call}",
            description="Calls refused because their credential is missing, invalid, revoked or expired,"
            " by chatgate.reason",
        )
        # The abuse detector's findings (limits/anomaly_detector.py): a rise says a user,
        # caller or tenant is using far more, or failing far more, than usual.
        self.anomalies = meter.create_counter(
            "chatgate.anomalies",
            unit="{finding}",
            description="Abuse detector findings, by chatgate.anomaly.rule and chatgate.anomaly.action",
        )
        self._meter = meter

    def count_unpriced(self, model: str) -> None:
        """One call of ``model`` had no price. Model names come from callers: past
        ``_MAX_UNPRICED_MODELS`` distinct names the rest count as ``(other)``."""
        model = model[:100]
        if model not in self._unpriced_models:
            if len(self._unpriced_models) >= _MAX_UNPRICED_MODELS:
                model = "(other)"
            else:
                self._unpriced_models.add(model)
        self.unpriced_calls.add(1, {"chatgate.priced_model": model})

    def observe(
        self,
        name: str,
        unit: str,
        description: str,
        read: Callable[[], Iterable[tuple[float, dict[str, Any]]]],
    ) -> None:
        """Register a gauge read at each export (breaker state, ledger depth, spool size)."""

        def callback(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, attributes) for value, attributes in read()]

        self._meter.create_observable_gauge(name, callbacks=[callback], unit=unit, description=description)


def _process_cpu_time(_: CallbackOptions) -> Iterable[Observation]:
    times = os.times()
    return [Observation(times.user, {"cpu.mode": "user"}), Observation(times.system, {"cpu.mode": "system"})]


NO_TELEMETRY = Telemetry()
