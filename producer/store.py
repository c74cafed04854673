"""Job and batch state in Redis. Every state change is one Lua script: one round trip that checks
the expected status, writes the record, moves the batch counters and publishes the change, so
counts always add up and a re-run after a crash cannot count twice or overwrite a final result."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from . import keys
from .autopipeline import AutoPipeline
from .connect import Script
from .limits import check_depth
from .models import (
    STORED,
    AgentJob,
    BatchStatus,
    JobError,
    ModelUsage,
    Priority,
    ResultRecord,
    Status,
    Usage,
    job_id_for,
)

RUN_FUNCTION = "run_agent_job"
"""The arq function name workers register; the arq payload carries only ids."""

# The job hash is the one source of truth. arq's queue entry and payload are derived from it:
# each enqueue of a job writes a new arq job id "<job id>.<q>" (q counts the job's enqueues),
# so arq's own clean-up of an earlier run can never delete a later one, and any of them can be
# rebuilt from the hash. A claim takes a fencing token; every later write of that run must
# carry it. Times are Redis's (TIME), never a worker's clock.

_PRELUDE = """
local QUEUE, LEASES, CLOCK, ACTIVE, SWEEPS, INDEX, VCLOCK = {queue}, {leases}, {clock},
  {active}, {sweeps}, {index}, {vclock}
local JOB, BATCH, EVENTS, ARQ, FUNC = {job}, {batch}, {events}, {arq}, {func}
local WAKE, SETTLED, PROGRESS, THROTTLE_MS = {wake}, {settled}, {progress}, {throttle_ms}
local ARQ_IP, ARQ_RETRY = {arq_in_progress}, {arq_retry}
local TTL, LEASE_MS, PAYLOAD_MS, MAX_RUNS = {ttl}, {lease_ms}, {payload_ms}, {max_runs}
local TENANT, TQ, TP = {tenant}, {tq}, {tp}
local DEFAULT_QUEUE, FLEET_VCLOCK = {default_queue}, {fleet_vclock}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function jkey(id) return JOB .. id end
local function bkey(b) return BATCH .. b end
local function okey(b) return BATCH .. b .. ':order' end
-- Nothing but agentq's batch hash and order list may sit where a batch's keys belong; a
-- script that would write them checks first, so it never stops halfway on WRONGTYPE.
local function misfit(b)
  local bt, ot = redis.call('TYPE', bkey(b))['ok'], redis.call('TYPE', okey(b))['ok']
  if (bt == 'none' or bt == 'hash') and (ot == 'none' or ot == 'list') then return nil end
  return redis.error_reply('WRONGTYPE the keys of batch ' .. b .. ' hold other data (' ..
    bkey(b) .. ' is a ' .. bt .. ', ' .. okey(b) .. ' a ' .. ot .. '): nothing was written')
end
local function final(st) return st == 'succeeded' or st == 'failed' or st == 'cancelled' end
local function tkey(t) return TENANT .. t end
-- a tenant's queued jobs of one priority offset (see "A tenant's turn" below)
local function tqkey(t, poff) return TQ .. (tonumber(poff) or 0) .. ':' .. t end
-- the same jobs by their place in arq's queue (see fill)
local function tpkey(t, poff) return TP .. (tonumber(poff) or 0) .. ':' .. t end
local function arq_id(id, q) return id .. '.' .. (q or '0') end
-- Every job change is announced on the batch's events channel; its counters' change on the
-- progress channel, at most once per THROTTLE_MS (waiters re-read a window later).
local function publish(b, msg)
  redis.call('PUBLISH', EVENTS .. b, msg)
  if redis.call('SET', BATCH .. b .. ':throttle', '1', 'PX', THROTTLE_MS, 'NX') then
    redis.call('PUBLISH', PROGRESS .. b, '1')
  end
end
local function move(b, from, to)
  redis.call('HINCRBY', bkey(b), from, -1)
  redis.call('HINCRBY', bkey(b), to, 1)
end
-- Idle workers sleep until they hear of new jobs: one message per script that enqueues.
local woken = false
local function wake()
  if not woken then redis.call('PUBLISH', WAKE, '1') woken = true end
end
-- A new arq queue entry and payload for the job (its next generation), at `score`; `front`
-- puts it before every job never started, in its original order among those put back (and
-- a tenant's job the same among its tenant's, unless `lfront` is false).
local function enqueue(id, b, score, front, lfront)
  if lfront == nil then lfront = front end
  local q = redis.call('HINCRBY', jkey(id), 'q', 1)
  local aid = arq_id(id, q)
  -- every value JSON-encoded (an empty Lua table would encode as [] on some servers: "k" is
  -- written as it is)
  local payload = '{{"t":null,"f":' .. cjson.encode(FUNC) .. ',"a":'
    .. cjson.encode({{id, b, tostring(q)}}) .. ',"k":{{}},"et":' .. cjson.encode(tonumber(score))
    .. '}}'
  redis.call('SET', ARQ .. aid, payload, 'PX', PAYLOAD_MS)
  if front then score = tonumber(score) - 1e13 end
  redis.call('ZADD', QUEUE, score, aid)
  local t = redis.call('HMGET', jkey(id), 'tenant', 'lscore', 'poff')
  if t[1] then
    local l = tonumber(t[2]) or 0
    if lfront then l = l - 1e13 end
    redis.call('ZADD', tqkey(t[1], t[3]), l, id)
    redis.call('ZADD', tpkey(t[1], t[3]), score, id)
  end
  wake()
end
-- Fair share and priorities. A job's score in arq's queue is a place in virtual time, not a
-- clock reading: a batch numbers its jobs one after another from the fleet's virtual time when
-- they come (VCLOCK, the highest place started) or from its own last place, whichever is later.
-- Workers take the lowest score first, so the active batches take turns, a job each per round
-- of virtual time. A priority moves a batch's places ahead (high) or behind (low) by a fixed
-- number of rounds ('poff'). Places stay far below any real time: a job deferred to a real
-- time (arq's retry after a Redis error) comes after all of them, until the reconciler puts
-- it back at its place.
--
-- Tenants (metadata.tenant) share above batches: a tenant takes turns with the other tenants
-- and with each batch of jobs without a tenant, as one batch would. Its jobs are placed from
-- the tenant's own last place ('vnext:<poff>' of its hash), so its places in arq's queue are
-- its turns. Which of its jobs runs on a turn is decided when a worker takes it: the tenant's
-- jobs of that priority wait in a sorted set (TQ) by their place among the tenant's own
-- batches (the same rounds, on the tenant's own virtual time 'tv:<poff>'), and the claim runs
-- the first of them, whichever entry of the tenant the worker took; the entry's own job takes
-- the place of the one that runs (see turn_of).
local REAL_TIME = 1e12
-- The queue's virtual time. A queue new to it starts from the fleet-wide one, where agentq
-- before per-queue keys placed its jobs (so they do not wait behind new ones), and keeps it.
local function vclock()
  local v = redis.call('GET', VCLOCK)
  if not v then
    v = redis.call('GET', FLEET_VCLOCK) or '0'
    if VCLOCK ~= FLEET_VCLOCK then redis.call('SET', VCLOCK, v) end
  end
  return tonumber(v)
end
local function first_place(b)
  local v = vclock() + 1  -- the round after the latest
  -- after its own last place only while it has jobs waiting there (not, say, cancelled ones)
  local h = redis.call('HMGET', bkey(b), 'vnext', 'queued')
  if (tonumber(h[2]) or 0) <= 0 then return v end
  return math.max(v, tonumber(h[1]) or 0)
end
-- A tenant's next place: the same rule, its jobs of that priority standing for a batch's.
local function tenant_first(t, poff)
  local v = vclock() + 1
  if redis.call('EXISTS', tqkey(t, poff)) == 0 then return v end
  return math.max(v, tonumber(redis.call('HGET', tkey(t), 'vnext:' .. poff) or '0') or 0)
end
-- A batch's next place among its tenant's batches, on the tenant's virtual time (both kept
-- per priority offset: a batch may get jobs at another priority).
local function lvf(t, poff) return 'lv:' .. (tonumber(poff) or 0) .. ':' .. t end
local function local_first(b, t, poff)
  local v = tonumber(redis.call('HGET', tkey(t), 'tv:' .. poff) or '0') + 1
  local h = redis.call('HMGET', bkey(b), lvf(t, poff), 'queued')
  if (tonumber(h[2]) or 0) <= 0 then return v end
  return math.max(v, tonumber(h[1]) or 0)
end
local function place(b, id)
  local poff = tonumber(redis.call('HGET', bkey(b), 'poff') or '0')
  redis.call('HSET', jkey(id), 'poff', poff)
  local t = redis.call('HGET', jkey(id), 'tenant')
  if t then
    local v, l = tenant_first(t, poff), local_first(b, t, poff)
    redis.call('HSET', tkey(t), 'vnext:' .. poff, v + 1)
    redis.call('EXPIRE', tkey(t), TTL)
    redis.call('HSET', bkey(b), lvf(t, poff), l + 1)
    redis.call('HSET', jkey(id), 'lscore', l)
    return v + poff
  end
  local v = first_place(b)
  redis.call('HSET', bkey(b), 'vnext', v + 1)
  return v + poff
end
-- A job started at place `score`, placed with offset `poff` (its own: a batch's priority may
-- change when it gets more jobs): the fleet's virtual time moves on to it. A low batch's job
-- moves it only to its place before the offset, so work submitted while low jobs run still
-- goes first; a high batch's places lie behind it and move it not, so a high batch leaves the
-- turns of the other batches as they were.
local function advance(score, poff)
  local v = tonumber(score or '')
  if v then v = v - math.max(tonumber(poff) or 0, 0) end
  if v and v < REAL_TIME and v > vclock() then
    redis.call('SET', VCLOCK, v)
  end
end
-- Every arq key of that enqueue goes: its queue entry, payload, in-progress marker and try
-- count. An arq id is never enqueued again, so once a claim took it arq's own clean-up after
-- the run has nothing left to do (the worker skips it: BatchStartWorker.finish_job).
local function dequeue(id, q)
  local aid = arq_id(id, q)
  redis.call('ZREM', QUEUE, aid)
  redis.call('DEL', ARQ .. aid, ARQ_IP .. aid, ARQ_RETRY .. aid)
  local t = redis.call('HMGET', jkey(id), 'tenant', 'poff')
  if t[1] then
    redis.call('ZREM', tqkey(t[1], t[2]), id)
    redis.call('ZREM', tpkey(t[1], t[2]), id)
  end
end
-- A queued job leaves other than by a claim (cancelled). A batch's places go with it, but a
-- tenant's are shared by its batches: its other jobs would wait behind the gap, the other
-- tenants taking that many turns first. So the tenant's job placed last takes the place (not
-- one given back's, whose turn was had; not one a worker is taking).
-- A claim that cancels the tenant's job instead of running it leaves the place it took the
-- same way (fill).
local function fill(t, poff, ps)
  if not ps or ps <= -REAL_TIME or ps >= REAL_TIME then return end
  local h = {{t, poff}}
  local tp = tpkey(h[1], h[2])
  local z, g
  for _ = 1, 8 do
    local top = redis.call('ZRANGE', tp, -1, -1, 'WITHSCORES')
    if #top == 0 or tonumber(top[2]) <= ps or tonumber(top[2]) >= REAL_TIME then return end
    z = top[1]
    g = redis.call('HMGET', jkey(z), 'status', 'q', 'batch_id', 'tenant')
    if g[1] == 'queued' and g[4] == h[1] then break end
    -- no longer queued (left by an agentq that kept no places by tenant): not the tenant's
    redis.call('ZREM', tp, z)
    z = nil
  end
  if not z then return end
  local aid = arq_id(z, g[2])
  local qs = tonumber(redis.call('ZSCORE', QUEUE, aid) or '')
  if not qs or qs <= ps or qs >= REAL_TIME or redis.call('EXISTS', ARQ_IP .. aid) == 1
      or misfit(g[3]) then
    return
  end
  dequeue(z, g[2])
  redis.call('HSET', jkey(z), 'score', ps)
  enqueue(z, g[3], ps, false)
  -- the tenant's next jobs come after its last place now
  local last = redis.call('ZRANGE', tp, -1, -1, 'WITHSCORES')
  local poff = tonumber(h[2]) or 0
  local vn = 'vnext:' .. poff
  local nxt = tonumber(last[2]) - poff + 1
  if nxt < (tonumber(redis.call('HGET', tkey(h[1]), vn) or '') or 0) then
    redis.call('HSET', tkey(h[1]), vn, nxt)
  end
end
local function leave(id, q)
  local h = redis.call('HMGET', jkey(id), 'tenant', 'poff')
  local ps = h[1] and tonumber(redis.call('ZSCORE', tpkey(h[1], h[2]), id) or '')
  dequeue(id, q)
  if ps then fill(h[1], h[2], ps) end
end
-- A tenant's turn: of its jobs of priority `poff` waiting in arq's queue, the one with the
-- lowest place among its batches, if that is lower than `lx` (the place of the job whose
-- entry a worker took, already out of the set) and it may start now: not deferred to a real
-- time, nor taken by another worker meanwhile. Entries of jobs no longer waiting there go (the
-- reconciler enqueues a job again, and with it its entry here).
local function turn_of(t, poff, lx)
  local tq = tqkey(t, poff)
  for _ = 1, 8 do
    local top = redis.call('ZRANGE', tq, 0, 0, 'WITHSCORES')
    if #top == 0 or tonumber(top[2]) >= lx then return nil end
    local y = top[1]
    local g = redis.call('HMGET', jkey(y), 'status', 'q', 'batch_id', 'tenant', 'poff', 'score')
    local aid = arq_id(y, g[2])
    local qs = redis.call('ZSCORE', QUEUE, aid)
    if g[1] ~= 'queued' or g[4] ~= t or tonumber(g[5]) ~= tonumber(poff) or not qs
        or redis.call('EXISTS', ARQ .. aid) == 0 then
      redis.call('ZREM', tq, y)
    elseif tonumber(qs) >= REAL_TIME or redis.call('EXISTS', ARQ_IP .. aid) == 1
        or misfit(g[3]) or not tonumber(g[6]) then
      return nil
    else
      return y, tonumber(qs)
    end
  end
  return nil
end
-- A batch with queued or running jobs: none of its keys expire meanwhile.
local function activate(b, now)
  redis.call('PERSIST', bkey(b))
  redis.call('PERSIST', okey(b))
  redis.call('ZADD', ACTIVE, 'NX', now, b)
  redis.call('ZREM', SWEEPS, b)
end
-- After a job left queued/running: a batch with none left starts to expire, its job records
-- with it (re-armed by the sweep, so TTLs count from the batch's last activity).
local function settle(b)
  local c = redis.call('HMGET', bkey(b), 'queued', 'running')
  if (tonumber(c[1]) or 0) + (tonumber(c[2]) or 0) <= 0 then
    redis.call('EXPIRE', bkey(b), TTL)
    -- the order list expires when the sweep has re-armed every record it lists
    if redis.call('ZREM', ACTIVE, b) == 1 then redis.call('ZADD', SWEEPS, 0, b) end
    redis.call('PUBLISH', SETTLED .. b, '1')
  end
end
-- Every renew and reap starts here: if nobody renewed for half a lease (Redis was down, or
-- every worker was), credit the gap to every lease instead of reaping live jobs.
local function tick(now)
  local last = tonumber(redis.call('GET', CLOCK) or '')
  redis.call('SET', CLOCK, now)
  if last and now - last > LEASE_MS / 2 then
    -- Credit what exceeds the renewal cadence (a third of a lease), not the whole gap: a
    -- fleet whose rounds are merely slow still lets dead workers' leases run out.
    local credit = now - last - math.floor(LEASE_MS / 3)
    local all = redis.call('ZRANGE', LEASES, 0, -1, 'WITHSCORES')
    for i = 1, #all, 2 do
      redis.call('ZADD', LEASES, tonumber(all[i + 1]) + credit, all[i])
    end
    return now - last
  end
  return 0
end
-- A running job goes back to the front of the queue (its original place).
local function requeue(id, b)
  move(b, 'running', 'queued')
  redis.call('HSET', jkey(id), 'status', 'queued')
  redis.call('ZREM', LEASES, id)
  enqueue(id, b, redis.call('HGET', jkey(id), 'score') or '0', true)
  publish(b, id .. ' queued')
end
"""

_SUBMIT = """
-- ARGV: batch id, enqueued_at, priority offset (rounds), then (job id, custom_id, spec,
-- tenant or '') quadruples.
local b, enq, poff, now, new = ARGV[1], ARGV[2], tonumber(ARGV[3]), now_ms(), 0
local bad = misfit(b)
if bad then return bad end
-- A batch belongs to the queue it was first submitted to: its jobs run on that queue's workers
local bq = redis.call('HGET', bkey(b), 'queue')
if bq and bq ~= QUEUE then
  return redis.error_reply('WRONGQUEUE batch ' .. b .. ' was submitted to queue ' .. bq ..
    ', not ' .. QUEUE .. ': set AGENTQ_QUEUE=' .. bq .. ' to add jobs to it (nothing was ' ..
    'enqueued)')
end
redis.call('HSET', bkey(b), 'queue', QUEUE)
local v = first_place(b)
local tv, lv = {}, {}  -- each tenant's next place, and this batch's among the tenant's
-- A batch that was done and gets more jobs: the caller keeps its older records (keep_records).
local revived = redis.call('ZSCORE', ACTIVE, b) == false
  and tonumber(redis.call('HGET', bkey(b), 'total') or '0') > 0
for i = 4, #ARGV, 4 do
  local id, t = ARGV[i], ARGV[i + 3]
  if redis.call('EXISTS', jkey(id)) == 0 then
    local score
    if t ~= '' then
      if not tv[t] then tv[t], lv[t] = tenant_first(t, poff), local_first(b, t, poff) end
      score = tv[t] + poff
      redis.call('HSET', jkey(id), 'tenant', t, 'lscore', lv[t])
      tv[t], lv[t] = tv[t] + 1, lv[t] + 1
    else
      score = v + poff
      v = v + 1
    end
    redis.call('HSET', jkey(id), 'status', 'queued', 'custom_id', ARGV[i + 1], 'batch_id', b,
               'spec', ARGV[i + 2], 'enqueued_at', enq, 'score', score, 'poff', poff, 'qt',
               now, 'runs', 0, 'token', 0, 'q', 0)
    redis.call('RPUSH', okey(b), id)
    enqueue(id, b, score, false)
    new = new + 1
  end
end
for t, nxt in pairs(tv) do
  redis.call('HSET', tkey(t), 'vnext:' .. poff, nxt)
  redis.call('EXPIRE', tkey(t), TTL)
  redis.call('HSET', bkey(b), lvf(t, poff), lv[t])
end
redis.call('HSETNX', bkey(b), 'created_at', enq)
redis.call('ZADD', INDEX, 'NX', now, b)
if new > 0 then
  redis.call('HSET', bkey(b), 'vnext', v, 'poff', poff)
  redis.call('HINCRBY', bkey(b), 'total', new)
  redis.call('HINCRBY', bkey(b), 'queued', new)
  activate(b, now)
else
  settle(b)
  revived = false
end
return {new, revived and 1 or 0}
"""

_CLAIM = """
-- ARGV: job id, queue generation (from the arq payload), worker, started_at, nonce. The job
-- run may be another of the same tenant (its turn): the reply names it.
local id = ARGV[1]
local FIELDS = {'status', 'q', 'batch_id', 'qt', 'score', 'poff', 'tenant', 'swap'}
local h = redis.call('HMGET', jkey(id), unpack(FIELDS))
if h[8] then
  -- this claim sent again, whose first try ran another job of the tenant on this entry (this
  -- job, moved to that one's place, may have been taken by another claim since)
  local nonce, other = string.match(h[8], '^(%S+) (.+)$')
  if nonce == ARGV[5] then
    id = other
    h = redis.call('HMGET', jkey(id), unpack(FIELDS))
  end
end
local st, b = h[1], h[3]
if not st then return {'missing'} end
if final(st) then return {st} end
if st == 'running' and redis.call('HGET', jkey(id), 'nonce') == ARGV[5] then
  -- this very claim, sent again by the client after a lost reply: the same run
  local f = redis.call('HMGET', jkey(id), 'spec', 'enqueued_at', 'runs', 'fence')
  local again = 'running'
  if tonumber(f[3]) > MAX_RUNS then again = 'exhausted' end
  return {again, f[1], f[2], tonumber(f[3]), f[4], id, b}
end
if st ~= 'queued' then return {'busy'} end
if (h[2] or '0') ~= ARGV[2] then return {'stale'} end
local bad = misfit(b)
if bad then return bad end
local now = now_ms()
-- this job's place among its tenant's (given back: at the front), before it leaves the set
local lx = h[7] and tonumber(redis.call('ZSCORE', tqkey(h[7], h[6]), id)
  or redis.call('HGET', jkey(id), 'lscore') or '')
dequeue(id, h[2])
local turn, poff = h[5], h[6]  -- the place this entry stands for
if h[7] and lx then
  -- (places are swapped: none if this job has none, odd data)
  local y, ys
  if tonumber(turn) then y, ys = turn_of(h[7], h[6], lx) end
  if y then
    -- the tenant's turn goes to y; this entry's job takes y's place in the queue (at the
    -- front if y's was: y was given back), keeping its own turn among the tenant's
    local g = redis.call('HMGET', jkey(y), unpack(FIELDS))
    dequeue(y, g[2])
    redis.call('HSET', jkey(id), 'score', g[5], 'swap', ARGV[5] .. ' ' .. y)
    enqueue(id, b, g[5], ys < (tonumber(g[5]) or 0) - 1e12, lx < -REAL_TIME)
    redis.call('HSET', jkey(y), 'score', turn)
    id, h, b = y, g, g[3]
  end
  local l = tonumber(redis.call('HGET', jkey(id), 'lscore') or '')
  local tv = 'tv:' .. (tonumber(h[6]) or 0)
  if l and l < REAL_TIME and l > tonumber(redis.call('HGET', tkey(h[7]), tv) or '0') then
    redis.call('HSET', tkey(h[7]), tv, l)
    redis.call('EXPIRE', tkey(h[7]), TTL)  -- kept while the tenant's jobs run
  end
end
-- taken from this queue: a batch from before batches named their queue is this queue's
redis.call('HSETNX', bkey(b), 'queue', QUEUE)
local c = redis.call('HMGET', bkey(b), 'cancelled_at', 'poff')
local cancelled = c[1]
advance(turn, poff or c[2])
if cancelled and tonumber(h[4] or 0) <= tonumber(cancelled) then
  move(b, 'queued', 'cancelled')
  redis.call('HSET', jkey(id), 'status', 'cancelled', 'finished_at', ARGV[4])
  publish(b, id .. ' cancelled')
  settle(b)
  -- a tenant's turn (not a run given back's, at the front) goes to its other jobs
  if h[7] and lx and lx > -REAL_TIME then fill(h[7], poff, tonumber(turn)) end
  return {'cancelled'}
end
local runs = redis.call('HINCRBY', jkey(id), 'runs', 1)
-- The token is unique even if a crash lost the last claims: Redis time plus a counter.
local token = now .. '.' .. redis.call('HINCRBY', jkey(id), 'token', 1)
redis.call('HSET', jkey(id), 'fence', token)
move(b, 'queued', 'running')
redis.call('HSET', jkey(id), 'status', 'running', 'started_at', ARGV[4], 'worker', ARGV[3],
           'nonce', ARGV[5])
redis.call('ZADD', LEASES, now + LEASE_MS, id)
publish(b, id .. ' running')
local f = redis.call('HMGET', jkey(id), 'spec', 'enqueued_at')
local state = 'running'
if runs > MAX_RUNS then state = 'exhausted' end
return {state, f[1], f[2], runs, token, id, b}
"""

_FINISH = """
-- ARGV: job id, fencing token ('' = any non-final job: cancel), status, record JSON ('' =
-- none), requests, input, output, total tokens, cost, finished_at, model.
local id, token, to = ARGV[1], ARGV[2], ARGV[3]
local h = redis.call('HMGET', jkey(id), 'status', 'fence', 'batch_id', 'q')
local st, b = h[1], h[3]
if not st or final(st) then return 0 end
if token ~= '' and (st ~= 'running' or h[2] ~= token) then return -1 end
local bk = bkey(b)
move(b, st, to)
redis.call('HINCRBY', bk, 'requests', ARGV[5])
redis.call('HINCRBY', bk, 'input_tokens', ARGV[6])
redis.call('HINCRBY', bk, 'output_tokens', ARGV[7])
redis.call('HINCRBY', bk, 'total_tokens', ARGV[8])
redis.call('HINCRBYFLOAT', bk, 'cost_usd', ARGV[9])
if ARGV[11] ~= '' then
  redis.call('HINCRBY', bk, 'm:' .. ARGV[11] .. ':jobs', 1)
  redis.call('HINCRBY', bk, 'm:' .. ARGV[11] .. ':input_tokens', ARGV[6])
  redis.call('HINCRBY', bk, 'm:' .. ARGV[11] .. ':output_tokens', ARGV[7])
  redis.call('HINCRBYFLOAT', bk, 'm:' .. ARGV[11] .. ':cost_usd', ARGV[9])
end
redis.call('HSET', jkey(id), 'status', to, 'finished_at', ARGV[10])
if ARGV[4] ~= '' then redis.call('HSET', jkey(id), 'result', ARGV[4]) end
redis.call('ZREM', LEASES, id)
if st == 'queued' then leave(id, h[4]) end
publish(b, id .. ' ' .. to)
settle(b)
return 1
"""

_RENEW = """
-- ARGV: (job id, token) pairs this worker runs. Returns {lost, cancelled}: runs whose lease
-- is no longer theirs (stop them, write nothing), and runs of cancelled batches.
local now = now_ms()
tick(now)
local lost, cancel = {}, {}
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  local h = redis.call('HMGET', jkey(id), 'status', 'fence', 'batch_id', 'qt')
  if h[1] == 'running' and h[2] == ARGV[i + 1] then
    redis.call('ZADD', LEASES, now + LEASE_MS, id)
    local c = redis.call('HGET', bkey(h[3]), 'cancelled_at')
    if c and tonumber(h[4] or 0) <= tonumber(c) then table.insert(cancel, id) end
  else
    table.insert(lost, id)
  end
end
return {lost, cancel}
"""

_REAP = """
-- ARGV: most jobs to requeue. Returns {requeued, ms credited to leases after an outage}.
local now = now_ms()
local gap = tick(now)
local ids = redis.call('ZRANGEBYSCORE', LEASES, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local n = 0
for _, id in ipairs(ids) do
  redis.call('ZREM', LEASES, id)
  local h = redis.call('HMGET', jkey(id), 'status', 'batch_id')
  if h[1] == 'running' then
    requeue(id, h[2])
    n = n + 1
  end
end
return {n, gap}
"""

_RELEASE = """
-- ARGV: job id, token. A run given back (worker shutting down): front of the queue, and the
-- run does not count towards max_runs.
local id = ARGV[1]
local h = redis.call('HMGET', jkey(id), 'status', 'fence', 'batch_id')
if h[1] ~= 'running' or h[2] ~= ARGV[2] then return 0 end
redis.call('HINCRBY', jkey(id), 'runs', -1)
requeue(id, h[3])
return 1
"""

_RETRY = """
-- ARGV: job id, allowed statuses (comma-separated; none: only keep the record). A final job
-- not retried keeps its record while its batch is active again (its TTL is re-armed when the
-- batch is done again).
local id = ARGV[1]
local h = redis.call('HMGET', jkey(id), 'status', 'batch_id')
local st, b = h[1], h[2]
if not st then return 0 end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == st then allowed = true end end
if not allowed then
  if final(st) and redis.call('ZSCORE', ACTIVE, b) then redis.call('PERSIST', jkey(id)) end
  return 0
end
local now = now_ms()
local score = place(b, id)
move(b, st, 'queued')
redis.call('HDEL', jkey(id), 'result', 'started_at', 'finished_at', 'worker')
redis.call('HSET', jkey(id), 'status', 'queued', 'runs', 0, 'score', score, 'qt', now)
redis.call('HINCRBY', jkey(id), 'retries', 1)
redis.call('PERSIST', jkey(id))
activate(b, now)
enqueue(id, b, score, false)
publish(b, id .. ' queued')
return 1
"""

_SEAL = """
-- ARGV: batch id, created_at. A batch whose jobs all ended before it was sealed (or that never
-- had one) is not active: it expires.
local b = ARGV[1]
redis.call('HSETNX', bkey(b), 'created_at', ARGV[2])
redis.call('HSET', bkey(b), 'sealed', 1)
publish(b, '- sealed')
redis.call('PUBLISH', SETTLED .. b, '1')
if not redis.call('ZSCORE', ACTIVE, b) then redis.call('EXPIRE', bkey(b), TTL) end
return 1
"""

_CANCEL_FLAG = """
-- ARGV: batch id. Jobs enqueued (submitted or retried) before now are cancelled wherever
-- they are: at claim, at lease renewal, and by the cancel that follows.
local now = now_ms()
if redis.call('EXISTS', bkey(ARGV[1])) == 0 then return 0 end
redis.call('HSET', bkey(ARGV[1]), 'cancelled_at', now)
return now
"""

_RECONCILE = """
-- ARGV: jobs to check, interval ms. One bounded step over the active batches, at most one
-- step per interval across all workers. A queued job without its queue entry or payload is
-- enqueued again; a running job without a lease goes back to the queue.
if not redis.call('SET', KEYS[2], '1', 'PX', ARGV[2], 'NX') then return {-1, 0} end
local limit = tonumber(ARGV[1])
local c = redis.call('HMGET', KEYS[1], 'batch', 'offset', 'score')
local b, off = c[1], tonumber(c[2] or '0')
-- the cursor, at batch b (from job `o` on); its place in ACTIVE lets it go on from there
-- once b is gone
local function park(at, o)
  if not at then redis.call('HSET', KEYS[1], 'batch', '', 'offset', 0) return end
  redis.call('HSET', KEYS[1], 'batch', at, 'offset', o, 'score', redis.call('ZSCORE', ACTIVE, at))
end
local function next_of(x)
  local rank = redis.call('ZRANK', ACTIVE, x)
  return redis.call('ZRANGE', ACTIVE, rank + 1, rank + 1)[1]
end
if not b or b == '' or not redis.call('ZSCORE', ACTIVE, b) then
  b = nil
  if c[1] and c[1] ~= '' and tonumber(c[3]) then  -- the batch after the one gone
    for _, x in ipairs(redis.call('ZRANGEBYSCORE', ACTIVE, c[3], c[3], 'LIMIT', 0, 64)) do
      if x > c[1] then b = x break end
    end
    b = b or redis.call('ZRANGEBYSCORE', ACTIVE, '(' .. c[3], '+inf', 'LIMIT', 0, 1)[1]
  end
  b = b or redis.call('ZRANGE', ACTIVE, 0, 0)[1]
  off = 0
  if not b then redis.call('DEL', KEYS[1]) return {0, 0} end
end
-- Another queue's batches are its workers' to repair (a job repaired here would move to this
-- queue); a batch submitted before batches named their queue is the default queue's (a claim
-- names it). At most 64 skipped a step.
local function theirs(x) return (redis.call('HGET', bkey(x), 'queue') or DEFAULT_QUEUE) ~= QUEUE end
for _ = 1, 64 do
  if not theirs(b) then break end
  b, off = next_of(b), 0
  if not b then park(nil) return {0, 0} end
end
if theirs(b) then park(b, 0) return {0, 0} end
local ids = redis.call('LRANGE', okey(b), off, off + limit - 1)
local fixed = 0
-- a batch from before names no queue: its jobs' entries may be in another queue, so only a
-- job whose payload is gone is enqueued again (here)
local unnamed = not redis.call('HGET', bkey(b), 'queue')
for _, id in ipairs(ids) do
  local h = redis.call('HMGET', jkey(id), 'status', 'q', 'score')
  if h[1] == 'queued' then
    local aid = arq_id(id, h[2])
    local score = tonumber(h[3] or '0') or 0
    local qs = tonumber(redis.call('ZSCORE', QUEUE, aid))
    local gone = redis.call('EXISTS', ARQ .. aid) == 0
    if gone or (not qs and not unnamed) then
      dequeue(id, h[2])
      enqueue(id, b, score, false)
      fixed = fixed + 1
    elseif not qs then  -- (a batch from before: its entry is in another queue)
    elseif score >= REAL_TIME and qs >= REAL_TIME then
      -- queued by an agentq older than fair share (its place a clock time, after every place
      -- since; not one given back to the front): a place of its batch, as `agentq retry`
      -- gives; not a repair
      dequeue(id, h[2])
      score = place(b, id)
      redis.call('HSET', jkey(id), 'score', score)
      enqueue(id, b, score, false)
    elseif qs >= REAL_TIME and qs <= now_ms() then
      -- deferred by arq to a clock time (a claim met a Redis error), after every place, and
      -- due: back to its own place
      dequeue(id, h[2])
      enqueue(id, b, score, false)
    end
  elseif h[1] == 'running' and not redis.call('ZSCORE', LEASES, id) then
    requeue(id, b)
    fixed = fixed + 1
  end
end
if #ids < limit then park(next_of(b), 0) else park(b, off + #ids) end
return {#ids, fixed}
"""

_SWEEP = """
-- ARGV: records per step. Re-arms the TTL of an inactive batch's job records, a chunk a step.
local limit = tonumber(ARGV[1])
local top = redis.call('ZRANGE', SWEEPS, 0, 0, 'WITHSCORES')
if #top == 0 then return 0 end
local b, off = top[1], tonumber(top[2])
local ids = redis.call('LRANGE', okey(b), off, off + limit - 1)
for _, id in ipairs(ids) do redis.call('EXPIRE', jkey(id), TTL) end
if #ids < limit then
  redis.call('ZREM', SWEEPS, b)
  redis.call('EXPIRE', okey(b), TTL)
else
  redis.call('ZADD', SWEEPS, 'XX', off + #ids, b)
end
return #ids
"""


def _lua_str(value: str) -> str:
    """A Lua string literal for a key name or prefix (kept to characters that need no escape)."""
    if any(c in value for c in "'\\\n\r\0"):
        raise ValueError(f"Redis key names may not contain quotes or backslashes: {value!r}")
    return f"'{value}'"


def _scripts(queue: str, ttl_s: int, lease_ms: int, max_runs: int) -> dict[str, str]:
    """The transition scripts, each with the prelude and this store's names and limits."""
    prelude = _PRELUDE.format(
        queue=_lua_str(queue),
        leases=_lua_str(keys.of_queue(keys.LEASES, queue)),
        clock=_lua_str(keys.of_queue(keys.CLOCK, queue)),
        active=_lua_str(keys.ACTIVE),
        sweeps=_lua_str(keys.SWEEPS),
        index=_lua_str(keys.BATCHES),
        vclock=_lua_str(keys.of_queue(keys.VCLOCK, queue)),
        job=_lua_str(keys.job("")),
        batch=_lua_str(keys.batch("")),
        events=_lua_str(keys.batch_events("")),
        wake=_lua_str(keys.wake(queue)),
        settled=_lua_str(keys.batch_settled("")),
        progress=_lua_str(keys.batch_progress("")),
        throttle_ms=keys.PROGRESS_THROTTLE_MS,
        arq=_lua_str(keys.ARQ_JOB_PREFIX),
        arq_in_progress=_lua_str(keys.ARQ_IN_PROGRESS_PREFIX),
        arq_retry=_lua_str(keys.ARQ_RETRY_PREFIX),
        func=_lua_str(RUN_FUNCTION),
        tenant=_lua_str(keys.of_queue(keys.TENANT_PREFIX, queue)),
        tq=_lua_str(keys.of_queue(keys.TENANT_QUEUE_PREFIX, queue)),
        tp=_lua_str(keys.of_queue(keys.TENANT_PLACES_PREFIX, queue)),
        default_queue=_lua_str(keys.DEFAULT_QUEUE),
        fleet_vclock=_lua_str(keys.VCLOCK),
        ttl=ttl_s,
        lease_ms=lease_ms,
        payload_ms=ttl_s * 1000,
        max_runs=max_runs,
    )
    bodies = {
        "submit": _SUBMIT,
        "claim": _CLAIM,
        "finish": _FINISH,
        "renew": _RENEW,
        "reap": _REAP,
        "release": _RELEASE,
        "retry": _RETRY,
        "cancel_flag": _CANCEL_FLAG,
        "seal": _SEAL,
        "reconcile": _RECONCILE,
        "sweep": _SWEEP,
    }
    return {name: prelude + body for name, body in bodies.items()}


PRIORITY_ROUNDS = 10_000
"""How far a priority moves a batch, in rounds of fair share (virtual time). A high batch's
jobs are placed this many rounds ahead of a normal one submitted at the same moment, a low
batch's this many behind. So a higher priority starts first (all of a batch up to this many
jobs, before any job of a lower priority already queued), and a lower one is never starved:
its jobs start once every normal batch has had this many more turns, however much new normal
work keeps coming."""

_PRIORITY_OFFSET = {
    Priority.HIGH: -PRIORITY_ROUNDS,
    Priority.NORMAL: 0,
    Priority.LOW: PRIORITY_ROUNDS,
}


def _priority_of(poff: str | None) -> Priority:
    offset = _i(poff)
    return Priority.HIGH if offset < 0 else Priority.LOW if offset > 0 else Priority.NORMAL


def arq_job_id(job_id: str, q: int | str) -> str:
    """arq's id for the q-th enqueue of a job."""
    return f"{job_id}.{q}"


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
    """What a worker gets when it starts a job: the job and its fencing token, or why it must
    not run."""

    state: str
    """ "running"; "exhausted" (started max_runs times already: its workers kept dying; the
    claim holds it, to fail it); "missing"; "busy" (another run holds it); "stale" (this arq
    entry is from an earlier enqueue); "cancelled" (its batch was cancelled: recorded here);
    or the final status the job already has."""
    job: AgentJob | None = None
    enqueued_at: str | None = None
    runs: int = 0
    token: str = ""
    """The run's fencing token: finish and release of this run must present it."""
    spec_error: str | None = None
    """Why the stored job could not be read (a newer producer's field?), when it could not."""
    custom_id: str = ""
    job_id: str = ""
    """The job this run is: the one claimed, or another of its tenant whose turn it was."""
    batch_id: str = ""

    @property
    def holds(self) -> bool:
        """Whether this claim made the job this run's (it must end in finish or release)."""
        return self.state in ("running", "exhausted")


_STORED = {STORED: True}
"""A job read back: what an older agentq queued is read as it was meant (models.STORED)."""


def _reply_list(reply: Any) -> list[str]:
    return [_s(x) or "" for x in reply]


class Store:
    """Job records, batch counters and their change notifications, on one Redis connection pool.
    Every transition is one script; see the module's notes on generations and tokens."""

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
        if "|" in queue:
            raise ValueError(f"a queue name may not hold '|' (got {queue!r})")
        self.queue = queue
        self.ttl = result_ttl_s
        self.lease_ms = int(lease_s * 1000)
        self.max_runs = max_runs
        self._batched = AutoPipeline(redis)
        """The claims and finishes of runs that start or end together go out as one pipeline."""
        self.revived: set[str] = set()
        """Batches this store's submits made active again after they were done."""
        self._load()

    def _load(self) -> None:
        """(Re)build the scripts from the current settings (tests change lease_ms)."""
        self._sources = _scripts(self.queue, self.ttl, self.lease_ms, self.max_runs)
        self._script = {n: Script(self.redis, src) for n, src in self._sources.items()}

    def configure(self, *, lease_ms: int | None = None, max_runs: int | None = None) -> None:
        if lease_ms is not None:
            self.lease_ms = lease_ms
        if max_runs is not None:
            self.max_runs = max_runs
        self._load()

    async def _run(self, name: str, args: Sequence[Any], keys_: Sequence[str] = ()) -> Any:
        return await self._script[name](keys=list(keys_), args=list(args))

    async def _pipelined(self, calls: Sequence[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Scripts in one pipeline. A Redis restart between redis-py's script load and the
        pipeline's (retried) execution loses the scripts: load them again and re-send (every
        transition is idempotent or refused when repeated)."""
        for attempt in range(5):
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for name, args in calls:
                        await self._script[name](keys=[], args=list(args), client=pipe)
                    return list(await pipe.execute())
            except NoScriptError:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")

    # -- producer side -------------------------------------------------------------------

    async def submit_chunk(
        self, batch_id: str, jobs: Sequence[AgentJob], priority: Priority = Priority.NORMAL
    ) -> int:
        """Enqueue jobs in one script call; jobs whose (batch, custom_id) exists are skipped.
        Returns how many were new."""
        if not jobs:
            return 0
        return await self.send_chunk(batch_id, self.pack_chunk(batch_id, jobs, priority))

    def pack_chunk(
        self, batch_id: str, jobs: Sequence[AgentJob], priority: Priority = Priority.NORMAL
    ) -> list[str | int]:
        """The submit script's arguments for these jobs (the CPU-heavy part of a submit)."""
        args: list[str | int] = [batch_id, now_iso(), _PRIORITY_OFFSET[Priority(priority)]]
        for job in jobs:
            args += (
                job_id_for(batch_id, job.custom_id),
                job.custom_id,
                job.model_dump_json(exclude_unset=True),
                job.tenant or "",
            )
        return args

    async def send_chunk(self, batch_id: str, args: list[str | int], client: Any = None) -> int:
        """Run the submit script on packed arguments (through `client` when given: a
        single-connection client keeps the order of what is sent through it); returns how
        many jobs were new."""
        try:
            if client is None:
                ((new, revived),) = await self._pipelined([("submit", args)])
            else:
                new, revived = await self._script["submit"](keys=[], args=args, client=client)
        except ResponseError as exc:
            # a pipeline wraps the script's error in its own words
            if m := re.search(r"WRONGQUEUE (.*?\(nothing was enqueued\))", str(exc)):
                raise ValueError(m.group(1)) from None
            raise
        if revived:
            self.revived.add(batch_id)
        return int(new)

    async def seal(self, batch_id: str) -> None:
        """Mark the batch complete: `wait` may now finish once every job is final."""
        await self._run("seal", [batch_id, now_iso()])

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
            priority=_priority_of(h.get("poff")),
            queue=h.get("queue"),
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
        """Result records for job ids; a job not yet final gets a record of where it is."""
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
        replies = await self._pipelined([("retry", [jid, allowed]) for jid in job_ids])
        return sum(1 for r in replies if r == 1)

    async def keep_records(self, batch_id: str) -> None:
        """A batch is active again (retried, or more jobs submitted after it was done): take
        the TTL off its final records, which were set to expire with it. A record whose batch
        is no longer active is left alone (its TTL stays)."""
        async for ids in self.job_ids(batch_id):
            await self.retry(batch_id, ids, [])

    async def flag_cancelled(self, batch_id: str) -> bool:
        """Mark the batch cancelled as of now (durable: workers check it at claim and at lease
        renewal, so a lost pub/sub message or an interrupted cancel cannot let a job run on)."""
        return bool(await self._run("cancel_flag", [batch_id]))

    async def cancel(self, batch_id: str, job_ids: Iterable[str]) -> int:
        """Cancel every job of `job_ids` that is not final yet; returns how many changed.
        Workers running them hear it on the control channel (or at their next renewal)."""
        replies = await self._pipelined(
            [("finish", self._finish_args(jid, "", Status.CANCELLED, None)) for jid in job_ids]
        )
        await self.redis.publish(keys.CONTROL, f"cancel {batch_id}")
        return sum(1 for r in replies if r == 1)

    # -- worker side ---------------------------------------------------------------------

    async def claim(self, job_id: str, batch_id: str, worker: str, q: str = "0") -> Claim:
        """Take the job for one run (it must be queued, and `q` its current generation): it
        leaves arq's queue, gets a lease and a fencing token. For a job with a tenant, the run
        may be of another job of that tenant (the claim's job_id and batch_id say which)."""
        nonce = uuid.uuid4().hex  # makes a resent claim (lost reply) return the same run
        args = [job_id, q, worker, now_iso(), nonce]
        claim = self._script["claim"]
        orphan = functools.partial(self._give_back, job_id)
        reply = _reply_list(await self._batched.call(claim, [], args, orphan=orphan))
        state = reply[0] or "missing"
        if state not in ("running", "exhausted"):
            return Claim(state)
        spec, enqueued_at, runs, token = reply[1], reply[2] or None, int(reply[3]), reply[4]
        try:
            check_depth(spec, "the stored job")
            job: AgentJob | None = AgentJob.model_validate_json(spec, context=_STORED)
            error = None
        except ValueError as exc:
            job, error = None, str(exc).replace("\n", " ")[:1000]
        job_id, batch_id = reply[5] or job_id, reply[6] or batch_id
        custom_id = job.custom_id if job else (await self.job_owner(job_id))[1] or ""
        return Claim(
            state,
            job=job,
            enqueued_at=enqueued_at,
            runs=runs,
            token=token,
            spec_error=error,
            custom_id=custom_id,
            job_id=job_id,
            batch_id=batch_id,
        )

    async def _give_back(self, job_id: str, reply: Any) -> None:
        """A claim that ran after its caller was cancelled (it had gone out, or redis-py sent
        it again after a dropped link): nothing runs it, so the job goes back to the front of
        the queue, not counting the run. Should Redis refuse, the lease lapses instead."""
        got = _reply_list(reply)
        if got[0] in ("running", "exhausted"):
            with contextlib.suppress(RedisError):
                await self.release(got[5] or job_id, got[4])

    async def job_owner(self, job_id: str) -> tuple[str | None, str | None]:
        """The batch id and custom_id of a job, if it exists."""
        batch_id, custom_id = await self.redis.hmget(keys.job(job_id), ["batch_id", "custom_id"])
        return _s(batch_id), _s(custom_id)

    async def depth(self) -> tuple[int, int]:
        """Jobs waiting in the queue, and its jobs running (leased) on all workers."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.queue)
            pipe.zcard(keys.of_queue(keys.LEASES, self.queue))
            queued, leased = await pipe.execute()
        return int(queued), int(leased)

    async def renew(self, runs: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
        """Extend the leases of this worker's runs, (job id, token) pairs. Returns the runs
        whose lease is gone (stop them: another run has the job, or it is final) and the runs
        whose batch was cancelled."""
        args = [x for pair in runs for x in pair]
        lost, cancelled = await self._run("renew", args)
        return _reply_list(lost), _reply_list(cancelled)

    async def reap(self, limit: int = 500) -> tuple[int, int]:
        """Put jobs whose lease ran out (their worker died or hung) back at the front of the
        queue. Returns how many, and the ms credited to every lease after an outage."""
        n, gap = await self._run("reap", [limit])
        return int(n), int(gap)

    async def reconcile(self, limit: int = 1000, interval_s: float = 5.0) -> tuple[int, int]:
        """One bounded step of the queue's repair sweep (at most one per interval across its
        workers; other queues' batches are skipped): returns (jobs checked, jobs repaired),
        (-1, 0) when not this one's turn."""
        cursor = [keys.of_queue(k, self.queue) for k in (keys.RECONCILE, keys.RECONCILE_LOCK)]
        checked, fixed = await self._run("reconcile", [limit, int(interval_s * 1000)], cursor)
        return int(checked), int(fixed)

    async def sweep(self, limit: int = 1000) -> int:
        """One step re-arming the TTL of records of batches that became inactive."""
        return int(await self._run("sweep", [limit]))

    async def release(self, job_id: str, token: str) -> bool:
        """A run was interrupted (shutdown, or its claim's caller was cancelled): the job goes
        back to the front of the queue, and the run does not count towards max_runs. Refused
        for a stale token."""
        return await self._run("release", [job_id, token]) == 1

    async def finish(self, record: ResultRecord, token: str) -> int:
        """Store the final record of the run holding `token`: 1 stored, 0 the job was already
        final, -1 the token is stale (another run holds the job). Nothing changes unless 1."""
        args = self._finish_args(record.job_id, token, record.status, record)
        return int(await self._batched.call(self._script["finish"], [], args))

    def _finish_args(
        self, job_id: str, token: str, status: Status, record: ResultRecord | None
    ) -> list[Any]:
        u = record.usage if record else Usage()
        return [
            job_id,
            token,
            status.value,
            record.model_dump_json() if record else "",
            u.requests,
            u.input_tokens,
            u.output_tokens,
            u.total_tokens,
            repr(float(record.cost_usd if record else 0.0)),
            (record.finished_at if record else None) or now_iso(),
            (record.model if record else None) or "",
        ]

    # -- housekeeping ----------------------------------------------------------------------

    async def trim_index(self, limit: int = 100) -> int:
        """Drop batches older than the TTL whose keys are gone from the batch index."""
        cutoff = now_ms() - self.ttl * 1000
        old = await self.redis.zrangebyscore(keys.BATCHES, "-inf", cutoff, start=0, num=limit)
        if not old:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for b in old:
                pipe.exists(keys.batch(_s(b) or ""))
            alive = await pipe.execute()
        gone = [b for b, a in zip(old, alive, strict=True) if not a]
        if gone:
            await self.redis.zrem(keys.BATCHES, *gone)
        return len(gone)
