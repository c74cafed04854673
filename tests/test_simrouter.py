"""Tests of the simulated Router (ops/simrouter.py) with the real openai client and Agents SDK."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import aiohttp
import openai
import pytest
from agents import (
    Agent,
    ModelProvider,
    RunConfig,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.models.interface import Model
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel

from ops.simrouter import (
    SimConfig,
    SimRouter,
    fake_from_schema,
    find_expression,
    format_number,
    safe_eval,
)

KEY = "sk-sim-test"


@pytest.fixture
async def sim() -> AsyncIterator[SimRouter]:
    async with SimRouter(SimConfig(api_key=KEY, seed=1)) as router:
        yield router


@pytest.fixture
async def client(sim: SimRouter) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=sim.url, api_key=KEY, max_retries=0) as c:
        yield c


def ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


async def test_url_and_models(sim: SimRouter, client: openai.AsyncOpenAI) -> None:
    assert sim.url == f"http://127.0.0.1:{sim.port}/v1" and sim.port > 0
    ids = [m.id async for m in client.models.list()]
    assert {"gpt-4o", "claude-3-haiku-20240307", "sim-flaky", "sim-drop"} <= set(ids)


async def test_health_endpoints(sim: SimRouter) -> None:
    base = sim.url.removesuffix("/v1")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/health/liveliness") as r:
            assert r.status == 200 and await r.json() == "I'm alive!"
        async with http.get(f"{base}/health/readiness") as r:
            assert (await r.json())["status"] == "healthy"
        async with http.get(f"{base}/health") as r:
            assert r.status == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        async with http.get(f"{base}/health", headers=auth) as r:
            body = await r.json()
            assert body["healthy_endpoints"] and body["unhealthy_endpoints"] == []


@pytest.mark.parametrize(
    ("question", "answer"),
    [("What is 2 + 2?", "4"), ("What is 15 * 23?", "345"), ("7/2", "3.5"), ("hello", None)],
)
async def test_answers(client: openai.AsyncOpenAI, question: str, answer: str | None) -> None:
    resp = await client.chat.completions.create(model="gpt-4o", messages=ask(question))
    assert resp.id.startswith("chatcmpl-sim-") and resp.model == "gpt-4o"
    assert resp.choices[0].finish_reason == "stop"
    expected = answer if answer is not None else f"Simulated answer to: {question}"
    assert resp.choices[0].message.content == expected
    assert resp.usage is not None and resp.usage.total_tokens >= 2


async def test_content_parts(client: openai.AsyncOpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is (2 + 3) * 4?"}]}]
    resp = await client.chat.completions.create(model="gpt-4o-mini", messages=parts)  # type: ignore[arg-type]
    assert resp.choices[0].message.content == "20"


CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    },
}


async def test_calculator_tool_round_trip(client: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [*ask("What is 15 * 23?")]
    first = await client.chat.completions.create(
        model="gpt-4o",
        messages=messages,
        tools=[CALCULATOR],  # type: ignore[list-item]
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "calculator"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"expression": "15 * 23"}  # type: ignore[union-attr]
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "345"})
    second = await client.chat.completions.create(
        model="gpt-4o",
        messages=messages,
        tools=[CALCULATOR],  # type: ignore[list-item]
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == "The result of 15 * 23 is 345."


async def test_other_tool_called_by_name(client: openai.AsyncOpenAI) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
            },
        },
    }
    resp = await client.chat.completions.create(
        model="gpt-4o",
        messages=ask("please use get_weather for Paris"),
        tools=[weather],  # type: ignore[list-item]
    )
    calls = resp.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    args = json.loads(calls[0].function.arguments)  # type: ignore[union-attr]
    assert args == {"city": "please use get_weather for Paris", "days": 1}


class Step(BaseModel):
    title: str
    done: bool


class Report(BaseModel):
    summary: str
    value: int
    ratio: float
    level: Literal["low", "high"]
    steps: list[Step]
    note: str | None
    owner: Step


async def test_json_schema_output_validates(client: openai.AsyncOpenAI) -> None:
    schema = Report.model_json_schema()
    resp = await client.chat.completions.create(
        model="gpt-4o",
        messages=ask("Summarise 6 * 7 for me"),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "final_output", "strict": True, "schema": schema},
        },
    )
    report = Report.model_validate_json(resp.choices[0].message.content or "")
    assert report.value == 42 and report.level == "low" and len(report.steps) == 1


def test_helpers() -> None:
    assert find_expression("What is 15 * 23?") == ("15 * 23", 345)
    assert find_expression("no math in gpt-4 or 2024-01-01") is None
    assert find_expression("10 ** 10 ** 10") is None  # too large, refused
    assert find_expression("__import__('os') 1 + 1") == ("1 + 1", 2)
    assert [format_number(v) for v in (4, 4.0, 3.5, 1 / 3)] == ["4", "4", "3.5", "0.333333333333"]
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "date-time"}}}
    assert fake_from_schema(schema, "x", None) == {"d": "2024-01-01T00:00:00Z"}


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("500", openai.InternalServerError),
        ("503", openai.InternalServerError),
        ("429", openai.RateLimitError),
        ("401", openai.AuthenticationError),
        ("400", openai.BadRequestError),
        ("drop", openai.APIConnectionError),
    ],
)
async def test_fault_header(
    sim: SimRouter, client: openai.AsyncOpenAI, fault: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as caught:
        await client.chat.completions.create(
            model="gpt-4o", messages=ask("hi"), extra_headers={"x-sim-fault": fault}
        )
    if fault == "drop":  # the connection closed without a response; not a timeout
        assert not isinstance(caught.value, openai.APITimeoutError)
    if isinstance(caught.value, openai.APIStatusError):
        assert caught.value.status_code == int(fault)
        assert isinstance(caught.value.body, dict) and caught.value.body["code"] == fault
    assert sim.stats.by_outcome[fault] == 1
    # the server stays usable after the fault (also after a dropped connection)
    ok = await client.chat.completions.create(model="gpt-4o", messages=ask("1 + 1"))
    assert ok.choices[0].message.content == "2"


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("sim-500", openai.InternalServerError),
        ("sim-503", openai.InternalServerError),
        ("sim-429", openai.RateLimitError),
        ("sim-drop", openai.APIConnectionError),
    ],
)
async def test_fault_models(client: openai.AsyncOpenAI, model: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        await client.chat.completions.create(model=model, messages=ask("hi"))


async def test_drop_with_aiohttp_backend(sim: SimRouter) -> None:
    # openai's vendored aiohttp transport maps every aiohttp.ClientConnectionError (including
    # "Server disconnected") to httpx ConnectTimeout, so the client reports a dropped connection
    # as APITimeoutError there -- still a subclass of APIConnectionError.
    http_client = openai.DefaultAioHttpClient()
    async with openai.AsyncOpenAI(
        base_url=sim.url, api_key=KEY, max_retries=0, http_client=http_client
    ) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="sim-drop", messages=ask("hi"))
        resp = await client.chat.completions.create(model="gpt-4o", messages=ask("6 * 7"))
        assert resp.choices[0].message.content == "42"


async def test_unknown_fault_header_and_json_object(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown x-sim-fault"):
        await client.chat.completions.create(
            model="gpt-4o", messages=ask("hi"), extra_headers={"x-sim-fault": "boom"}
        )
    resp = await client.chat.completions.create(
        model="gpt-4o", messages=ask("2 + 3"), response_format={"type": "json_object"}
    )
    assert json.loads(resp.choices[0].message.content or "") == {"answer": "5"}


async def test_rate_limit_headers(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="sim-429", messages=ask("hi"))
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.response.headers["llm_provider-retry-after"] == "1"
    assert caught.value.body["type"] == "rate_limit_error"  # type: ignore[index]


async def test_bad_key_and_unknown_model(sim: SimRouter) -> None:
    async with openai.AsyncOpenAI(base_url=sim.url, api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError, match="Authentication Error"):
            await bad.chat.completions.create(model="gpt-4o", messages=ask("hi"))
    async with openai.AsyncOpenAI(base_url=sim.url, api_key=KEY, max_retries=0) as good:
        with pytest.raises(openai.BadRequestError) as caught:
            await good.chat.completions.create(model="nope", messages=ask("hi"))
        with pytest.raises(openai.BadRequestError, match="streaming is not supported"):
            await good.chat.completions.create(model="gpt-4o", messages=ask("hi"), stream=True)
    assert caught.value.body["message"] == (  # type: ignore[index]
        "Invalid model name passed in model=nope. "
        "Call `/v1/models` to view available models for your key."
    )
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]


async def test_hang_times_out(sim: SimRouter) -> None:
    async with openai.AsyncOpenAI(
        base_url=sim.url, api_key=KEY, max_retries=0, timeout=0.3
    ) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="sim-hang", messages=ask("hi"))
    assert sim.stats.by_outcome["hang"] == 1


async def test_flaky_fails_once_then_succeeds(sim: SimRouter) -> None:
    async with openai.AsyncOpenAI(base_url=sim.url, api_key=KEY, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="sim-flaky", messages=ask("3 * 3"))
        resp = await client.chat.completions.create(model="sim-flaky", messages=ask("3 * 3"))
        assert resp.choices[0].message.content == "9"
    # with the client's own retries the failure is invisible
    async with openai.AsyncOpenAI(base_url=sim.url, api_key=KEY, max_retries=2) as retrying:
        resp = await retrying.chat.completions.create(model="sim-flaky", messages=ask("4 * 4"))
        assert resp.choices[0].message.content == "16"
    assert sim.stats.by_outcome["500"] == 2 and sim.stats.by_outcome["ok"] == 2


async def test_bad_json_model(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="sim-bad-json",
        messages=ask("hi"),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": Step.model_json_schema()},
        },
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(resp.choices[0].message.content or "")


async def test_latency_header(client: openai.AsyncOpenAI) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    await client.chat.completions.create(
        model="gpt-4o", messages=ask("hi"), extra_headers={"x-sim-latency-ms": "150"}
    )
    assert loop.time() - start >= 0.14


async def test_recorded_requests_stats_and_reset(
    sim: SimRouter, client: openai.AsyncOpenAI
) -> None:
    await client.chat.completions.create(
        model="gpt-4o",
        messages=ask("hi"),
        user="user-42",
        extra_headers={"x-app-name": "demo", "x-user-id": "u42", "x-llm-tags": "a,b"},
    )
    base = sim.url.removesuffix("/v1")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        async with http.get(f"{base}/sim/requests") as r:
            recorded = await r.json()
        assert len(recorded) == 1
        headers, body = recorded[0]["headers"], recorded[0]["body"]
        assert "authorization" not in headers
        assert headers["x-app-name"] == "demo" and headers["x-user-id"] == "u42"
        assert headers["x-llm-tags"] == "a,b" and body["user"] == "user-42"
        async with http.get(f"{base}/sim/stats") as r:
            stats = await r.json()
        assert stats["total_requests"] == 1 and stats["by_model"] == {"gpt-4o": 1}
        assert stats["by_outcome"]["ok"] == 1 and stats["by_outcome"]["hang"] == 0
        async with http.post(f"{base}/sim/reset") as r:
            assert r.status == 200
        async with http.get(f"{base}/sim/requests") as r:
            assert await r.json() == []
    assert sim.stats.total_requests == 0


async def test_sim_endpoints_need_the_key(sim: SimRouter, client: openai.AsyncOpenAI) -> None:
    """Recorded requests hold prompts: without the key, no /sim endpoint answers."""
    await client.chat.completions.create(model="gpt-4o", messages=ask("secret prompt"))
    base = sim.url.removesuffix("/v1")
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        async with aiohttp.ClientSession(headers=headers) as http:
            for method, path in (("GET", "requests"), ("GET", "stats"), ("POST", "reset")):
                async with http.request(method, f"{base}/sim/{path}") as r:
                    assert r.status == 401, (path, headers)
                    assert "secret prompt" not in await r.text()
    assert sim.stats.total_requests == 1  # the reset was refused


def test_the_key_is_not_taken_from_the_command_line() -> None:
    """`ps` shows command lines to every local user: the key comes from SIMROUTER_API_KEY."""
    done = subprocess.run(
        [sys.executable, "-m", "ops.simrouter", "--port", "0", "--api-key", "sk-on-the-cmdline"],
        capture_output=True,
        text=True,
        timeout=60,  # a simulator that accepted the option would serve until killed
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 2, done.stdout
    assert "set SIMROUTER_API_KEY" in done.stderr


async def test_cost_header(client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=ask("What is 2 + 2?")
    )
    completion = raw.parse()
    assert completion.usage is not None
    expected = completion.usage.total_tokens / 1000 * 0.002
    assert float(raw.headers["x-llm-response-cost"]) == pytest.approx(expected)
    assert raw.headers["x-litellm-response-cost"] == raw.headers["x-llm-response-cost"]


async def _fault_sequence(seed: int) -> list[bool]:
    config = SimConfig(fault_rates={"500": 0.5}, seed=seed)
    out = []
    async with SimRouter(config) as sim:
        async with openai.AsyncOpenAI(base_url=sim.url, api_key="any", max_retries=0) as c:
            for _ in range(40):
                try:
                    await c.chat.completions.create(model="gpt-4o", messages=ask("hi"))
                    out.append(True)
                except openai.InternalServerError:
                    out.append(False)
    return out


async def test_random_faults_are_seeded() -> None:
    """The same seed gives the same faults in the same order; another seed, others."""
    first, again, other = (
        await _fault_sequence(7),
        await _fault_sequence(7),
        await _fault_sequence(8),
    )
    assert first == again
    assert first != other
    assert 5 < first.count(False) < 35
    with pytest.raises(ValueError, match="unknown fault"):
        SimConfig(fault_rates={"boom": 0.1})


class _SimProvider(ModelProvider):
    def __init__(self, client: openai.AsyncOpenAI) -> None:
        self.client = client

    def get_model(self, model_name: str | None) -> Model:
        return OpenAIChatCompletionsModel(model=model_name or "gpt-4o", openai_client=self.client)


@function_tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return format_number(safe_eval(expression))


async def test_agents_sdk_end_to_end(sim: SimRouter, client: openai.AsyncOpenAI) -> None:
    set_tracing_disabled(True)
    agent = Agent(name="calc", instructions="Use the calculator.", tools=[calculator])
    config = RunConfig(model_provider=_SimProvider(client), model="gpt-4o", tracing_disabled=True)
    result = await Runner.run(agent, "What is 15 * 23?", run_config=config)
    assert "345" in str(result.final_output)
    assert sim.stats.by_outcome["ok"] == 2  # tool call, then the final answer


async def test_agents_sdk_structured_output(client: openai.AsyncOpenAI) -> None:
    set_tracing_disabled(True)
    agent = Agent(name="report", instructions="Report.", output_type=Report)
    config = RunConfig(model_provider=_SimProvider(client), model="gpt-4o", tracing_disabled=True)
    result = await Runner.run(agent, "Report on 6 * 7", run_config=config)
    assert isinstance(result.final_output, Report) and result.final_output.value == 42


async def test_cli_prints_url_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ops.simrouter",
        "--port",
        "0",
        "--fault",
        "429=0.1",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert line.startswith("simulated Router listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url.removesuffix('/v1')}/health/readiness") as r:
                assert r.status == 200
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
