"""Running one agent job: claim it, run the agent with retries and fallbacks, store one record."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import openai
import structlog
from agents import ModelSettings, RunConfig, Runner
from arq import Retry
from redis.exceptions import RedisError

from producer.models import AgentJob, Attempt, JobError, ResultRecord, Status, Usage
from producer.settings import Settings
from producer.store import Store, now_iso

from . import metrics
from .agents_build import Plan, plan
from .errors import Failure, classify
from .logs import job_context
from .mcp import McpPool
from .provider import CallMeter, RouterProvider, current_meter
from .tools import Registry

log = structlog.get_logger("agentq.runner")


@dataclass
class Running:
    batch_id: str
    task: asyncio.Task[Outcome]
    cancelled_by_user: bool = False


@dataclass
class Runtime:
    """What every job on this worker shares; built once in on_startup, kept in arq's ctx."""

    settings: Settings
    store: Store
    provider: RouterProvider
    registry: Registry
    worker_id: str
    mcp: McpPool = field(default_factory=McpPool)
    running: dict[str, Running] = field(default_factory=dict)
    _run_configs: dict[tuple[str, str], RunConfig] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        return len(self.running)

    @property
    def tracing(self) -> bool:
        return self.settings.trace_events or bool(self.settings.otlp_endpoint)

    def run_config(self, model: str, model_settings: ModelSettings) -> RunConfig:
        """RunConfigs are costly to build (type-hint checks); jobs with the same model and
        settings share one."""
        key = (model, repr(model_settings))
        config = self._run_configs.get(key)
        if config is None:
            if len(self._run_configs) > 1024:
                self._run_configs.clear()
            config = self._run_configs[key] = RunConfig(
                model=model,
                model_provider=self.provider,
                model_settings=model_settings,
                tracing_disabled=not self.tracing,
                workflow_name="agentq",
            )
        return config

    def cancel_batch(self, batch_id: str) -> int:
        """Stop this worker's running jobs of a cancelled batch."""
        n = 0
        for run in self.running.values():
            if run.batch_id == batch_id and not run.task.done():
                run.cancelled_by_user = True
                run.task.cancel()
                n += 1
        return n


@dataclass
class Outcome:
    status: Status
    output: str | None = None
    output_json: Any = None
    model: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    error: JobError | None = None


REDIS_RETRY_S = 5
"""When Redis fails a job's bookkeeping past the client's retries, arq runs it again this
much later (the job stays queued or leased meanwhile, so nothing is lost)."""


async def run_agent_job(
    ctx: dict[str, Any], *args: str, invalid_payload: str | None = None
) -> None:
    """The arq function: one job in, one stored record out. Agent and Router errors end in
    the record; only Redis trouble reaches arq, as a Retry, so arq keeps the job."""
    try:
        await _run_agent_job(ctx, *args, invalid_payload=invalid_payload)
    except RedisError as exc:
        log.warning(
            "job.redis_error", job_id=ctx.get("job_id"), error=str(exc), retry_in_s=REDIS_RETRY_S
        )
        raise Retry(defer=REDIS_RETRY_S) from exc


async def _run_agent_job(
    ctx: dict[str, Any], *args: str, invalid_payload: str | None = None
) -> None:
    rt: Runtime = ctx["agentq"]
    if invalid_payload is not None:
        await _fail_invalid_payload(rt, ctx["job_id"], invalid_payload)
        return
    job_id, batch_id = args
    claim = await rt.store.claim(job_id, batch_id, rt.worker_id)
    if claim.job is None:
        log.info("job.skipped", job_id=job_id, batch_id=batch_id, state=claim.state)
        return
    job = claim.job
    meter = CallMeter()
    meter_token = current_meter.set(meter)
    try:
        with job_context(
            job_id=job_id, batch_id=batch_id, custom_id=job.custom_id, run=claim.runs
        ) as events:
            started_at, start = now_iso(), time.perf_counter()
            if claim.state == "exhausted":
                outcome = _exhausted(claim.runs)
            else:
                log.info("job.started", input=job.input_text()[:2000])
                ran = await _run_tracked(rt, job_id, batch_id, job)
                if ran is None:  # cancelled by `agentq cancel`: already recorded
                    log.info("job.cancelled")
                    return
                outcome = ran
            seconds = time.perf_counter() - start
            error_type = outcome.error.type if outcome.error else None
            log.info(
                "job.finished",
                status=outcome.status.value,
                model=outcome.model,
                duration_ms=round(seconds * 1000),
                turns=outcome.usage.requests,
                input_tokens=outcome.usage.input_tokens,
                output_tokens=outcome.usage.output_tokens,
                total_tokens=outcome.usage.total_tokens,
                cost_usd=round(meter.cost_usd, 8),
                error_type=error_type,
            )
            metrics.JOBS.labels(outcome.status.value, error_type or "").inc()
            metrics.JOB_SECONDS.observe(seconds)
            if meter.cost_usd:
                metrics.COST.labels(outcome.model or "unknown").inc(meter.cost_usd)
            record = ResultRecord(
                custom_id=job.custom_id,
                job_id=job_id,
                batch_id=batch_id,
                status=outcome.status,
                output=outcome.output,
                output_json=outcome.output_json,
                model=outcome.model,
                attempts=outcome.attempts,
                usage=outcome.usage,
                cost_usd=round(meter.cost_usd, 8),
                enqueued_at=claim.enqueued_at,
                started_at=started_at,
                finished_at=now_iso(),
                worker=rt.worker_id,
                error=outcome.error,
                logs=list(events),
            )
        # The final write must happen even if the job is being cancelled (as arq's finish_job).
        if not await asyncio.shield(rt.store.finish(record)):
            log.info("job.already_final", job_id=job_id, batch_id=batch_id)
    finally:
        current_meter.reset(meter_token)


async def _run_tracked(rt: Runtime, job_id: str, batch_id: str, job: AgentJob) -> Outcome | None:
    """Run the job as its own task, so `agentq cancel` can stop it without stopping arq's;
    if arq stops us (worker shutdown), give the job back to the queue."""
    meter = current_meter.get()
    task = asyncio.create_task(execute(rt, job, meter.attempts if meter else []))
    run = rt.running[job_id] = Running(batch_id, task)
    metrics.IN_FLIGHT.set(len(rt.running))
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if run.cancelled_by_user and not (current and current.cancelling()):
            return None
        await asyncio.shield(rt.store.release(job_id, batch_id))
        log.info("job.released", reason="worker shutting down")
        raise
    finally:
        rt.running.pop(job_id, None)
        metrics.IN_FLIGHT.set(len(rt.running))


def _exhausted(runs: int) -> Outcome:
    return Outcome(
        status=Status.FAILED,
        error=JobError(
            type="invalid_job",
            message=f"the job was started {runs} times and its worker stopped each time "
            "(killed, or out of memory?) — check the workers' logs; raise AGENTQ_MAX_RUNS to "
            "allow more",
            retryable=False,
        ),
    )


async def _fail_invalid_payload(rt: Runtime, job_id: str, reason: str) -> None:
    """Something other than agentq wrote this queue entry: fail our job of that id, if any."""
    log.warning("job.invalid_payload", job_id=job_id, reason=reason)
    batch_id, custom_id = await rt.store.job_owner(job_id)
    if batch_id is None:
        return
    await rt.store.finish(
        ResultRecord(
            custom_id=custom_id or "",
            job_id=job_id,
            batch_id=batch_id,
            status=Status.FAILED,
            finished_at=now_iso(),
            worker=rt.worker_id,
            error=JobError(type="invalid_job", message=reason + " — resubmit the job"),
        )
    )


async def execute(rt: Runtime, job: AgentJob, attempts: list[Attempt]) -> Outcome:
    """Run the job on its model, then on its fallbacks in order. Each model call is retried
    by the provider's policy; a model whose tries are spent hands over to the next one."""
    out = Outcome(status=Status.FAILED, attempts=attempts)
    try:
        p = plan(job, rt.registry, rt.settings, mcp_names=rt.mcp.names())
        if p.mcp_servers:
            servers = await rt.mcp.servers(p.mcp_servers)
            p = dataclasses.replace(p, agent=p.agent.clone(mcp_servers=servers))
    except Exception as exc:
        out.error = classify(exc, router_url=rt.provider.base_url, model=job.model or "?").error
        return out
    failures: list[tuple[str, Failure]] = []
    try:
        async with asyncio.timeout(p.timeout_s):
            for model in p.models:
                failure = await _try_model(rt, job, p, model, out)
                if failure is None:
                    return out
                failures.append((model, failure))
                if not failure.error.retryable:
                    break
    except TimeoutError:
        out.error = JobError(
            type="timeout",
            message=f"job ran out of its {p.timeout_s:g} s timeout — raise timeout_s in the job "
            "or AGENTQ_JOB_TIMEOUT_S",
            retryable=True,
        )
        return out
    out.error = _summarize(failures)
    return out


async def _try_model(
    rt: Runtime, job: AgentJob, p: Plan, model: str, out: Outcome
) -> Failure | None:
    """One run of the agent on one model; None on success."""
    route, _ = rt.provider.route(model)
    start = time.perf_counter()
    try:
        result = await Runner.run(
            p.agent,
            _sdk_input(job),
            max_turns=p.max_turns,
            run_config=rt.run_config(model, p.model_settings),
        )
    except Exception as exc:
        failure = classify(exc, router_url=route.url, model=model)
        if not isinstance(exc, openai.APIError):  # model-call failures are recorded per call
            ms = round((time.perf_counter() - start) * 1000)
            out.attempts.append(
                Attempt(model=model, ok=False, ms=ms, router=route.name, error=failure.error.type)
            )
        log.warning(
            "attempt.failed",
            model=model,
            error_type=failure.error.type,
            error=failure.error.message,
        )
        return failure
    ms = round((time.perf_counter() - start) * 1000)
    out.attempts.append(Attempt(model=model, ok=True, ms=ms, router=route.name))
    u = result.context_wrapper.usage
    out.usage = Usage(
        requests=u.requests,
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        total_tokens=u.total_tokens,
    )
    out.status, out.model, out.error = Status.SUCCEEDED, model, None
    final = result.final_output
    if isinstance(final, str):
        out.output = final
    else:
        out.output_json = final
        out.output = json.dumps(final)
    return None


def _sdk_input(job: AgentJob) -> Any:
    """The job's input as the SDK takes it: a string, or chat messages as input items."""
    if isinstance(job.input, str):
        return job.input
    return [m.model_dump(exclude_none=True) for m in job.input]


def _summarize(failures: list[tuple[str, Failure]]) -> JobError:
    """One error for the job: the last cause, or every model's cause when fallbacks all failed."""
    last = failures[-1][1]
    if len(failures) == 1:
        err = last.error
        if err.type == "rate_limited":
            return err.model_copy(update={"message": f"{err.message} (gave up after retries)"})
        return err
    causes = "; ".join(f"{m}: {f.error.message}" for m, f in failures)
    return JobError(
        type=last.error.type,
        message=f"all {len(failures)} models failed — {causes}",
        retryable=last.error.retryable,
    )
