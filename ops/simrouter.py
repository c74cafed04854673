"""SIMULATED Router: a fake OpenAI-compatible gateway for tests, demos and benchmarks.

This is NOT the real Router (a LiteLLM fork). It mimics its HTTP surface closely enough for the
openai client and the OpenAI Agents SDK: ``/v1/models``, non-streaming ``/v1/chat/completions``,
LiteLLM-style health checks and error bodies, plus injectable faults (500/503/429/401/400, hang,
dropped connection) and ``/sim/*`` endpoints exposing counters and the last recorded requests
(they need the key too, when one is set).
With ``--rate-limit-rps R`` it also enforces one rate limit across all callers, as a Router's
key limit does: at most R × ``--rate-window-s`` (1 s) chat completions in any sliding window of
that length. Past it, it answers 429 with ``retry-after-ms`` / ``retry-after`` (when the next
slot frees); every answer carries ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests`` and ``x-ratelimit-reset-requests`` (again: until the next
slot frees, e.g. ``52ms``).
Answers are deterministic: arithmetic is computed, a ``calculator`` tool is called when offered,
json_schema response formats get schema-conforming JSON. A tool the user message names is
called with the whole message as its string arguments (the calculator too, when the message
holds no arithmetic): a prompt-injected model in miniature.

Run it with ``SIMROUTER_API_KEY=sk-... python -m ops.simrouter --port 4000`` (the key is read
from the environment only; without it any key is accepted) or in-process::

    async with SimRouter(SimConfig(api_key="sk-test")) as sim:
        client = AsyncOpenAI(base_url=sim.url, api_key="sk-test")
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import math
import os
import random
import re
import signal
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from worker.tools import evaluate

FAULTS = ("500", "503", "429", "401", "400", "hang", "drop")
OUTCOMES = ("ok", *FAULTS)
FAULT_MODELS = ("sim-500", "sim-503", "sim-429", "sim-hang", "sim-drop")
SPECIAL_MODELS = ("sim-flaky", "sim-bad-json", "sim-slow")
DEFAULT_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4",
    "gpt-4-turbo",
    "gpt-3.5-turbo",
    "claude-3-opus-20240229",
    "claude-3-sonnet-20240229",
    "claude-3-haiku-20240307",
    *FAULT_MODELS,
    *SPECIAL_MODELS,
)
RECORDED_REQUESTS = 200
FLAKY_MEMORY = 10_000
_ERRORS: dict[int, tuple[str, str]] = {  # status -> (type, default message)
    400: ("invalid_request_error", "Bad request (simulated)"),
    401: ("auth_error", "Authentication Error, Invalid proxy server token passed."),
    429: ("rate_limit_error", "Rate limit exceeded (simulated Router)"),
    500: ("internal_server_error", "Internal server error (simulated Router)"),
    503: ("service_unavailable", "Service unavailable (simulated Router)"),
}


@dataclass
class SimConfig:
    """Behaviour of the simulated Router."""

    api_key: str | None = None  # None: any bearer token (or none) is accepted
    models: tuple[str, ...] = DEFAULT_MODELS
    latency_ms: float = 0.0
    latency_jitter: float = 0.0
    """Each call's latency is latency_ms times a uniform draw in [1 - jitter, 1 + jitter]
    (real Routers vary; a fixed latency keeps runs that started together in step)."""
    fault_rates: dict[str, float] = field(default_factory=dict)
    retry_after_s: float = 1.0
    hang_s: float = 3600.0
    seed: int | None = None
    price_per_1k_tokens: float = 0.002
    cost_header: bool = True
    """Send x-llm-response-cost (a Router without cost tracking sends none)."""
    rate_limit_rps: float | None = None
    """Chat completions per second across all callers (None: no limit)."""
    rate_window_s: float = 1.0
    """The sliding window the rate limit is counted over."""

    def __post_init__(self) -> None:
        if not 0 <= self.latency_jitter <= 1:
            raise ValueError("the latency jitter is a fraction of the latency, from 0 to 1")
        if self.rate_limit_rps is not None and (
            self.rate_limit_rps <= 0 or self.rate_window_s <= 0
        ):
            raise ValueError("the rate limit and its window must be above 0")
        unknown = set(self.fault_rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {', '.join(FAULTS)}")
        if any(r < 0 for r in self.fault_rates.values()) or sum(self.fault_rates.values()) > 1:
            raise ValueError("fault rates must be >= 0 and sum to at most 1")


@dataclass
class SimStats:
    """Counters of the simulated Router (chat completion requests only)."""

    total_requests: int = 0
    by_model: Counter[str] = field(default_factory=Counter)
    by_outcome: Counter[str] = field(default_factory=Counter)
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECORDED_REQUESTS))
    in_flight: int = 0
    peak_in_flight: int = 0
    """Most chat completion requests being answered at once."""

    def as_dict(self) -> dict[str, Any]:
        outcomes = {o: self.by_outcome.get(o, 0) for o in OUTCOMES}
        return {
            "total_requests": self.total_requests,
            "by_model": dict(self.by_model),
            "by_outcome": outcomes,
        }

    def reset(self) -> None:
        self.total_requests = 0
        self.by_model.clear()
        self.by_outcome.clear()
        self.requests.clear()
        self.peak_in_flight = 0


# ---------------------------------------------------------------- arithmetic (no eval!)
_RUN_RE = re.compile(r"[\d\s.+\-*/()%]+")
_HAS_OP_RE = re.compile(r"[\d.)]\s*(?:\*\*|[-+*/%])\s*[-+(\s]*[\d.]")


def safe_eval(expr: str) -> float:
    """Evaluate a plain arithmetic expression with the workers' own calculator (an AST walk,
    never eval); ValueError when it is not one."""
    return evaluate(expr.strip())


def find_expression(text: str) -> tuple[str, float] | None:
    """The longest evaluable arithmetic expression in ``text`` and its value."""
    runs = sorted((m.group().strip() for m in _RUN_RE.finditer(text)), key=len, reverse=True)
    for run in runs:
        if not _HAS_OP_RE.search(run):
            continue
        for candidate in (run, run.strip("()").strip(), run.rstrip(".").strip()):
            try:
                return candidate, safe_eval(candidate)
            except (ValueError, ArithmeticError):
                continue
    return None


def format_number(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else format(value, ".12g")


# ---------------------------------------------------------------- fake data from schemas
_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "sim@example.com",
    "uri": "https://example.com/sim",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = root
        for part in str(schema["$ref"]).lstrip("#/").split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        schema = node if isinstance(node, dict) else {}
    return schema


def fake_from_schema(
    schema: dict[str, Any],
    text: str,
    number: float | None,
    root: dict[str, Any] | None = None,
    depth: int = 0,
) -> Any:
    """A value conforming to a JSON schema (objects get all their properties)."""
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if depth > 12:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [_resolve(o, root) for o in schema[key]]
            chosen = next((o for o in options if o.get("type") != "null"), options[0])
            return fake_from_schema(chosen, text, number, root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: fake_from_schema(v, text, number, root, depth + 1) for k, v in props.items()}
    if kind == "array":
        if schema.get("maxItems") == 0 or "items" not in schema:
            return []
        return [fake_from_schema(schema["items"], text, number, root, depth + 1)]
    if kind in ("integer", "number"):
        value: float = len(text) if number is None else number
        value = max(schema.get("minimum", value), min(schema.get("maximum", value), value))
        return round(value) if kind == "integer" else value
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    if schema.get("format") in _FORMATS:
        return _FORMATS[schema["format"]]
    short = (text.strip()[:60] or "simulated").ljust(schema.get("minLength", 0), ".")
    return short[: schema.get("maxLength", len(short))]


def _tool_arguments(parameters: dict[str, Any], text: str) -> dict[str, Any]:
    defaults = {
        "string": text,
        "integer": 1,
        "number": 1,
        "boolean": True,
        "array": [],
        "object": {},
    }
    args: dict[str, Any] = {}
    for name, prop in parameters.get("properties", {}).items():
        prop = _resolve(prop, parameters)
        if "anyOf" in prop:
            prop = next((o for o in prop["anyOf"] if o.get("type") != "null"), prop["anyOf"][0])
        kind = prop.get("type", "string")
        args[name] = defaults.get(kind if isinstance(kind, str) else kind[0], text)
    return args


# ---------------------------------------------------------------- answers
def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def build_message(body: dict[str, Any]) -> dict[str, Any]:
    """The deterministic assistant message for a chat completion request body."""
    messages: list[dict[str, Any]] = body.get("messages") or []
    text = next(
        (_content_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    fmt = body.get("response_format") or {}
    schema = (
        (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else None
    )
    tools = {
        t["function"]["name"]: t["function"]
        for t in body.get("tools") or []
        if t.get("type") == "function" and "function" in t
    }
    if body.get("tool_choice") == "none":
        tools = {}
    found = find_expression(text)

    if messages and messages[-1].get("role") == "tool":
        result = _content_text(messages[-1].get("content"))
        expr = _tool_call_expression(messages, messages[-1].get("tool_call_id"))
        if schema is not None:
            number = _to_number(result)
            return _text_message(json.dumps(fake_from_schema(schema, result, number)))
        return _text_message(f"The result of {expr} is {result}." if expr else result)
    if "calculator" in tools and found:
        return _tool_message("calculator", {"expression": found[0]})
    lowered = text.lower()
    for name, tool in tools.items():  # as a prompt-injected model would: the whole text
        if name.lower() in lowered:
            return _tool_message(name, _tool_arguments(tool.get("parameters") or {}, text))
    if schema is not None:
        return _text_message(json.dumps(fake_from_schema(schema, text, found and found[1])))
    answer = format_number(found[1]) if found else f"Simulated answer to: {text[:200]}"
    if fmt.get("type") == "json_object":
        return _text_message(json.dumps({"answer": answer}))
    return _text_message(answer)


def _to_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        found = find_expression(text)
        return found[1] if found else None


def _tool_call_expression(messages: list[dict[str, Any]], call_id: str | None) -> str | None:
    for message in reversed(messages):
        for call in message.get("tool_calls") or []:
            if call.get("id") == call_id:
                try:
                    args = json.loads(call["function"]["arguments"])
                except (KeyError, TypeError, ValueError):
                    return None
                expr = args.get("expression") if isinstance(args, dict) else None
                return str(expr) if expr is not None else None
    return None


def _text_message(content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def _tool_message(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    call = {
        "id": f"call_{os.urandom(12).hex()}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call]}


# ---------------------------------------------------------------- HTTP server
def error_response(
    status: int, message: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    kind, default = _ERRORS[status]
    error = {"message": message or default, "type": kind, "param": None, "code": str(status)}
    return web.json_response({"error": error}, status=status, headers=headers)


class _SimState:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.stats = SimStats()
        self.models = frozenset(config.models)
        self.rng = random.Random(config.seed)
        # its own sequence: a seeded fault sequence is the same with or without jitter
        self.jitter_rng = random.Random(None if config.seed is None else config.seed + 1)
        self.flaky_seen: dict[str, None] = {}  # insertion-ordered, bounded
        self.rates = sorted(config.fault_rates.items())
        self.outages: dict[str, tuple[str, float]] = {}
        """model -> (fault, monotonic deadline): the model answers only that fault until then."""
        self.admitted: deque[float] = deque()
        """When the requests inside the rate limit's window were admitted (monotonic)."""

    def rate_limit(self) -> tuple[bool, dict[str, str]]:
        """Admit a request under the rate limit or not, and the x-ratelimit-* headers."""
        rps = self.config.rate_limit_rps
        if rps is None:
            return True, {}
        span = self.config.rate_window_s
        limit = max(1, int(rps * span))
        now, window = time.monotonic(), self.admitted
        while window and window[0] <= now - span:
            window.popleft()
        admit = len(window) < limit
        if admit:
            window.append(now)
        free_in = max(0.0, window[0] + span - now) if len(window) >= limit else 0.0
        headers = {
            "x-ratelimit-limit-requests": str(limit),
            "x-ratelimit-remaining-requests": str(limit - len(window)),
            "x-ratelimit-reset-requests": f"{math.ceil(free_in * 1000)}ms",
        }
        if not admit:
            headers["retry-after-ms"] = str(math.ceil(free_in * 1000))
            headers["retry-after"] = str(math.ceil(free_in))
        return admit, headers

    def authorized(self, request: web.Request) -> bool:
        if self.config.api_key is None:
            return True
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.config.api_key.encode())

    def unauthorized(self, request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not given:
            return error_response(401, "Authentication Error, No api key passed in.")
        return error_response(
            401,
            "Authentication Error, Invalid proxy server token passed. "
            f"Received API Key = sk-...{given[-4:]}, Unable to find token in "
            "cache or `LiteLLM_VerificationTokenTable` (simulated Router)",
        )

    def pick_fault(self, request: web.Request, model: str) -> str | None:
        fault = request.headers.get("x-sim-fault")
        if fault:
            return fault
        outage = self.outages.get(model)
        if outage is not None:
            if time.monotonic() < outage[1]:
                return outage[0]
            del self.outages[model]
        if model in FAULT_MODELS:
            return model[4:]
        if self.rates:
            draw, cumulative = self.rng.random(), 0.0
            for name, rate in self.rates:
                cumulative += rate
                if draw < cumulative:
                    return name
        return None

    def flaky_first_time(self, messages: Any) -> bool:
        key = hashlib.blake2b(json.dumps(messages, sort_keys=True).encode(), digest_size=16)
        digest = key.hexdigest()
        if digest in self.flaky_seen:
            return False
        self.flaky_seen[digest] = None
        if len(self.flaky_seen) > FLAKY_MEMORY:
            del self.flaky_seen[next(iter(self.flaky_seen))]
        return True

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        try:
            return await self._chat_completions(request)
        finally:
            stats.in_flight -= 1

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.total_requests += 1
        if not self.authorized(request):
            stats.by_outcome["401"] += 1
            return self.unauthorized(request)
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
        except ValueError as exc:
            stats.by_outcome["400"] += 1
            return error_response(400, f"Invalid JSON body: {exc}")
        model = str(body.get("model"))
        stats.by_model[model] += 1
        headers = {
            k.lower(): v
            for k, v in request.headers.items()
            if k.lower() not in ("authorization", "api-key", "x-api-key")
        }
        auth = request.headers.get("authorization", "")
        stats.requests.append(
            {
                "headers": headers,
                "body": body,
                "at": time.monotonic(),
                # whether the Router key arrived, never the key itself
                "key_ok": auth == f"Bearer {self.config.api_key}" if self.config.api_key else None,
            }
        )
        if body.get("stream"):
            stats.by_outcome["400"] += 1
            return error_response(400, "streaming is not supported by the simulated Router")
        if model not in self.models:
            stats.by_outcome["400"] += 1
            return error_response(
                400,
                f"Invalid model name passed in model={model}. Call "
                "`/v1/models` to view available models for your key.",
            )
        admitted, limit_headers = self.rate_limit()
        if not admitted:
            stats.by_outcome["429"] += 1
            return error_response(429, "Rate limit exceeded: too many requests", limit_headers)
        fault = self.pick_fault(request, model)
        if fault is None and model == "sim-flaky" and self.flaky_first_time(body.get("messages")):
            fault = "500"
        if fault is not None and fault not in FAULTS:
            stats.by_outcome["400"] += 1
            return error_response(400, f"unknown x-sim-fault {fault!r}; known: {FAULTS}")
        if fault is not None:
            stats.by_outcome[fault] += 1
        latency = self.config.latency_ms
        if self.config.latency_jitter:
            latency *= self.jitter_rng.uniform(
                1 - self.config.latency_jitter, 1 + self.config.latency_jitter
            )
        latency += 1000.0 if model == "sim-slow" else 0.0
        if "x-sim-latency-ms" in request.headers:
            try:
                latency += float(request.headers["x-sim-latency-ms"])
            except ValueError:
                pass
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        if fault is not None:
            return await self.act_out(request, fault)
        stats.by_outcome["ok"] += 1
        response = self.success(body, model)
        response.headers.update(limit_headers)
        return response

    async def act_out(self, request: web.Request, fault: str) -> web.StreamResponse:
        if fault == "drop":
            # Close the TCP connection without answering; aiohttp then fails quietly to write
            # the placeholder response below (a raised exception would be logged per request).
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault == "hang":
            await asyncio.sleep(self.config.hang_s)
            fault = "500"
        if fault == "429":
            after = format(self.config.retry_after_s, "g")
            headers = {"retry-after": after, "llm_provider-retry-after": after}
            return error_response(429, None, headers)
        if fault == "401":
            return self.unauthorized(request)
        return error_response(int(fault))

    def success(self, body: dict[str, Any], model: str) -> web.Response:
        message = build_message(body)
        if model == "sim-bad-json":
            message = _text_message("Sure! Here is your answer (simulated, not JSON): {oops")
        calls = message.get("tool_calls")
        produced = calls[0]["function"]["arguments"] if calls else message["content"]
        prompt_chars = sum(len(_content_text(m.get("content"))) for m in body.get("messages") or [])
        usage = {
            "prompt_tokens": max(1, prompt_chars // 4),
            "completion_tokens": max(1, len(produced) // 4),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        cost = str(usage["total_tokens"] / 1000 * self.config.price_per_1k_tokens)
        finish = "tool_calls" if calls else "stop"
        payload = {
            "id": f"chatcmpl-sim-{os.urandom(12).hex()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage,
        }
        headers = (
            {"x-llm-response-cost": cost, "x-litellm-response-cost": cost}
            if self.config.cost_header
            else {}
        )
        return web.json_response(payload, headers=headers)

    async def models_list(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return self.unauthorized(request)
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "simrouter"}
            for m in self.config.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return self.unauthorized(request)
        healthy = [{"model": m} for m in self.config.models if m not in FAULT_MODELS]
        return web.json_response({"healthy_endpoints": healthy, "unhealthy_endpoints": []})

    async def liveliness(self, request: web.Request) -> web.Response:
        return web.json_response("I'm alive!")

    async def readiness(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    # The /sim endpoints need the key too (when one is set): recorded requests hold prompts.
    async def sim_stats(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return self.unauthorized(request)
        return web.json_response(self.stats.as_dict())

    async def sim_requests(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return self.unauthorized(request)
        return web.json_response(list(self.stats.requests))

    async def sim_outage(self, request: web.Request) -> web.Response:
        """POST {"model": M, "fault": "503", "seconds": S}: model M fails so for S seconds."""
        if not self.authorized(request):
            return self.unauthorized(request)
        body = await request.json()
        model, fault = str(body.get("model")), str(body.get("fault", "503"))
        if model not in self.models or fault not in FAULTS:
            return error_response(400, f"unknown model {model!r} or fault {fault!r}")
        self.outages[model] = (fault, time.monotonic() + float(body.get("seconds", 30)))
        return web.json_response({"model": model, "fault": fault})

    async def sim_reset(self, request: web.Request) -> web.Response:
        if not self.authorized(request):
            return self.unauthorized(request)
        self.stats.reset()
        self.flaky_seen.clear()
        return web.json_response({"status": "reset"})


STATE_KEY = web.AppKey("simrouter_state", _SimState)


def create_app(config: SimConfig) -> web.Application:
    """The aiohttp application of the simulated Router."""
    state = _SimState(config)
    app = web.Application(client_max_size=32 * 1024**2)
    app[STATE_KEY] = state
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", state.chat_completions)
        app.router.add_get(f"{prefix}/models", state.models_list)
    app.router.add_get("/health", state.health)
    app.router.add_get("/health/liveliness", state.liveliness)
    app.router.add_get("/health/readiness", state.readiness)
    app.router.add_get("/sim/stats", state.sim_stats)
    app.router.add_get("/sim/requests", state.sim_requests)
    app.router.add_post("/sim/reset", state.sim_reset)
    app.router.add_post("/sim/outage", state.sim_outage)
    return app


class SimRouter:
    """Runs the simulated Router in-process: ``async with SimRouter() as sim: ... sim.url``."""

    def __init__(
        self,
        config: SimConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        access_log: bool = False,
    ) -> None:
        self.config = config or SimConfig()
        self.host, self.port = host, port
        self.app = create_app(self.config)
        self._access_log = access_log
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def stats(self) -> SimStats:
        return self.app[STATE_KEY].stats

    async def start(self) -> None:
        kwargs: dict[str, Any] = {} if self._access_log else {"access_log": None}
        runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=1.0, **kwargs)
        await runner.setup()
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.create_server((self.host, self.port), family=family, backlog=2048)
            self.port = sock.getsockname()[1]
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> SimRouter:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _parse_fault(value: str) -> tuple[str, float]:
    name, sep, rate = value.partition("=")
    if not sep or name not in FAULTS:
        raise argparse.ArgumentTypeError(f"expected NAME=RATE with NAME in {', '.join(FAULTS)}")
    return name, float(rate)


async def _serve(config: SimConfig, host: str, port: int, access_log: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with SimRouter(config, host, port, access_log=access_log) as sim:
        print(f"simulated Router listening on {sim.url}", flush=True)
        await stop.wait()


KEY_ENV = "SIMROUTER_API_KEY"
"""The key the simulator requires (unset: any key, or none, is accepted)."""


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m ops.simrouter [--port 4000] [--fault 500=0.1] ...``."""
    parser = argparse.ArgumentParser(prog="simrouter", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4000, help="0 = pick a free port")
    # The key comes from the environment only: a command line is visible to every local user.
    parser.add_argument("--api-key", help=argparse.SUPPRESS)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument(
        "--latency-jitter",
        type=float,
        default=0.0,
        metavar="F",
        help="vary each call's latency uniformly by +-F of it (0 to 1)",
    )
    parser.add_argument(
        "--fault",
        type=_parse_fault,
        action="append",
        default=[],
        metavar="NAME=RATE",
        help=f"random fault rate; NAME in {FAULTS}",
    )
    parser.add_argument("--retry-after", type=float, default=1.0, help="seconds, for 429s")
    parser.add_argument("--hang-s", type=float, default=3600.0)
    parser.add_argument(
        "--rate-limit-rps",
        type=float,
        default=None,
        metavar="R",
        help="answer 429 past R chat completions a second, across all callers",
    )
    parser.add_argument(
        "--rate-window-s", type=float, default=1.0, help="the window the rate limit counts over"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if args.api_key is not None:
        parser.error(
            "--api-key is not accepted (`ps` shows command lines to every user): "
            f"set {KEY_ENV} in the environment instead"
        )
    try:
        config = SimConfig(
            api_key=os.environ.get(KEY_ENV) or None,
            latency_ms=args.latency_ms,
            latency_jitter=args.latency_jitter,
            fault_rates=dict(args.fault),
            retry_after_s=args.retry_after,
            hang_s=args.hang_s,
            seed=args.seed,
            rate_limit_rps=args.rate_limit_rps,
            rate_window_s=args.rate_window_s,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.access_log:
        import logging

        logging.basicConfig(level=logging.INFO)
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(config, args.host, args.port, args.access_log))


if __name__ == "__main__":
    main()
