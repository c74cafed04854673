"""Agents SDK traces into the job's log: agent and tool spans become structured events. This
processor replaces the SDK's OpenAI exporter, so nothing (prompts, the Router key) leaves for
api.openai.com; it never blocks and never raises into a run."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog
from agents import Span, Trace, TracingProcessor

log = structlog.get_logger("agentq.trace")


def _ms(span: Span[Any]) -> float | None:
    try:
        start, end = span.started_at, span.ended_at
        if start and end:
            delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
            return round(delta.total_seconds() * 1000, 1)
    except ValueError:
        pass
    return None


class SpanEndProcessor(TracingProcessor):
    """A processor that acts on finished spans only; the other hooks do nothing."""

    def on_trace_start(self, trace: Trace) -> None:
        pass

    def on_trace_end(self, trace: Trace) -> None:
        pass

    def on_span_start(self, span: Span[Any]) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass


class JobLogProcessor(SpanEndProcessor):
    def __init__(self) -> None:
        self.dropped = 0
        """Spans that could not be turned into events (counted, never raised)."""

    def on_span_end(self, span: Span[Any]) -> None:
        try:
            data = span.span_data
            error = span.error["message"] if span.error else None
            if data.type == "function":
                log.info(
                    "tool_call",
                    tool=data.name,
                    ms=_ms(span),
                    input=data.input,
                    output=str(data.output)[:2000] if data.output is not None else None,
                    error=error,
                )
            elif data.type == "agent":
                log.info("agent_span", agent=data.name, ms=_ms(span), tools=data.tools, error=error)
            elif data.type == "mcp_tools":
                log.info("mcp_tools", server=data.server, tools=data.result)
        except Exception:
            self.dropped += 1
