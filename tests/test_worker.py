"""The worker path on a real Redis and the simulated Router over HTTP, with an in-process arq
worker: outputs, routing, headers, retries, fallbacks, permanent failures, records."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ops.simrouter import SimRouter
from producer import AgentJob, Producer, Settings, Status
from tests.conftest import ROUTER_KEY
from tests.helpers import records, run_batch


def job(custom_id: str, text: str, **kw: Any) -> AgentJob:
    return AgentJob.model_validate({"custom_id": custom_id, "input": text, **kw})


async def run(producer: Producer, settings: Settings, *jobs: AgentJob) -> dict[str, Any]:
    batch = await producer.submit(list(jobs))
    await run_batch(producer, settings, batch.id)
    return await records(producer, batch.id)


async def test_plain_and_tool_jobs(producer: Producer, settings: Settings) -> None:
    calc = {"name": "Calc", "instructions": "Use tools.", "tools": ["calculator"]}
    out = await run(
        producer,
        settings,
        job("q1", "What is 2+2?"),
        job("q2", "What is 15 * 23?", agent=calc, model="gpt-4o"),
        job("q3", "What is 6 * 7?", agent="calculator"),
    )
    assert out["q1"].status == Status.SUCCEEDED and out["q1"].output == "4"
    q2 = out["q2"]
    assert q2.output == "The result of 15 * 23 is 345."
    assert q2.model == "gpt-4o" and q2.usage.requests == 2 and q2.usage.total_tokens > 0
    assert q2.cost_usd > 0
    assert [a.ok for a in q2.attempts] == [True]
    assert out["q3"].output == "The result of 6 * 7 is 42."
    events = [e["event"] for e in q2.logs]
    assert events[0] == "job.started" and events[-1] == "job.finished"
    assert events.count("model_call") == 2
    call = next(e for e in q2.logs if e["event"] == "model_call")
    assert call["model"] == "gpt-4o" and call["latency_ms"] >= 0 and call["total_tokens"] > 0
    for r in out.values():
        assert r.started_at and r.finished_at and r.enqueued_at and r.worker


async def test_auto_routes_by_input_length(producer: Producer, settings: Settings) -> None:
    out = await run(
        producer,
        settings,
        job("short", "What is 1+1?", model="auto"),
        job(
            "long", "Explain in detail why queues help when running many agents. " * 2, model="auto"
        ),
    )
    assert out["short"].model == settings.auto_small_model
    assert out["long"].model == settings.auto_large_model


async def test_headers_reach_router(producer: Producer, settings: Settings, sim: SimRouter) -> None:
    await run(
        producer,
        settings,
        job("h", "What is 3+3?", metadata={"user_id": "u-42", "tags": ["team-a", "nightly"]}),
    )
    req = sim.stats.requests[-1]
    assert req["headers"]["x-app-name"] == "agentq"
    assert req["headers"]["x-user-id"] == "u-42"
    assert req["headers"]["x-llm-tags"] == "team-a,nightly"
    assert req["body"]["user"] == "u-42"
    assert req["body"]["model"] == settings.default_model
    # The key reached the Router as a bearer token (checked by the simulator, which never
    # stores it), and nothing else carried it.
    assert req["key_ok"] is True
    assert ROUTER_KEY not in json.dumps(req)


async def test_retry_then_success_and_fallback(producer: Producer, settings: Settings) -> None:
    out = await run(
        producer,
        settings,
        job("flaky", "What is 5+5?", model="sim-flaky"),
        job("fallback", "What is 7+7?", model="sim-500", fallbacks=["sim-503", "gpt-4o"]),
    )
    flaky = out["flaky"]
    assert flaky.status == Status.SUCCEEDED and flaky.output == "10"
    assert [(a.model, a.ok, a.error) for a in flaky.attempts] == [
        ("sim-flaky", False, "router_error"),
        ("sim-flaky", True, None),
    ]
    fb = out["fallback"]
    assert fb.status == Status.SUCCEEDED and fb.model == "gpt-4o" and fb.output == "14"
    tries = settings.max_attempts_per_model
    assert [a.model for a in fb.attempts] == ["sim-500"] * tries + ["sim-503"] * tries + ["gpt-4o"]


async def test_retry_after_sets_the_wait(
    producer: Producer, settings: Settings, sim: SimRouter
) -> None:
    """The Router's retry-after (0.6 s here) is waited for, not the policy's backoff (at most
    0.05 s in these tests): with the hint ignored, the calls come 0.05 s apart."""
    sim.config.retry_after_s = 0.6
    patient = settings.model_copy(update={"max_attempts_per_model": 2, "backoff_max_s": 5.0})
    await run(producer, patient, job("rl", "What is 1+2?", model="sim-429"))
    calls = [r["at"] for r in sim.stats.requests if r["body"]["model"] == "sim-429"]
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.55


def test_retry_policy_prefers_the_hint_within_its_ceiling() -> None:
    from worker.retry import RetryPolicy

    policy = RetryPolicy(3, base_s=0.01, max_s=10)
    assert policy.delay(0, 2.5) == 2.5
    assert policy.delay(0, None) <= 0.01
    assert RetryPolicy(3, 0.01, 1.0).delay(0, 5.0) == 1.0  # capped by AGENTQ_BACKOFF_MAX_S


async def test_rate_limit_retries_then_reports(producer: Producer, settings: Settings) -> None:
    out = await run(producer, settings, job("rl", "What is 1+2?", model="sim-429"))
    r = out["rl"]
    assert r.status == Status.FAILED and r.error is not None
    assert r.error.type == "rate_limited" and r.error.retryable
    assert len(r.attempts) == settings.max_attempts_per_model
    assert "gave up after retries" in r.error.message


@pytest.mark.parametrize(
    ("model", "error_type", "needle"),
    [
        ("gpt-5", "model_not_found", "model 'gpt-5' not found — see `agentq models`"),
        ("sim-bad-json", "output_invalid", "not JSON"),
    ],
)
async def test_permanent_failures_fail_fast(
    producer: Producer, settings: Settings, model: str, error_type: str, needle: str
) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    agent = {"output_schema": schema} if model == "sim-bad-json" else None
    out = await run(
        producer, settings, job("x", "What is 2+2?", model=model, fallbacks=["gpt-4o"], agent=agent)
    )
    r = out["x"]
    assert r.status == Status.FAILED and r.error is not None
    assert r.error.type == error_type and not r.error.retryable
    assert needle in r.error.message
    assert len(r.attempts) == 1  # never retried, no fallback for a permanent error


async def test_wrong_key_is_auth_failed(producer: Producer, settings: Settings) -> None:
    bad = settings.model_copy(update={"api_key": type(settings.api_key)("sk-wrong-key-123")})
    batch = await producer.submit([job("k", "What is 2+2?")])
    await run_batch(producer, bad, batch.id)
    r = (await records(producer, batch.id))["k"]
    assert r.error is not None and r.error.type == "auth_failed"
    assert "HANZO_API_KEY" in r.error.message and len(r.attempts) == 1
    assert "sk-wrong-key-123" not in r.model_dump_json()


async def test_router_unreachable(producer: Producer, settings: Settings) -> None:
    """A Router that never answers is an outage: the job waits for it (its breaker open)
    until AGENTQ_OUTAGE_MAX_S, then fails saying so."""
    down = settings.model_copy(update={"router_url": "http://127.0.0.1:9/v1", "outage_max_s": 1.5})
    batch = await producer.submit([job("u", "What is 2+2?")])
    await run_batch(producer, down, batch.id)
    r = (await records(producer, batch.id))["u"]
    assert r.error is not None and r.error.type == "router_unreachable"
    assert "Cannot connect to Router at http://127.0.0.1:9/v1 — is it running?" in r.error.message
    assert "Router at http://127.0.0.1:9/v1 has been down for" in r.error.message
    assert "AGENTQ_OUTAGE_MAX_S=1.5" in r.error.message
    events = [e["event"] for e in r.logs]
    assert "breaker.wait" in events
    # The tries spent before the breaker opened, and none after: it held the call instead.
    assert len(r.attempts) >= settings.max_attempts_per_model


async def test_structured_output(producer: Producer, settings: Settings) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    out = await run(
        producer, settings, job("s", "Paris has 2100000 people", agent={"output_schema": schema})
    )
    r = out["s"]
    assert r.status == Status.SUCCEEDED, r.error
    assert isinstance(r.output_json, dict) and set(r.output_json) == {"city", "population"}


async def test_invalid_jobs_fail_with_what_to_do(producer: Producer, settings: Settings) -> None:
    out = await run(
        producer,
        settings,
        job("tool", "hi", agent={"tools": ["no_such_tool"]}),
        job("profile", "hi", agent="no_such_profile"),
        job("settings", "hi", agent={"model_settings": {"temprature": 0.2}}),
    )
    for cid, needle in [
        ("tool", "unknown tools ['no_such_tool']; the workers offer: calculator"),
        ("profile", "unknown agent profile 'no_such_profile'"),
        ("settings", "unknown model_settings ['temprature']"),
    ]:
        r = out[cid]
        assert r.status == Status.FAILED and r.error is not None, cid
        assert r.error.type == "invalid_job" and needle in r.error.message, (cid, r.error)
        assert r.attempts == []
    # Settings that would reach the Router besides the call are refused before a job exists.
    with pytest.raises(ValueError, match="model_settings may not set metadata, store"):
        job("store", "hi", agent={"model_settings": {"store": True, "metadata": {"a": "b"}}})


async def test_timeout(producer: Producer, settings: Settings) -> None:
    out = await run(producer, settings, job("t", "What is 2+2?", model="sim-slow", timeout_s=0.3))
    r = out["t"]
    assert r.status == Status.FAILED and r.error is not None and r.error.type == "timeout"


async def test_batch_counters_add_up(producer: Producer, settings: Settings) -> None:
    jobs = [job(f"j{i}", f"What is {i} + {i}?") for i in range(40)]
    jobs += [job("bad", "What is 1+1?", model="gpt-5")]
    batch = await producer.submit(jobs)
    st = await run_batch(producer, settings, batch.id)
    assert st.total == 41 and st.counts[Status.SUCCEEDED] == 40 and st.counts[Status.FAILED] == 1
    assert st.counts[Status.QUEUED] == st.counts[Status.RUNNING] == 0
    recs = [r async for r in producer.results(batch.id)]
    assert [r.custom_id for r in recs] == [j.custom_id for j in jobs]  # input order
    assert sum(r.usage.total_tokens for r in recs) == st.usage.total_tokens
    assert abs(sum(r.cost_usd for r in recs) - st.cost_usd) < 1e-6
    assert {r.output for r in recs if r.custom_id == "j7"} == {"14"}


async def test_trace_spans_become_job_log_events(producer: Producer, settings: Settings) -> None:
    out = await run(
        producer, settings, job("c", "What is 15 * 23?", agent={"tools": ["calculator"]})
    )
    events = out["c"].logs
    tool = next(e for e in events if e["event"] == "tool_call")
    assert tool["tool"] == "calculator" and tool["output"] == "345" and tool["ms"] >= 0
    assert '"expression"' in tool["input"]
    agent = next(e for e in events if e["event"] == "agent_span")
    assert agent["agent"] == "Assistant" and agent["tools"] == ["calculator"]
    for e in events:  # every event carries the job's context once bound
        assert e["run"] == 1 and "timestamp" in e and "level" in e


async def test_cost_from_price_table_without_router_header(
    producer: Producer, settings: Settings
) -> None:
    from ops.simrouter import SimConfig
    from tests.conftest import ROUTER_KEY

    async with SimRouter(SimConfig(api_key=ROUTER_KEY, cost_header=False)) as plain:
        priced = settings.model_copy(
            update={"router_url": plain.url, "prices": {"gpt-4o": (1000.0, 2000.0)}}
        )
        batch = await producer.submit(
            [
                job("priced", "What is 2+2?", model="gpt-4o"),
                job("unpriced", "What is 2+3?", model="gpt-4o-mini"),
            ]
        )
        await run_batch(producer, priced, batch.id)
    out = await records(producer, batch.id)
    u = out["priced"].usage
    assert out["priced"].cost_usd == pytest.approx(
        (u.input_tokens * 1000 + u.output_tokens * 2000) / 1e6
    )
    assert out["unpriced"].cost_usd == 0
    st = await producer.status(batch.id)
    assert set(st.models) == {"gpt-4o", "gpt-4o-mini"}
    assert st.models["gpt-4o"].jobs == 1
    assert st.models["gpt-4o"].cost_usd == pytest.approx(out["priced"].cost_usd)
    assert st.models["gpt-4o"].input_tokens == u.input_tokens


async def test_profile_with_per_job_overrides(producer: Producer, settings: Settings) -> None:
    out = await run(
        producer,
        settings,
        job("base", "What is 9 * 9?", agent="calculator"),
        job(
            "over", "What is 9 * 9?", agent={"profile": "calculator", "name": "Quick", "tools": []}
        ),
        job("bad", "hi", agent={"profile": "nope"}),
    )
    assert out["base"].output == "The result of 9 * 9 is 81."
    assert out["over"].output == "81"  # the override dropped the profile's tool
    assert next(e for e in out["over"].logs if e["event"] == "agent_span")["agent"] == "Quick"
    assert (
        out["bad"].error is not None and "unknown agent profile 'nope'" in out["bad"].error.message
    )


async def test_conversation_input_and_max_turns(producer: Producer, settings: Settings) -> None:
    convo = [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "I have 3 apples."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "What is 3 + 4?"},
    ]
    out = await run(
        producer,
        settings,
        job("convo", "x", **{"input": convo}),
        job("turns", "What is 15 * 23?", agent={"tools": ["calculator"]}, max_turns=1),
    )
    assert out["convo"].output == "7"
    err = out["turns"].error
    assert err is not None and err.type == "max_turns_exceeded" and not err.retryable
    assert "Max turns (1) exceeded" in err.message and "raise max_turns" in err.message


async def test_failed_call_is_retried_without_rerunning_tools(
    producer: Producer, settings: Settings
) -> None:
    out = await run(
        producer,
        settings,
        job("f", "What is 12 * 12?", model="sim-flaky", agent={"tools": ["calculator"]}),
    )
    r = out["f"]
    assert r.status == Status.SUCCEEDED and r.output == "The result of 12 * 12 is 144."
    events = [e["event"] for e in r.logs]
    assert events.count("tool_call") == 1  # the tool ran once, though both calls failed once
    assert events.count("retry.wait") == 2
    assert [(a.ok, a.error) for a in r.attempts] == [
        (False, "router_error"),
        (False, "router_error"),
        (True, None),
    ]


async def test_metrics_count_jobs_calls_and_tokens(producer: Producer, settings: Settings) -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (
        value("agentq_jobs_total", status="succeeded", error_type=""),
        value("agentq_jobs_total", status="failed", error_type="model_not_found"),
        value("agentq_tokens_total", model="gpt-4o", kind="input"),
        value("agentq_model_call_duration_seconds_count", model="gpt-4o", outcome="ok"),
    )
    out = await run(
        producer,
        settings,
        job("a", "What is 1+1?", model="gpt-4o"),
        job("b", "What is 1+1?", model="gpt-5"),
    )
    after = (
        value("agentq_jobs_total", status="succeeded", error_type=""),
        value("agentq_jobs_total", status="failed", error_type="model_not_found"),
        value("agentq_tokens_total", model="gpt-4o", kind="input"),
        value("agentq_model_call_duration_seconds_count", model="gpt-4o", outcome="ok"),
    )
    assert after[0] - before[0] == 1 and after[1] - before[1] == 1
    assert after[2] - before[2] == out["a"].usage.input_tokens
    assert after[3] - before[3] == 1


async def test_redis_trouble_becomes_an_arq_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """If Redis fails a job's bookkeeping past the client's retries, arq must keep the job
    (Retry) instead of finishing it with our record still queued: that would lose it."""
    from arq import Retry
    from redis.exceptions import ConnectionError as RedisConnectionError

    from worker import runner

    class BrokenStore:
        async def claim(self, *args: object) -> None:
            raise RedisConnectionError("Redis went away")

    rt = runner.Runtime.__new__(runner.Runtime)
    rt.store = BrokenStore()  # type: ignore[assignment]
    rt.worker_id = "host:1"
    with pytest.raises(Retry) as retry:
        await runner.run_agent_job({"agentq": rt, "job_id": "j"}, "j", "b")
    assert retry.value.defer_score == runner.REDIS_RETRY_S * 1000


async def test_model_calls_in_flight_are_bounded(
    producer: Producer, settings: Settings, sim: SimRouter
) -> None:
    """AGENTQ_MAX_MODEL_CALLS bounds the calls in flight below the job concurrency."""
    sim.config.latency_ms = 150
    bounded = settings.model_copy(update={"concurrency": 10, "max_model_calls": 2})
    jobs = [job(f"j{i}", "What is 1+1?") for i in range(10)]
    out = await run(producer, bounded, *jobs)
    assert all(r.status == Status.SUCCEEDED for r in out.values())
    assert sim.stats.peak_in_flight == 2


async def test_a_job_whose_workers_kept_dying_fails_after_max_runs(
    producer: Producer, settings: Settings, redis: Any
) -> None:
    """AGENTQ_MAX_RUNS through the runner: the next start of a job already started that often
    (its workers died each time) fails it with what to do."""
    from producer import keys
    from producer.models import job_id_for

    batch = await producer.submit([job("poison", "What is 1+1?")])
    await redis.hset(keys.job(job_id_for(batch.id, "poison")), "runs", settings.max_runs)
    await run_batch(producer, settings, batch.id)
    rec = (await records(producer, batch.id))["poison"]
    assert rec.status == Status.FAILED and rec.error is not None
    assert f"started {settings.max_runs} times" in rec.error.message
    assert "AGENTQ_MAX_RUNS" in rec.error.message


async def test_concurrent_runs_of_one_agent_each_run_an_agent_object_of_their_own(
    producer: Producer, settings: Settings, sim: SimRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: every run of the same agent spec ran the one cached Agent object, and the SDK
    checks all runs sharing an Agent at each run's start and end (agents'
    agent_tool_configuration): O(C) per run, about 1 ms a run at C = 500 (py-spy)."""
    from agents import Runner

    from worker import runner

    sim.config.latency_ms = 100
    agents: list[Any] = []
    sdk_run = Runner.run

    async def spy(agent: Any, *args: Any, **kwargs: Any) -> Any:
        agents.append(agent)
        return await sdk_run(agent, *args, **kwargs)

    monkeypatch.setattr(runner.Runner, "run", spy)
    calc = {"name": "Calc", "instructions": "Use tools.", "tools": ["calculator"]}
    jobs = [job(f"j{i}", "What is 2+2?", agent=calc) for i in range(6)]
    out = await run(producer, settings.model_copy(update={"concurrency": 6}), *jobs)
    assert all(r.status == Status.SUCCEEDED for r in out.values())
    assert len(agents) == 6 and len({id(a) for a in agents}) == 6
    for a in agents:  # copies of one agent: the same spec, tools and all
        assert (a.name, a.instructions) == ("Calc", "Use tools.")
        assert [id(t) for t in a.tools] == [id(t) for t in agents[0].tools]
