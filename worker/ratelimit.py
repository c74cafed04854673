"""Router budgets (AGENTQ_RATE_LIMITS), held by every worker on one Redis together.

Each model call takes a turn before it is sent: one Lua script, on Redis's clock, reserves one
request and the call's estimated tokens under every budget that applies to it (GCRA: a
schedule, not a counter) and says how long to sleep until that turn. Turns are spaced evenly:
requests get no burst at all and tokens one second's worth, because Routers enforce a minute's
limit over shorter windows. The token estimate (input size and max_tokens) is corrected with
the response's usage. A call waits for its turn, off the job's timeout; it never fails for want
of one.

The Router's own word wins over the budget: a 429 (its retry-after) moves every turn already
given out later by that much, in every worker (each hears of it on the control channel, so a
call asleep until its turn sleeps the difference before it is sent), and a spent x-ratelimit
budget holds back new turns until its reset."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from producer import keys
from producer.connect import RETRY_ON, Script
from producer.settings import RateLimit

from . import metrics

if TYPE_CHECKING:
    from .provider import CallMeter

log = structlog.get_logger("agentq.ratelimit")

DEFAULT_PAUSE_S = 1.0
"""How long a 429 without any retry-after hint holds the budget back."""
REDIS_RETRY_S = 1.0
"""A turn that Redis could not give is asked for again this much later (never skipped)."""

_STATE = """
-- A budget's state as stored, or a fresh one: the hash is anyone's to write, and a field that
-- is not this JSON (or holds no number where one belongs) must not fail every call.
local FIELDS = {'rpm', 'tpm', 'tr', 'tt', 'slow', 'shift', 'm', 'r', 't', 'pr', 'pt', 'seen'}
local function state(raw)
  local ok, d = pcall(cjson.decode, raw or '')
  local s = {}
  if ok and type(d) == 'table' then
    for _, k in ipairs(FIELDS) do
      local v = type(d[k]) == 'number' and d[k] or nil
      if v and v == v and v ~= math.huge and v ~= -math.huge then s[k] = v end
    end
  end
  return s
end
"""

_TAKE = """
-- Take a turn under every budget named: one request and ARGV[1] tokens each, at the earliest
-- time all of them allow, reserved now (the caller sleeps until then). GCRA on Redis's clock,
-- times in ms: `tr` and `tt` are when each schedule is next free (requests spaced 60000/rpm
-- apart, no burst; tokens 60000/tpm each, up to one second's worth at once); no turn starts
-- before `slow` (the Router said so).
-- KEYS[1]: the budgets hash (budget name -> JSON state)
-- ARGV[1]: tokens to reserve; then for each budget: name, rpm, tpm (0: no such limit)
-- Returns {ms to wait, the turn (Redis ms), then each budget's shift: ms the Router's 429s
-- have moved its turns so far}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tokens = tonumber(ARGV[1])
local names, states, at = {}, {}, now
for i = 2, #ARGV, 3 do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local s = state(raw)
  s.rpm, s.tpm = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  at = math.max(at, s.slow or 0)
  names[#names + 1], states[#states + 1] = ARGV[i], s
end
for _, s in ipairs(states) do
  if s.rpm > 0 then at = math.max(at, s.tr or 0) end
  if s.tpm > 0 then
    local cost = math.min(tokens * 60000 / s.tpm, 1000)
    at = math.max(at, (s.tt or 0) + cost - 1000)
  end
end
local minute = math.floor(now / 60000)
local out = {math.ceil(at - now), math.floor(at)}
for k, s in ipairs(states) do
  if s.rpm > 0 then s.tr = math.max(s.tr or 0, at) + 60000 / s.rpm end
  if s.tpm > 0 then s.tt = math.max(s.tt or 0, at) + tokens * 60000 / s.tpm end
  if s.m ~= minute then
    if s.m == minute - 1 then s.pr, s.pt = s.r, s.t else s.pr, s.pt = 0, 0 end
    s.m, s.r, s.t = minute, 0, 0
  end
  s.r, s.t, s.seen = s.r + 1, s.t + tokens, now
  redis.call('HSET', KEYS[1], names[k], cjson.encode(s))
  out[#out + 1] = s.shift or 0
end
return out
"""

_SLOW = """
-- The Router said to wait ARGV[1] ms: no new turn under these budgets starts before then.
-- With ARGV[2] = 1 (a 429) the turns already given out (calls sleeping until theirs) move
-- later too, by as much as this wait reaches past the last one: the budget's shift grows by
-- that, and every worker adds the growth to its sleeping calls' waits. The workers hear of it
-- at once on their control channel: "budgets {name: shift, ...}".
-- KEYS[1]: the budgets hash; KEYS[2]: the workers' control channel (pub/sub)
-- ARGV[1]: ms from now; ARGV[2]: 1 to move given turns; ARGV[3...]: budget names
-- Returns each budget's shift (ms)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local till = now + tonumber(ARGV[1])
local out, grown, moved = {}, {}, false
for i = 3, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  local shift = 0
  if raw then
    local s = state(raw)
    local from = math.max(now, s.slow or 0)
    if till > from then
      if ARGV[2] == '1' and ((s.tr or 0) > now or (s.tt or 0) > now) then
        local extra = math.ceil(till - from)
        s.shift = (s.shift or 0) + extra
        if (s.tr or 0) > now then s.tr = s.tr + extra end
        if (s.tt or 0) > now then s.tt = s.tt + extra end
        grown[ARGV[i]], moved = s.shift, true
      end
      s.slow = till
      redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(s))
    end
    shift = s.shift or 0
  end
  out[#out + 1] = shift
end
if moved then redis.call('PUBLISH', KEYS[2], 'budgets ' .. cjson.encode(grown)) end
return out
"""

_SETTLE = """
-- Correct a call's token estimate: ARGV[1] tokens more (or, negative, fewer) than reserved.
-- KEYS[1]: the budgets hash; ARGV[2...]: budget names
-- Returns the number of budgets corrected
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local delta = tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    local s = state(raw)
    if (s.tpm or 0) > 0 then
      local ms = delta * 60000 / s.tpm
      if delta > 0 then s.tt = math.max(s.tt or 0, now) + ms else s.tt = (s.tt or 0) + ms end
      s.t = math.max(0, (s.t or 0) + delta)
      redis.call('HSET', KEYS[1], ARGV[i], cjson.encode(s))
      n = n + 1
    end
  end
end
return n
"""

_TAKE, _SLOW, _SETTLE = (_STATE + script for script in (_TAKE, _SLOW, _SETTLE))


@dataclass(frozen=True)
class Budget:
    name: str
    """As AGENTQ_RATE_LIMITS writes it: "gpt-4o", "backup:gpt-4o", "*", "backup:*"."""
    rpm: float
    """0: no request limit."""
    tpm: float
    """0: no token limit."""


@dataclass
class Turn:
    """One call's turn under its budgets: what it reserved, and the shifts it has slept."""

    budgets: tuple[Budget, ...]
    tokens: int
    shifts: list[int]
    waited_s: float = 0.0


@dataclass
class RateLimiter:
    """This worker's side of the fleet's budgets."""

    redis: Any
    limits: dict[str, RateLimit]
    max_pause_s: float = 30.0
    """A Router's retry-after holds the budget back at most this long (AGENTQ_BACKOFF_MAX_S)."""
    shifts: dict[str, int] = field(default_factory=dict)
    """The last shift this worker heard of, per budget (from any reply)."""

    def __post_init__(self) -> None:
        self._take = Script(self.redis, _TAKE)
        self._slow = Script(self.redis, _SLOW)
        self._settle = Script(self.redis, _SETTLE)

    def budgets_for(self, label: str, router: str) -> tuple[Budget, ...]:
        """The budgets a model's calls take turns under: the model's own (by the name jobs
        use) and its Router's "*" budget."""
        names = [label, "*" if router == "default" else f"{router}:*"]
        return tuple(
            Budget(n, self.limits[n].rpm or 0.0, self.limits[n].tpm or 0.0)
            for n in names
            if n in self.limits
        )

    async def take(self, budgets: tuple[Budget, ...], tokens: int, meter: CallMeter | None) -> Turn:
        """Wait for this call's turn (off the job's timeout)."""
        tokens = tokens if any(b.tpm for b in budgets) else 0
        args: list[Any] = [tokens]
        for b in budgets:
            args += [b.name, b.rpm, b.tpm]
        started = time.monotonic()
        while True:
            try:
                reply = await self._take(keys=[keys.BUDGETS], args=args)
                break
            except tuple(RETRY_ON) as exc:  # Redis away: ask again; a call never skips its turn
                log.warning("ratelimit.redis_failed", error=str(exc), retry_in_s=REDIS_RETRY_S)
                await self._sleep(REDIS_RETRY_S, meter)
        wait_s, shifts = int(reply[0]) / 1000, [int(x) for x in reply[2:]]
        turn = Turn(budgets, tokens, shifts)
        self._heard(budgets, shifts)
        if wait_s > 0:
            await self._sleep(wait_s, meter)
            while (moved := self._moved(turn)) > 0:  # a 429 moved the turns given out
                await self._sleep(min(moved, self.max_pause_s), meter)
        turn.waited_s = time.monotonic() - started
        metrics.RATELIMIT_WAIT.labels(budgets[0].name).observe(turn.waited_s)
        if wait_s > 0:
            log.info(
                "ratelimit.wait",
                budget=[b.name for b in budgets],
                waited_s=round(turn.waited_s, 3),
            )
        return turn

    async def settle(self, turn: Turn, used_tokens: int) -> None:
        """Correct the token estimate with what the call used (0 for a failed call)."""
        delta = used_tokens - turn.tokens
        names = [b.name for b in turn.budgets if b.tpm]
        if not names or delta == 0:
            return
        try:
            await self._settle(keys=[keys.BUDGETS], args=[delta, *names])
        except Exception as exc:  # a lost correction only skews the next second's pace
            log.warning("ratelimit.redis_failed", error=str(exc))

    async def slow_down(self, turn: Turn, seconds: float | None, *, refused: bool) -> None:
        """The Router said to wait: a 429 (`refused`; retry-after `seconds`) moves every turn
        given out; a spent x-ratelimit budget (its reset in `seconds`) holds back new ones."""
        ms = round(min(DEFAULT_PAUSE_S if seconds is None else seconds, self.max_pause_s) * 1000)
        if ms <= 0:
            return
        names = [b.name for b in turn.budgets]
        try:
            shifts = await self._slow(
                keys=[keys.BUDGETS, keys.CONTROL], args=[ms, int(refused), *names]
            )
        except Exception as exc:
            log.warning("ratelimit.redis_failed", error=str(exc))
            return
        self._heard(turn.budgets, [int(x) for x in shifts])
        log.info("ratelimit.router_slow_down", budget=names, seconds=ms / 1000, refused=refused)

    def hear(self, message: str) -> None:
        """Another worker's 429 moved the turns of these budgets ("{name: shift}" from the
        control channel): calls asleep until their turns here sleep the growth too, before
        they are sent. Costs no Redis command; a message lost (a reconnect) is made up for by
        the next reply. Only ever raises a shift: a reply read before the 429 may come later."""
        try:
            grown = json.loads(message)
        except ValueError:
            return
        if not isinstance(grown, dict):
            return
        for name, shift in grown.items():
            if name in self.limits and type(shift) in (int, float) and math.isfinite(shift):
                self.shifts[name] = max(self.shifts.get(name, 0), int(shift))

    def _heard(self, budgets: Sequence[Budget], shifts: Sequence[int]) -> None:
        for b, shift in zip(budgets, shifts, strict=False):
            self.shifts[b.name] = shift

    def _moved(self, turn: Turn) -> float:
        """How much later the Router's 429s have moved this turn since it was given (the
        budgets' shifts grew); and take that as slept."""
        moved = 0
        for i, b in enumerate(turn.budgets):
            now = self.shifts.get(b.name, turn.shifts[i])
            moved = max(moved, now - turn.shifts[i])
            turn.shifts[i] = max(turn.shifts[i], now)
        return moved / 1000

    async def _sleep(self, seconds: float, meter: CallMeter | None) -> None:
        if meter is None:
            await asyncio.sleep(seconds)
            return
        with meter.off_the_clock():
            await asyncio.sleep(seconds)


CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 1_000
"""An image's tokens in an estimate, whatever its size: about a large one (gpt-4o counts a
1024x1024 image at high detail as 765, gpt-4.1 as 1,024). Its base64 text, at 4 characters a
token, reserved a hundred thousand tokens for a photo; the response's usage corrects either."""
IMAGE_PARTS = frozenset({"input_image", "image_url", "image"})
"""Content parts that carry an image (Responses and Chat Completions formats)."""


def estimate_tokens(
    instructions: str | None, items: Any, tools: Sequence[Any], max_tokens: int | None
) -> int:
    """A call's tokens, before it is sent: its text at about 4 characters a token, each image
    (or other base64 data: URL) at IMAGE_TOKENS, plus the max_tokens it allows itself (0 when
    unset: the response's usage corrects it)."""
    chars = len(instructions or "")
    images = 0
    if isinstance(items, str):
        chars += len(items)
    else:
        text = json.dumps(items, default=str)
        if "data:" in text or "image" in text:
            part_chars, images = _count(items)
            chars += part_chars
        else:
            chars += len(text)
    for tool in tools:
        chars += len(getattr(tool, "name", "")) + len(getattr(tool, "description", "") or "")
        chars += len(json.dumps(getattr(tool, "params_json_schema", None) or {}))
    return chars // CHARS_PER_TOKEN + 1 + images * IMAGE_TOKENS + (max_tokens or 0)


def _count(items: Any) -> tuple[int, int]:
    """(characters of text, images) in input items, without recursion (items may nest deep)."""
    chars = images = 0
    stack = [items]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if node.startswith("data:") and ";base64," in node[:200]:
                images += 1
            else:
                chars += len(node) + 2
        elif isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str) and kind in IMAGE_PARTS:
                images += 1
                continue
            chars += 2
            for key, value in node.items():
                chars += len(str(key)) + 6  # as JSON: "key": value,
                stack.append(value)
        elif isinstance(node, list | tuple):
            stack.extend(node)
            chars += 2 * len(node) + 2
        elif hasattr(node, "model_dump"):
            stack.append(node.model_dump(exclude_none=True))
        else:
            chars += len(json.dumps(node, default=str))
    return chars, images
