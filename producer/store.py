"""Job and batch state in Redis. Every state change is one Lua script: one round trip that checks
the expected status, writes the record, moves the batch counters and publishes the change, so
counts always add up and a re-run after a crash cannot count twice or overwrite a final result."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from arq.jobs import serialize_job
from redis.asyncio import Redis

from . import keys
from .models import (
    AgentJob,
    BatchStatus,
    JobError,
    ModelUsage,
    ResultRecord,
    Status,
    Usage,
    job_id_for,
)
from .serde import json_dumps

RUN_FUNCTION = "run_agent_job"
"""The arq function name workers register; the arq payload carries only the job id."""

ARQ_EXPIRES_MS = 7 * 86_400_000
"""arq drops a queued job not started within this time; agentq batches may wait long."""

_TERMINAL_LUA = "st == 'succeeded' or st == 'failed' or st == 'cancelled'"

_SUBMIT = """
-- One call enqueues a chunk of jobs: ARGV[9..] are (job id, custom_id, spec) triples. The arq
-- payload is built here, in the format arq.jobs.serialize_job writes with a JSON serializer.
local bid, enq, score, expire, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local new = 0
for i = 9, #ARGV, 3 do
  local jid = ARGV[i]
  local jkey = ARGV[6] .. jid
  if redis.call('EXISTS', jkey) == 0 then
    redis.call('HSET', jkey, 'status', 'queued', 'custom_id', ARGV[i + 1], 'batch_id', bid,
               'spec', ARGV[i + 2], 'enqueued_at', enq, 'runs', 0)
    redis.call('EXPIRE', jkey, ttl)
    redis.call('RPUSH', KEYS[2], jid)
    redis.call('PSETEX', ARGV[7] .. jid, expire, '{"t":null,"f":"' .. ARGV[8] .. '","a":["'
               .. jid .. '","' .. bid .. '"],"k":{},"et":' .. score .. '}')
    redis.call('ZADD', KEYS[3], score, jid)
    new = new + 1
  end
end
if new > 0 then
  redis.call('HINCRBY', KEYS[1], 'total', new)
  redis.call('HINCRBY', KEYS[1], 'queued', new)
end
return new
"""

_CLAIM = f"""
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {{'missing'}} end
if {_TERMINAL_LUA} then return {{st}} end
local runs = redis.call('HINCRBY', KEYS[1], 'runs', 1)
local f = redis.call('HMGET', KEYS[1], 'spec', 'enqueued_at')
if tonumber(ARGV[5]) > 0 and runs > tonumber(ARGV[5]) then
  return {{'exhausted', f[1], f[2], tostring(runs - 1)}}
end
if st == 'queued' then
  redis.call('HINCRBY', KEYS[2], 'queued', -1)
  redis.call('HINCRBY', KEYS[2], 'running', 1)
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[2], 'worker', ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[3])
redis.call('PUBLISH', KEYS[3], ARGV[3] .. ' running')
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
if ARGV[11] ~= '' then
  redis.call('HINCRBY', KEYS[2], 'm:' .. ARGV[11] .. ':jobs', 1)
  redis.call('HINCRBY', KEYS[2], 'm:' .. ARGV[11] .. ':input_tokens', ARGV[4])
  redis.call('HINCRBY', KEYS[2], 'm:' .. ARGV[11] .. ':output_tokens', ARGV[5])
  redis.call('HINCRBYFLOAT', KEYS[2], 'm:' .. ARGV[11] .. ':cost_usd', ARGV[7])
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished_at', ARGV[8])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[9])
redis.call('ZREM', KEYS[6], ARGV[10])
if st == 'queued' then
  redis.call('ZREM', KEYS[4], ARGV[10])
  redis.call('DEL', KEYS[5])
end
redis.call('PUBLISH', KEYS[3], ARGV[10] .. ' ' .. ARGV[1])
return 1
"""

_RELEASE = """
redis.call('ZREM', KEYS[5], ARGV[1])
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HINCRBY', KEYS[2], 'running', -1)
redis.call('HINCRBY', KEYS[2], 'queued', 1)
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HINCRBY', KEYS[1], 'runs', -1)
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('PUBLISH', KEYS[3], ARGV[1] .. ' queued')
return 1
"""

_REAP = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('DEL', ARGV[3] .. id)
  redis.call('ZADD', KEYS[2], ARGV[1], id)
end
return #ids
"""

_RETRY = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 0 end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == st then allowed = true end end
if not allowed then return 0 end
redis.call('HINCRBY', KEYS[2], st, -1)
redis.call('HINCRBY', KEYS[2], 'queued', 1)
redis.call('HDEL', KEYS[1], 'result', 'started_at', 'finished_at', 'worker')
redis.call('HSET', KEYS[1], 'status', 'queued', 'runs', 0)
redis.call('HINCRBY', KEYS[1], 'retries', 1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('PSETEX', KEYS[5], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('PUBLISH', KEYS[3], ARGV[1] .. ' queued')
return 1
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _s(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def _i(v: Any) -> int:
    return int(float(_s(v) or 0))


def _per_model(h: dict[str | None, str | None]) -> dict[str, ModelUsage]:
    """Fields "m:<model>:<name>" of the batch hash, grouped by model."""
    grouped: dict[str, dict[str, str | None]] = {}
    for key, value in h.items():
        if key and key.startswith("m:"):
            model, _, name = key[2:].rpartition(":")
            grouped.setdefault(model, {})[name] = value
    return {
        m: ModelUsage(
            jobs=_i(f.get("jobs")),
            input_tokens=_i(f.get("input_tokens")),
            output_tokens=_i(f.get("output_tokens")),
            cost_usd=round(float(f.get("cost_usd") or 0), 8),
        )
        for m, f in sorted(grouped.items())
    }


@dataclass(frozen=True)
class Claim:
    """What a worker gets when it starts a job: the job, or why it must not run."""

    state: str
    """ "running"; "exhausted" (started max_runs times already: its workers kept dying);
    "missing"; or the terminal status the job already has."""
    job: AgentJob | None = None
    enqueued_at: str | None = None
    runs: int = 0


class Store:
    """Job records, batch counters and their change notifications, on one Redis connection pool."""

    def __init__(
        self,
        redis: Redis,
        *,
        queue: str,
        result_ttl_s: int,
        lease_s: float = 30.0,
        max_runs: int = 3,
    ) -> None:
        # redis-py 5 types async replies as `Awaitable[T] | T`; Any keeps call sites honest.
        self.redis: Any = redis
        self.queue = queue
        self.ttl = result_ttl_s
        self.lease_ms = int(lease_s * 1000)
        self.max_runs = max_runs
        self._submit = redis.register_script(_SUBMIT)
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(_FINISH)
        self._release = redis.register_script(_RELEASE)
        self._reap = redis.register_script(_REAP)
        self._retry = redis.register_script(_RETRY)

    # -- producer side -------------------------------------------------------------------

    async def submit_chunk(self, batch_id: str, jobs: Sequence[AgentJob]) -> int:
        """Enqueue jobs in one pipeline; jobs whose (batch, custom_id) exists are skipped.
        Returns how many were new."""
        if not jobs:
            return 0
        ms = now_ms()
        enqueued_at = now_iso()
        bkey, okey = keys.batch(batch_id), keys.batch_order(batch_id)
        args: list[str | int] = [
            batch_id,
            enqueued_at,
            ms,
            ARQ_EXPIRES_MS,
            self.ttl,
            keys.job(""),
            keys.ARQ_JOB_PREFIX,
            RUN_FUNCTION,
        ]
        for job in jobs:
            args += (
                job_id_for(batch_id, job.custom_id),
                job.custom_id,
                job.model_dump_json(exclude_unset=True),
            )
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(bkey, "created_at", enqueued_at)
            pipe.zadd(keys.BATCHES, {batch_id: ms}, nx=True)
            await self._submit(keys=[bkey, okey, self.queue], args=args, client=pipe)
            pipe.expire(bkey, self.ttl)
            pipe.expire(okey, self.ttl)
            replies = await pipe.execute()
        return int(replies[2])

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
            models=_per_model(h),
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

    async def retry(self, batch_id: str, job_ids: Iterable[str], statuses: Iterable[Status]) -> int:
        """Re-enqueue jobs in one of `statuses` as new attempts of the same custom_id."""
        allowed = ",".join(s.value for s in statuses)
        ms = now_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for jid in job_ids:
                payload = serialize_job(
                    RUN_FUNCTION, (jid, batch_id), {}, None, ms, serializer=json_dumps
                )
                await self._retry(
                    keys=self._job_keys(jid, batch_id, keys.ARQ_JOB_PREFIX + jid),
                    args=[jid, allowed, ms, payload, ARQ_EXPIRES_MS, self.ttl],
                    client=pipe,
                )
            replies = await pipe.execute()
        return sum(1 for r in replies if r == 1)

    async def cancel(self, batch_id: str, job_ids: Iterable[str]) -> int:
        """Cancel every job of `job_ids` that is not terminal yet; returns how many changed.
        Workers running them hear it on the control channel and stop them."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for jid in job_ids:
                await self._finish_call(pipe, batch_id, jid, Status.CANCELLED, None)
            pipe.publish(keys.CONTROL, f"cancel {batch_id}")
            replies = await pipe.execute()
        return sum(1 for r in replies[:-1] if r == 1)

    # -- worker side ---------------------------------------------------------------------

    async def claim(self, job_id: str, batch_id: str, worker: str) -> Claim:
        """Mark a job running (queued, or running after a crash), take it out of arq's queue
        under a lease, and get its spec."""
        reply = await self._claim(
            keys=self._job_keys(job_id, batch_id, keys.LEASES),
            args=[worker, now_iso(), job_id, now_ms() + self.lease_ms, self.max_runs],
        )
        state = _s(reply[0]) or "missing"
        if state not in ("running", "exhausted"):
            return Claim(state)
        job = AgentJob.model_validate_json(reply[1])
        return Claim(state, job=job, enqueued_at=_s(reply[2]), runs=_i(reply[3]))

    def _job_keys(self, job_id: str, batch_id: str, *extra: str) -> list[str]:
        """The keys every job transition script starts with, then its own."""
        return [
            keys.job(job_id),
            keys.batch(batch_id),
            keys.batch_events(batch_id),
            self.queue,
            *extra,
        ]

    async def job_owner(self, job_id: str) -> tuple[str | None, str | None]:
        """The batch id and custom_id of a job, if it exists."""
        batch_id, custom_id = await self.redis.hmget(keys.job(job_id), ["batch_id", "custom_id"])
        return _s(batch_id), _s(custom_id)

    async def depth(self) -> tuple[int, int]:
        """Jobs waiting in the queue, and jobs running (leased) on all workers."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.queue)
            pipe.zcard(keys.LEASES)
            queued, leased = await pipe.execute()
        return int(queued), int(leased)

    async def renew(self, job_ids: Iterable[str]) -> None:
        """Extend the leases of jobs this worker runs (only those still leased)."""
        deadline = now_ms() + self.lease_ms
        mapping = {jid: deadline for jid in job_ids}
        if mapping:
            await self.redis.zadd(keys.LEASES, mapping, xx=True)

    async def reap(self, limit: int = 500) -> int:
        """Put jobs whose lease ran out (their worker died) back in arq's queue."""
        return int(
            await self._reap(
                keys=[keys.LEASES, self.queue],
                args=[now_ms(), limit, keys.ARQ_IN_PROGRESS_PREFIX],
            )
        )

    async def release(self, job_id: str, batch_id: str) -> bool:
        """A running job was interrupted (shutdown): back to queued, at the queue's front.
        The interrupted run does not count towards max_runs."""
        return (
            await self._release(
                keys=self._job_keys(job_id, batch_id, keys.LEASES),
                args=[job_id, now_ms()],
            )
            == 1
        )

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
            keys=self._job_keys(job_id, batch_id, keys.ARQ_JOB_PREFIX + job_id, keys.LEASES),
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
                (record.model if record else None) or "",
            ],
            client=client,
        )
