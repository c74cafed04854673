"""Optional export of the Agents SDK's spans to OpenTelemetry (OTLP over HTTP) when
AGENTQ_OTLP_ENDPOINT is set; needs `pip install 'agentq[otel]'`. Span and trace ids are derived
from the SDK's own, so the agent → model call → tool tree survives, and every span carries
the job's ids. Export is batched in the background: a full queue drops spans, never blocks."""

from __future__ import annotations

import hashlib
import random
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import structlog
from agents import Span
from opentelemetry import trace as otel
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import IdGenerator, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from .tracing import SpanEndProcessor

_next_ids: ContextVar[tuple[int, int] | None] = ContextVar("agentq_otel_ids", default=None)


def _id(text: str, bits: int) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=bits // 8).digest()) or 1


def _ns(iso: str | None) -> int | None:
    return int(datetime.fromisoformat(iso).timestamp() * 1e9) if iso else None


class SdkIds(IdGenerator):
    """Hands out the ids the exporter derived from the SDK span being converted."""

    def generate_span_id(self) -> int:
        ids = _next_ids.get()
        return ids[1] if ids else random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        ids = _next_ids.get()
        return ids[0] if ids else random.getrandbits(128) or 1


def otlp_provider(endpoint: str) -> TracerProvider:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(
        id_generator=SdkIds(), resource=Resource.create({"service.name": "agentq-worker"})
    )
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), max_queue_size=4096)
    )
    return provider


class OtelExporter(SpanEndProcessor):
    def __init__(self, provider: TracerProvider, *, content: bool = True) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("agentq")
        self.content = content
        self.dropped = 0

    def on_span_end(self, span: Span[Any]) -> None:
        try:
            self._export(span)
        except Exception:
            self.dropped += 1

    def _export(self, span: Span[Any]) -> None:
        data = span.span_data
        trace_id = _id(span.trace_id, 128)
        parent = None
        if span.parent_id:
            parent_ctx = otel.SpanContext(
                trace_id,
                _id(span.parent_id, 64),
                is_remote=False,
                trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED),
            )
            parent = otel.set_span_in_context(otel.NonRecordingSpan(parent_ctx))
        label = getattr(data, "name", None) or getattr(data, "model", None) or ""
        token = _next_ids.set((trace_id, _id(span.span_id, 64)))
        try:
            out = self.tracer.start_span(
                f"{data.type} {label}".strip(),
                context=parent,
                start_time=_ns(span.started_at),
                attributes=self._attributes(data),
            )
        finally:
            _next_ids.reset(token)
        if span.error:
            out.set_status(otel.Status(otel.StatusCode.ERROR, span.error.get("message")))
        out.end(end_time=_ns(span.ended_at))

    def _attributes(self, data: Any) -> dict[str, Any]:
        bound = structlog.contextvars.get_contextvars()
        attrs: dict[str, Any] = {
            f"agentq.{k}": str(v)
            for k, v in bound.items()
            if k in ("job_id", "batch_id", "custom_id")
        }
        attrs["agents.span_type"] = data.type
        for name in ("name", "model"):
            value = getattr(data, name, None)
            if isinstance(value, str):
                attrs[f"agents.{name}"] = value
        usage = getattr(data, "usage", None)
        if isinstance(usage, dict):
            for k in ("input_tokens", "output_tokens"):
                if isinstance(usage.get(k), int):
                    attrs[f"gen_ai.usage.{k}"] = usage[k]
        if self.content and data.type == "function":
            attrs["agents.input"] = str(data.input)[:2000]
            attrs["agents.output"] = str(data.output)[:2000]
        return attrs

    def shutdown(self) -> None:
        self.provider.shutdown()

    def force_flush(self) -> None:
        self.provider.force_flush()
