"""Optional OpenTelemetry export: the Agents SDK's spans of a real run, with their tree and
the job's ids, through the OpenTelemetry SDK (an in-memory exporter stands in for OTLP)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from agents import (
    Agent,
    ModelProvider,
    RunConfig,
    Runner,
    function_tool,
    set_trace_processors,
    set_tracing_disabled,
)
from agents.models.interface import Model
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from openai import AsyncOpenAI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ops.simrouter import SimRouter
from producer import AgentJob, Producer, Settings
from producer.models import job_id_for
from tests.conftest import ROUTER_KEY
from tests.helpers import run_batch
from worker.otel import OtelExporter, SdkIds
from worker.tools import calculator


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(id_generator=SdkIds())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    set_trace_processors([OtelExporter(provider)])
    set_tracing_disabled(False)
    yield memory
    set_trace_processors([])
    set_tracing_disabled(True)


async def test_spans_keep_their_tree_and_job_ids(
    sim: SimRouter, exported: InMemorySpanExporter
) -> None:
    client = AsyncOpenAI(base_url=sim.url, api_key=ROUTER_KEY, max_retries=0)

    class Provider(ModelProvider):
        def get_model(self, model_name: str | None) -> Model:
            return OpenAIChatCompletionsModel(model=model_name or "gpt-4o", openai_client=client)

    agent = Agent(name="Calc", tools=[function_tool(calculator)])
    with structlog.contextvars.bound_contextvars(job_id="j1", batch_id="b1", custom_id="c1"):
        result = await Runner.run(
            agent,
            "What is 15 * 23?",
            run_config=RunConfig(model="gpt-4o", model_provider=Provider()),
        )
    await client.close()
    assert result.final_output == "The result of 15 * 23 is 345."
    spans = {s.name: s for s in exported.get_finished_spans()}
    agent_span, tool_span = spans["agent Calc"], spans["function calculator"]
    generations = [s for s in exported.get_finished_spans() if s.name.startswith("generation")]
    assert len(generations) == 2
    by_id = {s.context.span_id: s for s in exported.get_finished_spans()}

    def ancestors(s: object) -> list[str]:
        chain = []
        while s.parent is not None and s.parent.span_id in by_id:  # type: ignore[attr-defined]
            s = by_id[s.parent.span_id]  # type: ignore[attr-defined]
            chain.append(s.name)  # type: ignore[attr-defined]
        return chain

    # The SDK's tree, rebuilt in OpenTelemetry: task > agent > turn > generation | function.
    assert ancestors(tool_span) == ["turn", "agent Calc", "task Agent workflow"]
    assert all(ancestors(g) == ["turn", "agent Calc", "task Agent workflow"] for g in generations)
    assert ancestors(agent_span) == ["task Agent workflow"]
    assert len({s.context.trace_id for s in exported.get_finished_spans()}) == 1
    assert tool_span.attributes["agentq.job_id"] == "j1"
    assert tool_span.attributes["agents.output"] == "345"
    assert generations[0].attributes["gen_ai.usage.input_tokens"] > 0
    assert tool_span.end_time > tool_span.start_time


async def test_worker_exports_spans_to_the_otlp_endpoint_it_is_given(
    producer: Producer, settings: Settings
) -> None:
    """Through the worker's own wiring (AGENTQ_OTLP_ENDPOINT), to an OTLP/HTTP receiver."""
    from aiohttp import web
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        received.append(msg)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        endpoint = f"http://127.0.0.1:{port}/v1/traces"
        traced = settings.model_copy(update={"otlp_endpoint": endpoint})
        batch = await producer.submit([AgentJob(custom_id="t", input="What is 15 * 23?")])
        await run_batch(producer, traced, batch.id)  # the worker's shutdown flushes the spans
    finally:
        await runner.cleanup()
        set_trace_processors([])
        set_tracing_disabled(True)
    spans = [
        s for m in received for rs in m.resource_spans for ss in rs.scope_spans for s in ss.spans
    ]
    names = {s.name for s in spans}
    assert any(n.startswith("agent") for n in names), names
    assert any(n.startswith("generation") for n in names), names  # exported: still made
    job_ids = {
        a.value.string_value for s in spans for a in s.attributes if a.key == "agentq.job_id"
    }
    assert job_ids == {job_id_for(batch.id, "t")}


async def test_without_otlp_model_calls_make_no_generation_span(
    producer: Producer, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the OTLP export reads generation spans; the job log keeps agent and tool spans.
    Before, the SDK built (and dropped) one per model call, with the call's input and output."""
    from worker.tracing import JobLogProcessor

    seen: list[str] = []
    on_span_end = JobLogProcessor.on_span_end

    def spy(self: JobLogProcessor, span: Any) -> None:
        seen.append(span.span_data.type)
        on_span_end(self, span)

    monkeypatch.setattr(JobLogProcessor, "on_span_end", spy)
    calc = {"name": "Calc", "instructions": "Use tools.", "tools": ["calculator"]}
    job = AgentJob.model_validate({"custom_id": "t", "input": "What is 15 * 23?", "agent": calc})
    batch = await producer.submit([job])
    try:
        await run_batch(producer, settings, batch.id)
    finally:
        set_trace_processors([])
        set_tracing_disabled(True)
    assert "generation" not in seen and {"agent", "function"} <= set(seen), seen
    (record,) = [r async for r in producer.results(batch.id)]
    assert record.output == "The result of 15 * 23 is 345."
    events = [e["event"] for e in record.logs]
    assert "agent_span" in events and "tool_call" in events and events.count("model_call") == 2


async def test_no_span_goes_to_the_sdks_default_exporter(
    producer: Producer, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's default exporter would send prompts, with the Router key, to api.openai.com."""
    from agents.tracing.processors import BackendSpanExporter

    sent: list[object] = []
    monkeypatch.setattr(BackendSpanExporter, "export", lambda self, items: sent.extend(items))
    batch = await producer.submit([AgentJob(custom_id="t", input="What is 15 * 23?")])
    await run_batch(producer, settings, batch.id)
    from agents.tracing import get_trace_provider

    provider = get_trace_provider()
    provider.force_flush()  # type: ignore[attr-defined]
    assert sent == []
