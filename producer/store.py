"""Job and batch state in Redis. Every state change is one Lua script: one round trip that checks
the expected status, writes the record, moves the batch counters and publishes the change, so
counts always add up and a re-run after a crash cannot count twice or overwrite a final result."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from arq.jobs import serialize_job
from redis.asyncio import Redis

from . import keys
from .models import AgentJob, BatchStatus, JobError, ResultRecord, Status, Usage, job_id_for
from .serde import json_dumps

RUN_FUNCTION = "run_agent_job"
"""The arq function name workers register; the arq payload carries only the job id."""

ARQ_EXPIRES_MS = 7 * 86_400_000
"""arq drops a queued job not started within this time; agentq batches may wait long."""

_TERMINAL_LUA = "st == 'succeeded' or st == 'failed' or st == 'cancelled'"

_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued', 'custom_id', ARGV[2], 'batch_id', ARGV[3],
           'spec', ARGV[4], 'enqueued_at', ARGV[5], 'runs', 0)
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('RPUSH', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[2], 'total', 1)
redis.call('HINCRBY', KEYS[2], 'queued', 1)
redis.call('PSETEX', KEYS[4], ARGV[8], ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[7], ARGV[1])
return 1
"""

_CLAIM = f"""
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {{'missing'}} end
if {_TERMINAL_LUA} then return {{st}} end
if st == 'queued' then
  redis.call('HINCRBY', KEYS[2], 'queued', -1)
  redis.call('HINCRBY', KEYS[2], 'running', 1)
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2], 'worker', ARGV[1])
local runs = redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('PUBLISH', KEYS[3], ARGV[3] .. ' running')
local f = redis.call('HMGET', KEYS[1], 'spec', 'enqueued_at')
return {{'running', f[1], f[2], tostring(runs)}}
"""

_FINISH = f"""
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 0 end
if {_TERMINAL_LUA} then return 0 end
redis.call('HINCRBY', KEYS[2], st, -1)
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('HINCRBY', KEYS[2], 'requests', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'input_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[2], 'output_tokens', ARGV[5])
redis.call('HINCRBY', KEYS[2], 'total_tokens', ARGV[6])
redis.call('HINCRBYFLOAT', KEYS[2], 'cost_usd', ARGV[7])
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[8])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[9])
if st == 'queued' then
  redis.call('ZREM', KEYS[4], ARGV[10])
  redis.call('DEL', KEYS[5])
end
redis.call('PUBLISH', KEYS[3], ARGV[10] .. ' ' .. ARGV[1])
return 1
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _s(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def _i(v: Any) -> int:
    return int(float(_s(v) or 0))


@dataclass(frozen=True)
class Claim:
    """What a worker gets when it starts a job: the job, or why it must not run."""

    state: str  # "running", "missing", or the terminal status the job already has
    job: AgentJob | None = None
    enqueued_at: str | None = None
    runs: int = 0


class Store:
    """Job records, batch counters and their change notifications, on one Redis connection pool."""

    def __init__(self, redis: Redis, *, queue: str, result_ttl_s: int) -> None:
        # redis-py 5 types async replies as `Awaitable[T] | T`; Any keeps call sites honest.
        self.redis: Any = redis
        self.queue = queue
        self.ttl = result_ttl_s
        self._submit = redis.register_script(_SUBMIT)
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(_FINISH)

    # -- producer side -------------------------------------------------------------------

    async def submit_chunk(self, batch_id: str, jobs: Sequence[AgentJob]) -> int:
        """Enqueue jobs in one pipeline; jobs whose (batch, custom_id) exists are skipped.
        Returns how many were new."""
        if not jobs:
            return 0
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        enqueued_at = now_iso()
        bkey, okey = keys.batch(batch_id), keys.batch_order(batch_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(bkey, "created_at", enqueued_at)
            pipe.zadd(keys.BATCHES, {batch_id: now_ms}, nx=True)
            for job in jobs:
                jid = job_id_for(batch_id, job.custom_id)
                payload = serialize_job(
                    RUN_FUNCTION, (jid, batch_id), {}, None, now_ms, serializer=json_dumps
                )
                await self._submit(
                    keys=[keys.job(jid), bkey, okey, keys.ARQ_JOB_PREFIX + jid, self.queue],
                    args=[
                        jid,
                        job.custom_id,
                        batch_id,
                        job.model_dump_json(exclude_defaults=True),
                        enqueued_at,
                        payload,
                        now_ms,
                        ARQ_EXPIRES_MS,
                        self.ttl,
                    ],
                    client=pipe,
                )
            pipe.expire(bkey, self.ttl)
            pipe.expire(okey, self.ttl)
            replies = await pipe.execute()
        return sum(1 for r in replies[2 : 2 + len(jobs)] if r == 1)

    async def seal(self, batch_id: str) -> None:
        """Mark the batch complete: `wait` may now finish once every job is terminal."""
        bkey = keys.batch(batch_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(bkey, "created_at", now_iso())
            pipe.hset(bkey, "sealed", 1)
            pipe.expire(bkey, self.ttl)
            pipe.publish(keys.batch_events(batch_id), "- sealed")
            await pipe.execute()

    async def batch_status(self, batch_id: str) -> BatchStatus | None:
        raw = await self.redis.hgetall(keys.batch(batch_id))
        if not raw:
            return None
        h = {_s(k): _s(v) for k, v in raw.items()}
        return BatchStatus(
            batch_id=batch_id,
            total=_i(h.get("total")),
            sealed=h.get("sealed") == "1",
            counts={s: _i(h.get(s.value)) for s in Status},
            usage=Usage(
                requests=_i(h.get("requests")),
                input_tokens=_i(h.get("input_tokens")),
                output_tokens=_i(h.get("output_tokens")),
                total_tokens=_i(h.get("total_tokens")),
            ),
            cost_usd=round(float(h.get("cost_usd") or 0), 8),
            created_at=h.get("created_at"),
        )

    async def job_ids(self, batch_id: str, chunk: int = 500) -> AsyncIterator[list[str]]:
        """The batch's job ids in input order, a chunk at a time."""
        okey = keys.batch_order(batch_id)
        start = 0
        while True:
            ids = await self.redis.lrange(okey, start, start + chunk - 1)
            if not ids:
                return
            yield [_s(i) or "" for i in ids]
            start += len(ids)

    async def records(self, batch_id: str, job_ids: Iterable[str]) -> list[ResultRecord]:
        """Result records for job ids; a job not yet terminal gets a record of where it is."""
        ids = list(job_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            for jid in ids:
                pipe.hmget(
                    keys.job(jid),
                    "status",
                    "result",
                    "custom_id",
                    "enqueued_at",
                    "started_at",
                    "worker",
                    "finished_at",
                )
            rows = await pipe.execute()
        out = []
        for jid, row in zip(ids, rows, strict=True):
            status, result, custom_id, enq, started, worker, finished = map(_s, row)
            if result is not None:
                out.append(ResultRecord.model_validate_json(result))
            elif status is not None:
                cancelled = status == Status.CANCELLED
                out.append(
                    ResultRecord(
                        custom_id=custom_id or "",
                        job_id=jid,
                        batch_id=batch_id,
                        status=Status(status),
                        enqueued_at=enq,
                        started_at=started,
                        finished_at=finished,
                        worker=worker,
                        error=JobError(type="cancelled", message="cancelled by `agentq cancel`")
                        if cancelled
                        else None,
                    )
                )
        return out

    async def cancel(self, batch_id: str, job_ids: Iterable[str]) -> int:
        """Cancel every job of `job_ids` that is not terminal yet; returns how many changed."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for jid in job_ids:
                await self._finish_call(pipe, batch_id, jid, Status.CANCELLED, None)
            replies = await pipe.execute()
        return sum(1 for r in replies if r == 1)

    # -- worker side ---------------------------------------------------------------------

    async def claim(self, job_id: str, batch_id: str, worker: str) -> Claim:
        """Mark a job running (queued, or running after a crash) and get its spec."""
        reply = await self._claim(
            keys=[keys.job(job_id), keys.batch(batch_id), keys.batch_events(batch_id)],
            args=[worker, now_iso(), job_id],
        )
        state = _s(reply[0]) or "missing"
        if state != "running":
            return Claim(state)
        job = AgentJob.model_validate_json(reply[1])
        return Claim("running", job=job, enqueued_at=_s(reply[2]), runs=_i(reply[3]))

    async def finish(self, record: ResultRecord) -> bool:
        """Store the final record; False if the job was already terminal (then nothing changes)."""
        return (
            await self._finish_call(None, record.batch_id, record.job_id, record.status, record)
            == 1
        )

    async def _finish_call(
        self, client: Any, batch_id: str, job_id: str, status: Status, record: ResultRecord | None
    ) -> Any:
        """Run the finish script; without a record (cancel) the job keeps no result body."""
        u = record.usage if record else Usage()
        return await self._finish(
            keys=[
                keys.job(job_id),
                keys.batch(batch_id),
                keys.batch_events(batch_id),
                self.queue,
                keys.ARQ_JOB_PREFIX + job_id,
            ],
            args=[
                status.value,
                record.model_dump_json() if record else "",
                u.requests,
                u.input_tokens,
                u.output_tokens,
                u.total_tokens,
                repr(float(record.cost_usd if record else 0.0)),
                (record.finished_at if record else None) or now_iso(),
                self.ttl,
                job_id,
            ],
            client=client,
        )
