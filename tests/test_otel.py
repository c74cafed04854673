"""Optional OpenTelemetry export: the Agents SDK's spans of a real run, with their tree and
the job's ids, through the OpenTelemetry SDK (an in-memory exporter stands in for OTLP)."""

from __future__ import annotations

from collections.abc import Iterator

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
from tests.conftest import ROUTER_KEY
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
