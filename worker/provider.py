"""The worker's one pooled model provider: one AsyncOpenAI client for the Router per process,
its connection pool sized to the concurrency, Model objects cached per name, and a bound on the
model calls in flight (around the call itself, not around get_model)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx2
import structlog
from agents import Model, ModelProvider, ModelTracing
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from openai import AsyncOpenAI, DefaultAioHttpClient
from openai._vendor.httpx_aiohttp import AiohttpTransport

from producer.models import Attempt, Usage

from . import metrics
from .baton import current_hold
from .breaker import MAX_HOLDS, OUTAGE_KINDS, Breakers
from .errors import classify, retry_after
from .ratelimit import Budget, RateLimiter, estimate_tokens
from .retry import RetryPolicy

log = structlog.get_logger("agentq.provider")

APP_NAME = "agentq"
MAX_CACHED_MODELS = 256
MAX_FREE_429S = 10
"""429s of one call under a budget that spend none of its tries (each moves the fleet's turns
later instead); past them, tries are spent as usual."""
COST_HEADERS = ("x-llm-response-cost", "x-litellm-response-cost")


@dataclass
class CallMeter:
    """What one job's model calls did; one per job, found through a context variable."""

    cost_usd: float = 0.0
    priced_by_router: bool = False
    """Whether the last response carried the Router's cost header."""
    attempts: list[Attempt] = field(default_factory=list)
    """Failed model calls (and the runner's per-model outcomes), in order."""
    usage: Usage = field(default_factory=Usage)
    """Tokens of every answered call: failed runs and fallbacks included, as cost is."""
    job_id: str = ""
    can_fall_back: bool = False
    """The model being tried has a fallback after it (a down model is then skipped at once)."""
    deadline: asyncio.Timeout | None = None
    """The job's timeout; waiting out an outage or for a budget's turn pushes it back."""
    router_reset_s: float | None = None
    """Set by the last response: the Router's budget is spent for this long (x-ratelimit-*)."""

    _off: int = field(default=0, repr=False)
    """Waits in progress that hold the job's timeout off (parallel calls may wait at once)."""
    _off_since: float = field(default=0.0, repr=False)
    _off_when: float = field(default=0.0, repr=False)

    @contextlib.contextmanager
    def off_the_clock(self) -> Iterator[None]:
        """Time spent in here (an outage, a budget's turn) does not count against the job's
        timeout: it is off meanwhile, and pushed back by the wait afterwards. Waits that
        overlap (parallel calls of one run) push it back once, by the union of their spans:
        the first to start stops the timeout, the last to end restarts it."""
        deadline = self.deadline
        if deadline is None:
            yield
            return
        if self._off == 0:
            when = deadline.when()
            if when is None:  # no timeout running (or it is ending): nothing to hold off
                yield
                return
            deadline.reschedule(None)
            self._off_since, self._off_when = time.monotonic(), when
        self._off += 1
        try:
            yield
        finally:
            self._off -= 1
            if self._off == 0:
                with contextlib.suppress(RuntimeError):  # the job's timeout already ended
                    deadline.reschedule(self._off_when + time.monotonic() - self._off_since)


current_meter: ContextVar[CallMeter | None] = ContextVar("agentq_call_meter", default=None)


async def _on_response(response: httpx2.Response) -> None:
    meter = current_meter.get()
    if meter is None:
        return
    meter.priced_by_router = False
    if response.status_code < 400:
        meter.router_reset_s = retry_after(response.headers)
    for name in COST_HEADERS:
        value = response.headers.get(name)
        if value:
            try:
                meter.cost_usd += float(value)
                meter.priced_by_router = True
            except ValueError:
                pass
            break


class RouterModel(OpenAIChatCompletionsModel):
    """Chat-completions model that waits for a call slot, retries retryable failures by the
    policy, and logs and meters each call."""

    def __init__(
        self,
        label: str,
        name: str,
        route: Route,
        slots: asyncio.Semaphore,
        policy: RetryPolicy,
        price: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(model=name, openai_client=route.client)
        self.model_name = name
        """The name sent to the Router."""
        self.label = label
        """The name the job used, e.g. "backup:gpt-4o"."""
        self.metric_label = metrics.model_label(label)
        self.route = route
        self._slots = slots
        self._policy = policy
        self._price = price
        """USD per million input and output tokens, for Routers that send no cost header."""
        self.breakers: Breakers | None = None
        self.limiter: RateLimiter | None = None
        self.budgets: tuple[Budget, ...] = ()
        """The budgets this model's calls take turns under (none: no Redis command)."""
        self.generation_spans = True
        """Whether the SDK makes a generation span per call (False: no trace processor reads
        them; the job log keeps agent and tool spans only)."""

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        """The call, with the running job's turn at the CPU given away while it waits (the
        answer's arrival takes a turn again: worker/baton.py)."""
        hold = current_hold.get()
        if hold is None:
            return await self._get_response(*args, **kwargs)
        hold.give()
        try:
            response = await self._get_response(*args, **kwargs)
        except Exception:
            await hold.take()
            raise
        await hold.take()
        return response

    async def _get_response(self, *args: Any, **kwargs: Any) -> Any:
        """Tries spent count failures of this call. Outage failures (connection, 5xx,
        timeout) are the exception: one that finds (or opens) its dependency's breaker open
        spends nothing, the call waits for the breaker instead; and a last try is not given
        up while the dependency is failing for other jobs too (its breaker is about to open).
        Under a budget (AGENTQ_RATE_LIMITS) each send waits for its turn first, and a 429 slows
        the whole fleet down and takes a new turn, spending no try (MAX_FREE_429S times)."""
        meter = current_meter.get()
        breakers, limiter = self.breakers, self.limiter if self.budgets else None
        spent = held = refused = 0
        if not self.generation_spans and "tracing" in kwargs:  # the SDK passes it by name
            kwargs["tracing"] = ModelTracing.DISABLED
        while True:
            if breakers is not None and await breakers.wait(
                self.route, self.model_name, meter, self._probe
            ):
                held += 1
            turn = (
                await limiter.take(self.budgets, self._estimate(args, kwargs), meter)
                if limiter is not None
                else None
            )
            start, began = time.perf_counter(), breakers.clock() if breakers else 0.0
            try:
                async with self._slots:
                    response = await super().get_response(*args, **kwargs)
            except Exception as exc:
                ms = round((time.perf_counter() - start) * 1000, 1)
                failure = classify(exc, router_url=self.route.url, model=self.label)
                kind = failure.error.type
                metrics.CALL_SECONDS.labels(self.metric_label, "error").observe(ms / 1000)
                log.info("model_call", model=self.label, ok=False, latency_ms=ms, error_type=kind)
                if meter is not None:
                    meter.attempts.append(
                        Attempt(
                            model=self.label,
                            ok=False,
                            ms=round(ms),
                            router=self.route.name,
                            error=kind,
                        )
                    )
                if limiter is not None and turn is not None:
                    await limiter.settle(turn, 0)
                    if kind == "rate_limited":  # the whole fleet slows down, not just this call
                        await limiter.slow_down(turn, failure.retry_after_s, refused=True)
                        if refused < MAX_FREE_429S:
                            refused += 1
                            continue  # a new turn, no try spent
                outage = OUTAGE_KINDS.get(kind) if breakers is not None else None
                if outage is not None and breakers is not None and held < MAX_HOLDS:
                    field = breakers.fields(self.route.name, self.model_name)[outage == "model"]
                    job = meter.job_id if meter is not None else ""
                    if await breakers.failed(field, job, failure.error.message):
                        continue  # not the job's fault: wait for the breaker, spend no try
                    streak, limits = breakers.streak(field), breakers.thresholds(field)
                    if (
                        spent + 1 >= self._policy.max_attempts
                        and streak is not None
                        and streak.shared(limits)
                        and breakers.clock() - streak.start < 4 * limits.seconds
                    ):
                        spent -= 1  # not the last try yet: the breaker may be opening
                spent += 1
                if not failure.error.retryable or spent >= self._policy.max_attempts:
                    raise
                delay = self._policy.delay(spent - 1, failure.retry_after_s)
                metrics.RETRIES.labels(self.metric_label, kind).inc()
                log.info(
                    "retry.wait",
                    model=self.label,
                    attempt=spent + 1,
                    delay_s=round(delay, 3),
                    error_type=kind,
                )
                await asyncio.sleep(delay)
                continue
            if breakers is not None and (breakers.view or breakers.streaks):
                await breakers.succeeded(
                    *breakers.fields(self.route.name, self.model_name), began=began
                )
            self._record(response, time.perf_counter() - start, meter)
            if limiter is not None and turn is not None:
                await limiter.settle(turn, response.usage.total_tokens)
                if meter is not None and meter.router_reset_s:
                    await limiter.slow_down(turn, meter.router_reset_s, refused=False)
            return response

    def _estimate(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """The call's tokens before it is sent, when a token budget needs them."""
        return _estimate(args, kwargs) if any(b.tpm for b in self.budgets) else 0

    async def _probe(self) -> None:
        """The smallest call that proves the model answers (a breaker's probe)."""
        await self.route.client.chat.completions.create(
            model=self.model_name, messages=[{"role": "user", "content": "ping"}], max_tokens=1
        )

    def _record(self, response: Any, seconds: float, meter: CallMeter | None) -> None:
        u = response.usage
        if meter is not None and not meter.priced_by_router and self._price is not None:
            meter.cost_usd += (
                u.input_tokens * self._price[0] + u.output_tokens * self._price[1]
            ) / 1_000_000
        if meter is not None:
            mu = meter.usage
            mu.requests += 1
            mu.input_tokens += u.input_tokens
            mu.output_tokens += u.output_tokens
            mu.total_tokens += u.total_tokens
        metrics.CALL_SECONDS.labels(self.metric_label, "ok").observe(seconds)
        metrics.TOKENS.labels(self.metric_label, "input").inc(u.input_tokens)
        metrics.TOKENS.labels(self.metric_label, "output").inc(u.output_tokens)
        log.info(
            "model_call",
            model=self.label,
            ok=True,
            latency_ms=round(seconds * 1000, 1),
            input_tokens=u.input_tokens,
            output_tokens=u.output_tokens,
            total_tokens=u.total_tokens,
        )


def _estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The token estimate of a get_response call (its arguments as the SDK passes them)."""
    names = ("system_instructions", "input", "model_settings", "tools")
    given = dict(zip(names, args, strict=False)) | kwargs
    settings = given.get("model_settings")
    return estimate_tokens(
        given.get("system_instructions"),
        given.get("input", ""),
        given.get("tools") or (),
        getattr(settings, "max_tokens", None),
    )


@dataclass(frozen=True)
class Route:
    """One Router: its name ("default" for HANZO_ROUTER_URL), URL and pooled client."""

    name: str
    url: str
    client: AsyncOpenAI


class FreshContextConnector(aiohttp.TCPConnector):
    """aiohttp's connector, but it opens connections in an empty context.

    asyncio gives a socket's reader callback a copy of the context current when the connection
    was opened. A pooled connection outlives the job that opened it, so each of a busy worker's
    C connections kept a finished job's context alive (its meter, its log events, the SDK's run
    objects: about 3 KB a connection, measured at C=500), and ran its callbacks in that job's
    context. (aiohttp's keep-alive clean-up timer still keeps the context of the job that first
    gave a connection back: one per client.) Overrides aiohttp's _create_connection:
    tests/test_router_client.py fails if aiohttp moves it."""

    async def _create_connection(
        self, req: Any, traces: list[Any], timeout: aiohttp.ClientTimeout
    ) -> Any:
        opening = asyncio.get_running_loop().create_task(
            super()._create_connection(req, traces, timeout), context=contextvars.Context()
        )
        try:
            return await opening  # a cancel here cancels the opening too
        except asyncio.CancelledError:
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                opening.result().close()  # opened just as we were cancelled: not leaked
            raise


class RouterTransport(AiohttpTransport):
    """The aiohttp transport with FreshContextConnector (otherwise as the vendored one builds
    its session: a pool of `limits.max_connections`, their keep-alive, its TLS context; a
    proxy goes with each request)."""

    def get_client(self) -> aiohttp.ClientSession:
        connector = FreshContextConnector(
            limit=self.limits.max_connections or 0,
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
        )
        return aiohttp.ClientSession(connector=connector)


_HTTPX_LIMITS = httpx2.Limits(max_connections=100, max_keepalive_connections=20)
"""httpx's default, for the signatures below (httpx passes the client's own)."""


class RouterHttpClient(DefaultAioHttpClient):
    """openai's aiohttp client (its defaults; HTTP(S)_PROXY and NO_PROXY from the environment)
    with RouterTransport for direct and proxied requests alike."""

    def _init_transport(
        self,
        verify: Any = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx2.Limits = _HTTPX_LIMITS,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> httpx2.AsyncBaseTransport:
        if transport is not None:
            return transport
        return RouterTransport(verify, cert, trust_env, http1, http2, limits)

    def _init_proxy_transport(
        self,
        proxy: httpx2.Proxy,
        verify: Any = True,
        cert: Any = None,
        trust_env: bool = True,
        http1: bool = True,
        http2: bool = False,
        limits: httpx2.Limits = _HTTPX_LIMITS,
    ) -> httpx2.AsyncBaseTransport:
        return RouterTransport(verify, cert, trust_env, http1, http2, limits, proxy=proxy)


def router_client(url: str, api_key: str, concurrency: int, call_timeout_s: float) -> AsyncOpenAI:
    """The worker's pooled client for one Router (the bench's best plain loop uses it too)."""
    # The SDK's own retries are off: agentq's runner is the one retry layer. The aiohttp
    # transport is leaner than httpx's; its pool is sized to the concurrency, not 100/20.
    return AsyncOpenAI(
        base_url=url,
        api_key=api_key or "unset",
        max_retries=0,
        timeout=call_timeout_s,
        default_headers={"X-App-Name": APP_NAME},
        http_client=RouterHttpClient(
            limits=httpx2.Limits(
                max_connections=concurrency, max_keepalive_connections=concurrency
            ),
            timeout=call_timeout_s,
            event_hooks={"response": [_on_response]},
        ),
    )


class RouterProvider(ModelProvider):
    """A plain ModelProvider: synchronous get_model returning a cached model on a pooled client.
    "name:model" picks a named Router (AGENTQ_ROUTERS); anything else goes to the default."""

    def __init__(
        self,
        routers: dict[str, tuple[str, str]],
        *,
        concurrency: int,
        max_calls: int,
        call_timeout_s: float,
        policy: RetryPolicy | None = None,
        prices: dict[str, tuple[float, float]] | None = None,
        generation_spans: bool = True,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self.prices = prices or {}
        self.routes = {
            name: Route(name, url, router_client(url, key, concurrency, call_timeout_s))
            for name, (url, key) in routers.items()
        }
        self._slots = asyncio.Semaphore(max_calls)
        self._models: dict[str, RouterModel] = {}
        self.generation_spans = generation_spans
        """Whether model calls make the SDK's generation spans (only OTLP export uses them)."""
        self.breakers: Breakers | None = None
        """The fleet's circuit breakers (set by the worker; None: calls never wait)."""
        self.limiter: RateLimiter | None = None
        """The fleet's budgets (set by the worker when AGENTQ_RATE_LIMITS has any)."""

    @property
    def base_url(self) -> str:
        return self.routes["default"].url

    def route(self, model_name: str) -> tuple[Route, str]:
        """The Router a model name goes to, and the model name to send it."""
        prefix, sep, rest = model_name.partition(":")
        if sep and prefix in self.routes and rest:
            return self.routes[prefix], rest
        return self.routes["default"], model_name

    def get_model(self, model_name: str | None) -> Model:
        if not model_name:
            # Never let the SDK pick its default model: a job always names one.
            raise ValueError("no model given: agentq always sets the model explicitly")
        model = self._models.get(model_name)
        if model is None:
            if len(self._models) >= MAX_CACHED_MODELS:  # jobs may name any model: bound it
                self._models.pop(next(iter(self._models)))
            route, name = self.route(model_name)
            price = self.prices.get(model_name) or self.prices.get(name)
            model = self._models[model_name] = RouterModel(
                model_name, name, route, self._slots, self.policy, price
            )
            model.breakers = self.breakers
            model.generation_spans = self.generation_spans
            if self.limiter is not None:
                model.limiter = self.limiter
                model.budgets = self.limiter.budgets_for(model_name, route.name)
        return model

    async def aclose(self) -> None:
        for route in self.routes.values():
            await route.client.close()
