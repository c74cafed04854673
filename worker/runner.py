"""Running one agent job: claim it, run the agent with retries and fallbacks, store one record."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any

import openai
import structlog
from agents import ModelSettings, RunConfig, Runner
from arq import Retry
from cachetools import LRUCache
from redis.exceptions import RedisError

from producer.models import AgentJob, Attempt, JobError, ResultRecord, Status
from producer.settings import Settings
from producer.store import Claim, Store, now_iso

from . import metrics
from .agents_build import Plan, plan
from .baton import Baton, Hold, current_hold
from .errors import Failure, classify
from .livelogs import LiveLogs
from .logs import end_live, job_context, json_safe
from .mcp import McpPool
from .provider import CallMeter, RouterProvider, current_meter
from .tools import Registry

log = structlog.get_logger("agentq.runner")

RUN_CONFIG_CACHE_BYTES = 8 << 20
_RUN_CONFIG_BYTES = 4096
"""What one cached RunConfig costs besides its key."""


@dataclass
class Running:
    batch_id: str
    token: str
    task: asyncio.Task[Outcome]
    stop: str | None = None
    """Why this worker stopped the run: "cancelled" (`agentq cancel`: record it) or "lost"
    (its lease went to another run, or the job is final: write nothing)."""


@dataclass
class Runtime:
    """What every job on this worker shares; built once in on_startup, kept in arq's ctx."""

    settings: Settings
    store: Store
    provider: RouterProvider
    registry: Registry
    worker_id: str
    mcp: McpPool = field(default_factory=McpPool)
    live: LiveLogs | None = None
    """Publishes job log events as they happen (`agentq logs --follow`)."""
    baton: Baton | None = None
    """Turns at the CPU between model calls (AGENTQ_CPU_TURNS; None: off)."""
    running: dict[str, Running] = field(default_factory=dict)
    _run_configs: LRUCache[tuple[str, str], tuple[RunConfig, int]] = field(
        default_factory=lambda: LRUCache(
            maxsize=RUN_CONFIG_CACHE_BYTES, getsizeof=lambda entry: entry[1]
        )
    )

    @property
    def in_flight(self) -> int:
        return len(self.running)

    @property
    def tracing(self) -> bool:
        return self.settings.trace_events or bool(self.settings.otlp_endpoint)

    def run_config(self, model: str, model_settings: ModelSettings) -> RunConfig:
        """RunConfigs are costly to build (type-hint checks); jobs with the same model and
        settings share one. Bounded by the size of their keys (jobs choose both)."""
        key = (model, repr(model_settings))
        entry = self._run_configs.get(key)
        if entry is None:
            config = RunConfig(
                model=model,
                model_provider=self.provider,
                model_settings=model_settings,
                tracing_disabled=not self.tracing,
                workflow_name="agentq",
            )
            size = len(key[0]) + len(key[1]) + _RUN_CONFIG_BYTES
            entry = self._run_configs[key] = (config, size)
        return entry[0]

    def cancel_batch(self, batch_id: str) -> int:
        """Stop this worker's running jobs of a cancelled batch."""
        ids = [jid for jid, run in self.running.items() if run.batch_id == batch_id]
        return sum(self.stop(jid, "cancelled") for jid in ids)

    def stop(self, job_id: str, why: str, token: str | None = None) -> bool:
        """Stop one running job (of that run, when a token is given)."""
        run = self.running.get(job_id)
        if run is None or run.task.done() or (token is not None and run.token != token):
            return False
        run.stop = run.stop or why
        run.task.cancel()
        return True

    def runs(self) -> list[tuple[str, str]]:
        """(job id, token) of every run in flight here, for lease renewal."""
        return [(jid, run.token) for jid, run in self.running.items()]


@dataclass
class Outcome:
    status: Status
    output: str | None = None
    output_json: Any = None
    model: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    error: JobError | None = None


REDIS_RETRY_S = 5
"""When Redis fails a claim past the client's retries, arq runs the job again this much later
(nothing was taken: the queue entry stays)."""

RELEASE_WAIT_S = 2.0
"""A shutting-down worker gives a run's job back within this, or leaves it to its lease."""

FINISH_TRIES = 5
"""Stores of a final record tried (each with the client's own retries, about a minute) before
the run is given up; its lease then lapses and the job runs again."""


async def run_agent_job(
    ctx: dict[str, Any], *args: str, invalid_payload: str | None = None
) -> None:
    """The arq function: one job in, one stored record out. Every run that claims the job ends
    in a finish or a release carrying its fencing token, whatever is raised; only a Redis error
    before the claim reaches arq, as a Retry, so arq keeps the queue entry."""
    rt: Runtime = ctx["agentq"]
    if invalid_payload is not None:
        await _fail_invalid_payload(rt, ctx["job_id"], invalid_payload)
        return
    job_id, batch_id = args[0], args[1]
    q = args[2] if len(args) > 2 else "0"
    try:
        claim = await rt.store.claim(job_id, batch_id, rt.worker_id, q)
    except RedisError as exc:
        log.warning("job.redis_error", job_id=job_id, error=str(exc), retry_in_s=REDIS_RETRY_S)
        raise Retry(defer=REDIS_RETRY_S) from exc
    if claim.holds:  # the claim removed every key of this arq id: arq's clean-up is skipped
        claimed: set[str] | None = getattr(ctx.get("agentq_worker"), "claimed", None)
        if claimed is not None:
            claimed.add(ctx["job_id"])
    if not claim.holds:
        log.info("job.skipped", job_id=job_id, batch_id=batch_id, state=claim.state)
        return
    # a job with a tenant: the run is of whichever of the tenant's jobs had the turn
    job_id, batch_id = claim.job_id or job_id, claim.batch_id or batch_id
    meter = CallMeter(job_id=job_id)
    meter_token = current_meter.set(meter)
    hold = Hold(rt.baton) if rt.baton is not None else None
    hold_token = current_hold.set(hold)  # the run takes its first turn in execute()
    try:
        live = (
            functools.partial(rt.live.add, batch_id, job_id, claim.custom_id) if rt.live else None
        )
        with job_context(
            live=live,
            job_id=job_id,
            batch_id=batch_id,
            custom_id=claim.custom_id,
            run=claim.runs,
            fence=claim.token,
        ) as events:
            record = await _run_claimed(rt, job_id, batch_id, claim, meter, events)
            end_live()  # live followers get exactly the events the record keeps
            if hold is not None:
                hold.give()  # the store waits on Redis
            if record is not None:
                free_slot = ctx.get("agentq_free_slot")
                if free_slot is not None:  # the next job need not wait for this store
                    free_slot()
                await _store_final(rt, record, claim.token)
    finally:
        if hold is not None:
            hold.give()
        current_hold.reset(hold_token)
        current_meter.reset(meter_token)


async def _run_claimed(
    rt: Runtime,
    job_id: str,
    batch_id: str,
    claim: Claim,
    meter: CallMeter,
    events: list[dict[str, Any]],
) -> ResultRecord | None:
    """The run itself; returns the record to store, or None when another run owns the job.
    A worker shutdown releases the job (and re-raises)."""
    started_at, start = now_iso(), time.perf_counter()
    log.info("job.started", input=claim.job.input_text()[:2000] if claim.job else None)
    try:
        if claim.state == "exhausted":
            outcome = _exhausted(claim.runs - 1)
        elif claim.job is None:
            outcome = Outcome(
                status=Status.FAILED,
                error=JobError(
                    type="invalid_job",
                    message=f"this worker cannot read the stored job ({claim.spec_error}) — "
                    "fix the job and submit it again; if a newer agentq submitted it, upgrade "
                    "the workers, then `agentq retry BATCH`",
                ),
            )
        else:
            ran = await _run_tracked(rt, job_id, batch_id, claim, meter)
            if ran is None:
                log.info("job.lost", reason="another run holds the job, or it is final")
                return None
            outcome = ran
            if outcome.status == Status.CANCELLED:
                log.info("job.cancelled")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug or a plugin's: the job ends failed, never half-run
        log.exception("job.internal_error", error=repr(exc))
        outcome = Outcome(
            status=Status.FAILED,
            attempts=meter.attempts,
            error=JobError(
                type="internal_error",
                message=f"the worker failed running this job ({type(exc).__name__}: {exc}) — "
                "see the worker's log; `agentq retry BATCH` runs it again",
                retryable=True,
            ),
        )
    seconds = time.perf_counter() - start
    error_type = outcome.error.type if outcome.error else None
    log.info(
        "job.finished",
        status=outcome.status.value,
        model=outcome.model,
        duration_ms=round(seconds * 1000),
        turns=meter.usage.requests,
        input_tokens=meter.usage.input_tokens,
        output_tokens=meter.usage.output_tokens,
        total_tokens=meter.usage.total_tokens,
        cost_usd=round(meter.cost_usd, 8),
        error_type=error_type,
    )
    metrics.JOBS.labels(outcome.status.value, error_type or "").inc()
    metrics.JOB_SECONDS.observe(seconds)
    if meter.cost_usd:
        metrics.COST.labels(metrics.model_label(outcome.model or "unknown")).inc(meter.cost_usd)
    return ResultRecord(
        custom_id=claim.custom_id,
        job_id=job_id,
        batch_id=batch_id,
        status=outcome.status,
        output=outcome.output,
        output_json=outcome.output_json,
        model=outcome.model,
        attempts=outcome.attempts,
        usage=meter.usage.model_copy(),
        cost_usd=round(meter.cost_usd, 8),
        enqueued_at=claim.enqueued_at,
        started_at=started_at,
        finished_at=now_iso(),
        worker=rt.worker_id,
        error=outcome.error,
        logs=json_safe(list(events)),
    )


async def _store_final(rt: Runtime, record: ResultRecord, token: str) -> None:
    """Store the record with the run's token, through Redis outages (the run is no longer
    renewed, but the reap credits every lease with an outage's length; a store that comes too
    late is refused by the token, and the job's newer run stores its own record). The write
    happens even while the job's task is being cancelled."""
    for attempt in range(1, FINISH_TRIES + 1):
        try:
            stored = await asyncio.shield(rt.store.finish(record, token))
        except RedisError as exc:
            log.warning("job.store_failed", job_id=record.job_id, attempt=attempt, error=str(exc))
            await asyncio.sleep(min(30, 2**attempt))
            continue
        if stored == 1:
            log.info("job.stored", status=record.status.value)
        elif record.status != Status.CANCELLED:
            log.info(
                "job.not_stored",
                job_id=record.job_id,
                batch_id=record.batch_id,
                reason="already final" if stored == 0 else "another run holds the job",
            )
        return
    log.error("job.record_lost", job_id=record.job_id, batch_id=record.batch_id)


async def _run_tracked(
    rt: Runtime, job_id: str, batch_id: str, claim: Claim, meter: CallMeter
) -> Outcome | None:
    """Run the job as its own task, so `agentq cancel` or a lost lease can stop it without
    stopping arq's; if arq stops us (worker shutdown), give the job back to the queue."""
    assert claim.job is not None
    task = asyncio.create_task(execute(rt, claim.job, meter.attempts))
    earlier = rt.running.get(job_id)
    if earlier is not None:  # a stale run of the same job here: the new claim supersedes it
        rt.stop(job_id, "lost", earlier.token)
    run = rt.running[job_id] = Running(batch_id, claim.token, task)
    metrics.IN_FLIGHT.set(len(rt.running))
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        shutting_down = bool(current and current.cancelling())
        if run.stop and not shutting_down:
            if run.stop == "lost":
                return None
            return Outcome(
                status=Status.CANCELLED,
                attempts=meter.attempts,
                error=JobError(type="cancelled", message="cancelled by `agentq cancel`"),
            )
        if not shutting_down:  # nobody stopped it: code inside the run raised CancelledError
            raise RuntimeError("the run raised CancelledError that no one asked for") from None
        hold = current_hold.get()
        if hold is not None:
            hold.give()  # the release waits on Redis
        try:
            async with asyncio.timeout(RELEASE_WAIT_S):
                await asyncio.shield(rt.store.release(job_id, claim.token))
            log.info("job.released", reason="worker shutting down")
        except (RedisError, TimeoutError) as exc:
            log.warning("job.release_failed", error=str(exc), then="its lease lapses")
        raise
    finally:
        if rt.running.get(job_id) is run:
            del rt.running[job_id]
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


async def _fail_invalid_payload(rt: Runtime, arq_id: str, reason: str) -> None:
    """Something other than agentq wrote this queue entry: fail our job of that id, if any."""
    job_id = arq_id.partition(".")[0]
    log.warning("job.invalid_payload", job_id=job_id, reason=reason)
    batch_id, custom_id = await rt.store.job_owner(job_id)
    if batch_id is None:
        return
    record = ResultRecord(
        custom_id=custom_id or "",
        job_id=job_id,
        batch_id=batch_id,
        status=Status.FAILED,
        finished_at=now_iso(),
        worker=rt.worker_id,
        error=JobError(type="invalid_job", message=reason + " — resubmit the job"),
    )
    await rt.store.finish(record, "")


async def execute(rt: Runtime, job: AgentJob, attempts: list[Attempt]) -> Outcome:
    """Run the job on its model, then on its fallbacks in order. Each model call is retried
    by the provider's policy; a model whose tries are spent hands over to the next one."""
    out = Outcome(status=Status.FAILED, attempts=attempts)
    try:
        p = plan(job, rt.registry, rt.settings, mcp_names=rt.mcp.names())
        if p.mcp_servers:
            servers = await rt.mcp.servers(p.mcp_servers)
            p = dataclasses.replace(p, agent=p.agent.clone(mcp_servers=servers))
        else:
            # Each run on an Agent object of its own (a shallow copy of the cached one): the
            # SDK checks every run sharing an Agent at each run's start and end, so C runs
            # of one shared agent cost O(C) each (about 1 ms a run at C = 500).
            p = dataclasses.replace(p, agent=copy.copy(p.agent))
    except Exception as exc:
        out.error = classify(exc, router_url=rt.provider.base_url, model=job.model or "?").error
        return out
    hold = current_hold.get()
    failures: list[tuple[str, Failure]] = []
    meter = current_meter.get()
    try:
        async with asyncio.timeout(p.timeout_s) as deadline:
            if hold is not None:  # (in the run's task: a shutdown that cancels it releases it)
                await hold.take()
            for i, model in enumerate(p.models):
                if meter is not None:
                    meter.deadline = deadline
                    meter.can_fall_back = i < len(p.models) - 1
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
