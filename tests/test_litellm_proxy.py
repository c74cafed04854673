"""agentq against the real LiteLLM proxy (the gateway the Hanzo Router is forked from), run from
.venv-router (ops/router/install.sh) with ops/router/config.yaml, in front of the simulated
Router. Both are started once per session as separate processes on loopback; an in-process
burst worker runs the jobs. What agentq must make of the proxy's own answers: a bad key, an
unknown model, a deployment's rpm limit (429), and successes, one through the proxy's
fallbacks."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from redis.asyncio import Redis

from ops.simrouter import SimConfig
from producer import AgentJob, Producer, Settings, Status
from producer.models import ResultRecord
from tests.helpers import records, run_batch
from worker.errors import classify
from worker.supervisor import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
LITELLM = ROOT / ".venv-router" / "bin" / "litellm"
CONFIG = ROOT / "ops" / "router" / "config.yaml"
PROXY_KEY = "sk-proxy-test-key-0123456789"  # the key agentq sends to the proxy
UPSTREAM_KEY = "sk-upstream-sim-key-987654321"  # the key the proxy sends to the simulator
START_TIMEOUT_S = 90.0
SIM_PRICE_PER_1K = SimConfig().price_per_1k_tokens  # the simulator's x-litellm-response-cost
# Variables that would make the proxy reach for a database or a Redis it must not use here.
SCRUBBED_ENV = (
    "DATABASE_URL",
    "DIRECT_URL",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "LITELLM_MASTER_KEY",
    "ROUTER_KEYS",
)


@dataclass(frozen=True)
class Proxy:
    url: str  # the proxy's OpenAI-compatible /v1 base URL
    sim_url: str  # the simulated Router's /v1 base URL
    log: Path

    def sim_stats(self) -> dict[str, Any]:
        base = self.sim_url.removesuffix("/v1")
        request = urllib.request.Request(
            f"{base}/sim/stats", headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            stats: dict[str, Any] = json.load(resp)
        return stats


def _spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, start_new_session=True, preexec_fn=die_with_parent, **kwargs)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, SIGKILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start_sim(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("wb") as err:
        proc = _spawn(
            [sys.executable, "-m", "ops.simrouter", "--port", "0"],
            env={**os.environ, "SIMROUTER_API_KEY": UPSTREAM_KEY},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().decode() if ready else ""
    if "simulated Router listening on" not in line:
        _stop(proc)
        raise RuntimeError(f"simulated Router did not start: {line!r}\n{_tail(log)}")
    return proc, line.rsplit(" ", 1)[1].strip()


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < START_TIMEOUT_S:
        if proc.poll() is not None:
            raise RuntimeError(f"LiteLLM proxy exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{base}/health/liveliness", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"LiteLLM proxy not ready after {START_TIMEOUT_S:g} s:\n{_tail(log)}")


@pytest.fixture(scope="session")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    if not LITELLM.exists():
        pytest.skip("LiteLLM proxy not installed: run ops/router/install.sh")
    logs = tmp_path_factory.mktemp("litellm")
    sim, sim_url = _start_sim(logs / "simrouter.log")
    litellm: subprocess.Popen[bytes] | None = None
    try:
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        env.update(
            LITELLM_LOCAL_MODEL_COST_MAP="True",  # else it downloads a price map
            SIMROUTER_URL=sim_url,
            SIMROUTER_API_KEY=UPSTREAM_KEY,
            HANZO_API_KEY=PROXY_KEY,
            ROUTER_KEYS=PROXY_KEY,
        )
        log = logs / "litellm.log"
        with log.open("wb") as out:
            litellm = _spawn(
                [str(LITELLM), "--config", str(CONFIG), "--host", "127.0.0.1", "--port", str(port)],
                cwd=CONFIG.parent,  # custom_auth.py sits beside the config
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        took = _wait_ready(litellm, base, log)
        print(f"LiteLLM proxy ready in {took:.1f} s at {base} (log: {log})")
        yield Proxy(url=f"{base}/v1", sim_url=sim_url, log=log)
    finally:
        if litellm is not None:
            _stop(litellm)
        _stop(sim)


@pytest.fixture
def settings(redis_url: str, proxy: Proxy, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=redis_url,
        router_url=proxy.url,
        api_key=PROXY_KEY,  # type: ignore[arg-type]
        data_dir=str(tmp_path / ".agentq"),
        concurrency=20,
        poll_delay_s=0.01,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        call_timeout_s=30,
        max_attempts_per_model=2,
        log_format="json",
    )


@pytest.fixture
async def producer(settings: Settings, redis: Redis) -> AsyncIterator[Producer]:
    async with Producer.from_env(settings) as p:
        yield p


def job(custom_id: str, text: str, **kw: Any) -> AgentJob:
    return AgentJob.model_validate({"custom_id": custom_id, "input": text, **kw})


async def run(producer: Producer, settings: Settings, *jobs: AgentJob) -> dict[str, ResultRecord]:
    batch = await producer.submit(list(jobs))
    await run_batch(producer, settings, batch.id)
    return await records(producer, batch.id)


async def one(producer: Producer, settings: Settings, j: AgentJob) -> ResultRecord:
    return (await run(producer, settings, j))[j.custom_id]


async def test_wrong_key_is_auth_failed(producer: Producer, settings: Settings) -> None:
    """custom_auth answers 401 `auth_error`: permanent, one attempt, no fallback."""
    bad = settings.model_copy(update={"api_key": type(settings.api_key)("sk-wrong-key-123")})
    r = await one(producer, bad, job("k", "What is 2 + 2?", model="gpt-4o", fallbacks=["gpt-4"]))
    assert r.status == Status.FAILED and r.error is not None
    assert r.error.type == "auth_failed" and not r.error.retryable
    assert "401 from Router" in r.error.message and "HANZO_API_KEY" in r.error.message
    assert [(a.model, a.ok, a.error) for a in r.attempts] == [("gpt-4o", False, "auth_failed")]
    assert "sk-wrong-key-123" not in r.model_dump_json()


async def test_unknown_model_is_model_not_found(producer: Producer, settings: Settings) -> None:
    """The proxy answers 400 `Invalid model name passed in model=gpt-5`: permanent."""
    r = await one(
        producer, settings, job("m", "What is 2 + 2?", model="gpt-5", fallbacks=["gpt-4o"])
    )
    assert r.status == Status.FAILED and r.error is not None
    assert r.error.type == "model_not_found" and not r.error.retryable
    assert "model 'gpt-5' not found — see `agentq models`" in r.error.message
    assert [(a.model, a.ok, a.error) for a in r.attempts] == [("gpt-5", False, "model_not_found")]


async def test_rpm_limit_is_rate_limited(
    producer: Producer, settings: Settings, proxy: Proxy
) -> None:
    """`limited` allows 1 request a minute: the proxy answers the rest with 429, which agentq
    retries (max_attempts_per_model=2) and then reports as rate_limited. Concurrent requests
    get the 429 "all max_parallel_requests slots in use" (no retry hint: agentq backs off);
    later ones "Model rate limit exceeded" with `llm_provider-retry-after: 60`."""
    out = await run(
        producer, settings, *(job(f"r{i}", f"What is {i} + 1?", model="limited") for i in range(4))
    )
    attempts = [a for r in out.values() for a in r.attempts]
    assert any(a.error == "rate_limited" for a in attempts), attempts
    failed = [r for r in out.values() if r.status == Status.FAILED]
    assert failed, "an rpm of 1 cannot serve 4 jobs"
    for r in failed:
        assert r.error is not None and r.error.type == "rate_limited" and r.error.retryable
        assert "429 from Router for limited" in r.error.message
        assert [a.model for a in r.attempts] == ["limited"] * settings.max_attempts_per_model
    for r in out.values():
        if r.status == Status.SUCCEEDED:
            assert r.output == str(int(r.custom_id[1:]) + 1)

    # The raw error, straight from the proxy: its retry hint must be parsed.
    async with openai.AsyncOpenAI(base_url=proxy.url, api_key=PROXY_KEY, max_retries=0) as client:
        exc: openai.RateLimitError | None = None
        for _ in range(3):  # the minute window may roll over once
            try:
                await client.chat.completions.create(
                    model="limited", messages=[{"role": "user", "content": "What is 1 + 1?"}]
                )
            except openai.RateLimitError as e:
                exc = e
                break
    assert exc is not None, "no 429 from the proxy for an rpm-limited deployment"
    failure = classify(exc, router_url=proxy.url, model="limited")
    assert failure.error.type == "rate_limited" and failure.error.retryable
    assert failure.retry_after_s is not None, dict(exc.response.headers)
    assert 0 < failure.retry_after_s <= 60


async def test_proxy_fallback_succeeds(
    producer: Producer, settings: Settings, proxy: Proxy
) -> None:
    """`flaky-primary` is the simulator's sim-500; the proxy falls back to gpt-4o-mini itself,
    so agentq sees one successful attempt."""
    before = proxy.sim_stats()["by_model"]
    r = await one(producer, settings, job("f", "What is 2 + 2?", model="flaky-primary"))
    assert r.status == Status.SUCCEEDED, r.error
    assert r.output == "4" and r.model == "flaky-primary"
    assert [(a.model, a.ok) for a in r.attempts] == [("flaky-primary", True)]
    after = proxy.sim_stats()["by_model"]
    assert after.get("sim-500", 0) > before.get("sim-500", 0)  # the primary was really tried
    assert after.get("gpt-4o-mini", 0) > before.get("gpt-4o-mini", 0)  # and the fallback used


async def test_tool_job_succeeds_with_cost(producer: Producer, settings: Settings) -> None:
    calc = {"name": "Calc", "instructions": "Use tools.", "tools": ["calculator"]}
    r = await one(producer, settings, job("c", "What is 15 * 23?", agent=calc, model="gpt-4o"))
    assert r.status == Status.SUCCEEDED, r.error
    assert r.output == "The result of 15 * 23 is 345."
    assert r.model == "gpt-4o" and r.usage.requests == 2 and r.usage.total_tokens > 0
    assert [(a.model, a.ok) for a in r.attempts] == [("gpt-4o", True)]
    # The proxy sends x-litellm-response-cost. When the upstream itself sends that header (as
    # the simulator does, like a chained LiteLLM), LiteLLM bills the upstream's figure rather
    # than its own price map: here the simulator's 0.002 USD per 1k tokens, summed over both
    # calls by agentq.
    assert r.cost_usd == pytest.approx(r.usage.total_tokens / 1000 * SIM_PRICE_PER_1K)
