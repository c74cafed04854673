"""MCP servers on the workers: configured by name, connected once per worker process, shared by
every job, reconnected when they die.

Configuration: ``AGENTQ_MCP_SERVERS`` holds a JSON object of name -> server::

    {"files":  {"command": "python", "args": ["-m", "files_server"], "env": {"ROOT": "/data"}},
     "search": {"url": "http://127.0.0.1:9000/mcp", "headers": {"Authorization": "Bearer ..."}}}

A ``command`` server is spawned by the worker and spoken to over stdio; its environment is the
MCP SDK's safe default set (HOME, PATH, ...) plus ``env``, not the worker's environment. A
``url`` server is reached over streamable HTTP with ``headers`` on every request. ``timeout_s``
bounds the connection and every request to the server (a tool call included).

Lifecycle (see `McpPool`):

* `McpPool.start` (arq's ``on_startup``) connects every server concurrently. A server that
  cannot connect does not stop the worker: it is logged (``mcp.connect_failed``) and retried
  when a job names it, at most once per back-off window (1 s doubling to 30 s); meanwhile jobs
  naming it fail with `McpUnavailable`, saying which server is down and what to check. Jobs
  that do not name it are unaffected.
* `McpPool.servers` gives a job the connected SDK server objects. It never talks to a server:
  a server counts as lost when its session is closed (a stdio server that exited), when a call
  through it failed with a connection error (``mcp.connection_lost``), or when its owner task
  ended. A lost server is reconnected by the next job that names it; concurrent jobs share
  that one reconnection.
* `McpPool.close` (arq's ``on_shutdown``) closes every connection and stops every stdio
  server process.

Every connection is opened and closed by one long-lived task of its own (see `_own`): the
SDK's servers hold anyio cancel scopes that must be exited by the task that entered them, and
arq runs ``on_startup``, ``on_shutdown`` and each job in different tasks. These tasks run in an
empty `contextvars.Context`, so a reconnection made during a job does not inherit that job's
log context or trace.

Sharing: one SDK server object serves many jobs at once. Over stdio the MCP ``ClientSession``
multiplexes concurrent requests by JSON-RPC id; the SDK's streamable HTTP server serializes
the requests of its shared session with a lock. Either way concurrent ``call_tool`` from
different tasks is safe.

A server that dies during a run: that tool call fails, and the Agents SDK hands the error to
the model as the tool's result (its default ``failure_error_function``); the server is marked
lost and the next job reconnects it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
import structlog
from agents.exceptions import UserError
from agents.mcp import (
    MCPServer,
    MCPServerStdio,
    MCPServerStdioParams,
    MCPServerStreamableHttp,
    MCPServerStreamableHttpParams,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from producer.redact import url_secrets

from .baton import given_while_waiting
from .errors import InvalidJob

log = structlog.get_logger("agentq.mcp")

ENV_VAR = "AGENTQ_MCP_SERVERS"
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
CLOSE_TIMEOUT_S = 10.0
_CONNECTION_CLOSED = -32000  # JSON-RPC error code of mcp's MCPError "Connection closed"


class McpUnavailable(Exception):
    """A job names an MCP server this worker offers but cannot reach right now."""


class McpServerSpec(BaseModel):
    """One MCP server: a stdio ``command``, or a streamable HTTP ``url``."""

    model_config = ConfigDict(extra="forbid")

    command: str | None = None
    # args, env, url and headers may hold credentials (a --token, a database URL): they are
    # never shown; see describe() and secrets().
    args: list[str] = Field(default_factory=list, repr=False)
    env: dict[str, str] | None = Field(default=None, repr=False)
    cwd: str | None = None
    url: str | None = Field(default=None, repr=False)
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    timeout_s: float = Field(default=30, gt=0)
    cache_tools: bool = True

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError(
                "give exactly one of `command` (a server the worker starts and talks to over "
                "stdio) or `url` (a streamable HTTP server)"
            )
        if self.command is not None:
            if not self.command.strip():
                raise ValueError("`command` is empty")
            if self.headers:
                raise ValueError("`headers` go with `url`, not with `command`")
        else:
            assert self.url is not None
            wrong = [k for k in ("args", "env", "cwd") if k in self.model_fields_set]
            if wrong:
                raise ValueError(
                    f"{', '.join(f'`{k}`' for k in wrong)} go with `command`, not `url`"
                )
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"`url` must be an http(s) URL, got {_safe_url(self.url)!r}")
        return self

    @property
    def transport(self) -> Literal["stdio", "http"]:
        return "stdio" if self.command is not None else "http"

    def describe(self) -> str:
        """What the server is, for logs and messages: the program (never its args or env), or
        the URL without credentials, query or fragment (headers are never shown)."""
        if self.command is not None:
            n = len(self.args)
            more = f" with {n} argument{'s' if n != 1 else ''}" if n else ""
            return f"stdio: {shlex.quote(self.command)}{more}"
        assert self.url is not None
        return f"streamable HTTP: {_safe_url(self.url)}"

    def secrets(self) -> list[str]:
        """Configured values that may be credentials, for redaction: every arg, env value and
        header value, and the URL's password and query values."""
        found = [*self.args, *(self.env or {}).values()]
        found += [v.removeprefix("Bearer ") for v in self.headers.values()]
        found += url_secrets(self.url)
        return [s for s in found if len(s) >= MIN_SECRET_CHARS]

    def scrub(self, text: str) -> str:
        """`text` (an error from the server or its transport) without any configured value."""
        for s in sorted(self.secrets(), key=len, reverse=True):
            text = text.replace(s, "[REDACTED]")
        return text


MIN_SECRET_CHARS = 4
"""Shorter configured values (-m, -v) are not redacted: too short to be a credential, and
replacing them everywhere would garble messages (the log redactor uses the same bound)."""


def _safe_url(url: str) -> str:
    """The URL without user info, query or fragment (they may hold credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" in parts.path + parts.query + parts.fragment:  # a password with / ? or # in it
        return f"{parts.scheme}://<hidden>"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def parse_mcp_config(text: str) -> dict[str, McpServerSpec]:
    """The servers configured in ``AGENTQ_MCP_SERVERS`` (JSON); empty text means none.

    Raises ValueError naming the server and the field when the configuration is bad."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{ENV_VAR} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{ENV_VAR} must be a JSON object of server name -> server, got {type(raw).__name__}"
        )
    specs: dict[str, McpServerSpec] = {}
    for name, value in raw.items():
        if not name.strip():
            raise ValueError(f"{ENV_VAR}: a server name is empty")
        if not isinstance(value, dict):
            raise ValueError(
                f"{ENV_VAR}: server {name!r} must be an object with `command` or `url`, got "
                f"{type(value).__name__}"
            )
        try:
            specs[name] = McpServerSpec.model_validate(value)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                message = err["msg"].removeprefix("Value error, ")
                problems.append(f"{where}: {message}" if where else message)
            raise ValueError(f"{ENV_VAR}: server {name!r}: " + "; ".join(problems)) from None
    return specs


# ---------------------------------------------------------------- SDK servers that notice loss
def _is_connection_error(exc: BaseException, depth: int = 0) -> bool:
    """Whether an exception from a request means the connection itself is gone."""
    if depth > 8:
        return False
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_connection_error(e, depth + 1) for e in exc.exceptions)
    code = getattr(exc, "code", None)
    if code is None:
        code = getattr(getattr(exc, "error", None), "code", None)  # mcp 1.x McpError
    if type(exc).__name__ in ("MCPError", "McpError") and code == _CONNECTION_CLOSED:
        return True
    if isinstance(
        exc,
        anyio.ClosedResourceError | anyio.BrokenResourceError | anyio.EndOfStream | OSError,
    ):
        return True
    if any(
        c.__module__.startswith(("httpx", "httpcore")) and c.__name__ == "TransportError"
        for c in type(exc).__mro__
    ):
        return True
    if isinstance(exc, UserError) and any(
        s in str(exc) for s in ("Connection lost", "not initialized", "Could not reach")
    ):
        return True
    cause = exc.__cause__
    return cause is not None and _is_connection_error(cause, depth + 1)


class _Watched:
    """Marks the server lost when a request fails for a lost connection (mixed in before the
    SDK's server class, whose list_tools and call_tool it wraps)."""

    lost = False
    name: str

    async def list_tools(self, run_context: Any = None, agent: Any = None) -> Any:
        return await self._watch(super().list_tools(run_context, agent))  # type: ignore[misc]

    async def call_tool(
        self,
        tool_name: str,
        arguments: dict[str, Any] | None,
        meta: dict[str, Any] | None = None,
    ) -> Any:
        return await self._watch(super().call_tool(tool_name, arguments, meta))  # type: ignore[misc]

    async def _watch(self, request: Any) -> Any:
        """The request, the running job's turn at the CPU given away if it waits."""
        try:
            return await given_while_waiting(request)
        except BaseException as exc:
            if not self.lost and _is_connection_error(exc):
                self.lost = True
                log.warning(
                    "mcp.connection_lost", name=self.name, error=_error_text(exc), during="request"
                )
            raise


class _StdioServer(_Watched, MCPServerStdio):
    pass


class _HttpServer(_Watched, MCPServerStreamableHttp):
    pass


def _build(name: str, spec: McpServerSpec) -> _StdioServer | _HttpServer:
    if spec.command is not None:
        params: MCPServerStdioParams = {"command": spec.command, "args": list(spec.args)}
        if spec.env is not None:
            params["env"] = dict(spec.env)
        if spec.cwd is not None:
            params["cwd"] = spec.cwd
        return _StdioServer(
            params,
            name=name,
            cache_tools_list=spec.cache_tools,
            client_session_timeout_seconds=spec.timeout_s,
        )
    assert spec.url is not None
    http: MCPServerStreamableHttpParams = {
        "url": spec.url,
        "headers": dict(spec.headers),
        "timeout": spec.timeout_s,
    }
    return _HttpServer(
        http,
        name=name,
        cache_tools_list=spec.cache_tools,
        client_session_timeout_seconds=spec.timeout_s,
    )


def _session_closed(server: _StdioServer | _HttpServer) -> bool:
    """Best effort, no I/O: mcp's session dispatcher flags a transport that reached EOF (a
    stdio server that exited). Private attributes, so missing ones mean "don't know"."""
    if server.session is None:
        return True
    dispatcher = getattr(server.session, "_dispatcher", None)
    return getattr(dispatcher, "_closed", False) is True


def _error_text(exc: BaseException) -> str:
    """A one-line description of a (possibly grouped) exception."""
    leaves: list[str] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
            return
        if isinstance(e, TimeoutError):
            text = "timed out"
        else:
            text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if text not in leaves:
            leaves.append(text)

    walk(exc)
    return "; ".join(leaves) or type(exc).__name__


# ---------------------------------------------------------------- the pool
@dataclass
class _Slot:
    name: str
    spec: McpServerSpec
    server: _StdioServer | _HttpServer | None = None
    owner: asyncio.Task[None] | None = None
    stop: asyncio.Event | None = None
    attempt: asyncio.Task[None] | None = None
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    connects: int = 0
    tools: list[str] = field(default_factory=list)

    def usable(self) -> bool:
        server = self.server
        return (
            server is not None
            and not server.lost
            and self.owner is not None
            and not self.owner.done()
            and not _session_closed(server)
        )


class McpPool:
    """The worker's MCP servers, by name; one per worker process, shared by all jobs."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self, specs: dict[str, McpServerSpec]) -> None:
        """Connect every server, concurrently. Never raises for a server that cannot connect:
        it is logged (mcp.connect_failed) and retried when a job names it."""
        if self._slots:
            raise RuntimeError("McpPool.start was already called")
        self._slots = {name: _Slot(name, spec) for name, spec in specs.items()}
        if self._slots:
            await asyncio.gather(
                *(self._ensure(slot) for slot in self._slots.values()), return_exceptions=True
            )

    def names(self) -> list[str]:
        """The configured server names (connected or not), for the heartbeat and messages."""
        return sorted(self._slots)

    def status(self) -> dict[str, str]:
        """name -> "connected", "connecting", "lost" or "down: <error>"; no I/O."""
        out: dict[str, str] = {}
        for name, slot in sorted(self._slots.items()):
            if slot.usable():
                out[name] = "connected"
            elif slot.attempt is not None and not slot.attempt.done():
                out[name] = "connecting"
            elif slot.error is not None:
                out[name] = f"down: {slot.error}"
            else:
                out[name] = "lost"
        return out

    async def servers(self, names: list[str]) -> list[MCPServer]:
        """The connected servers a job names, reconnecting lost ones.

        Raises InvalidJob for names this worker does not offer, McpUnavailable when a server
        cannot be (re)connected."""
        unknown = [n for n in names if n not in self._slots]
        if unknown:
            offered = ", ".join(self.names()) or "none"
            raise InvalidJob(f"unknown MCP servers {unknown}; the workers offer: {offered}")
        if self._closed:
            raise McpUnavailable("MCP servers are closed: the worker is shutting down")
        wanted = list(dict.fromkeys(names))
        results = await asyncio.gather(
            *(self._ensure(self._slots[n]) for n in wanted), return_exceptions=True
        )
        problems = [r for r in results if isinstance(r, BaseException)]
        for problem in problems:
            if not isinstance(problem, McpUnavailable):
                raise problem
        if problems:
            raise McpUnavailable(" | ".join(str(p) for p in problems))
        return [r for r in results if isinstance(r, MCPServer)]

    async def close(self) -> None:
        """Close every connection and stop every stdio server; safe from any task, twice."""
        self._closed = True
        attempts = [s.attempt for s in self._slots.values() if s.attempt and not s.attempt.done()]
        for task in attempts:
            task.cancel()
        if attempts:
            await asyncio.wait(attempts)  # their outcomes are consumed by _consume
        for slot in self._slots.values():
            self._retire(slot)
        pending = set(self._retiring)
        if pending:
            _, late = await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=CLOSE_TIMEOUT_S)
        log.info("mcp.closed", servers=self.names())

    # -------------------------------------------------------------- internals
    async def _ensure(self, slot: _Slot) -> MCPServer:
        """The slot's server, connecting it if needed. Single flight: every caller waits on
        the same connection attempt (a task, so a caller being cancelled does not abort it
        and no second attempt can start meanwhile)."""
        if slot.usable():
            assert slot.server is not None
            return slot.server
        if slot.attempt is None or slot.attempt.done():
            if slot.server is not None:
                if not slot.server.lost:
                    log.warning("mcp.connection_lost", name=slot.name, during="check")
                self._retire(slot)
            if slot.failures and time.monotonic() < slot.retry_at:
                raise McpUnavailable(self._down_message(slot))
            slot.attempt = asyncio.create_task(
                self._connect(slot),
                name=f"agentq-mcp-connect:{slot.name}",
                context=contextvars.Context(),
            )
            slot.attempt.add_done_callback(_consume)
        attempt = slot.attempt
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if attempt.cancelled() and me is not None and not me.cancelling():
                # close() stopped the attempt; this caller itself was not cancelled
                raise McpUnavailable(
                    f"MCP server {slot.name!r} is closed: the worker is shutting down"
                ) from None
            raise
        if slot.server is None:  # pragma: no cover - _connect either sets it or raises
            raise McpUnavailable(self._down_message(slot))
        return slot.server

    async def _connect(self, slot: _Slot) -> None:
        server = _build(slot.name, slot.spec)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        owner = asyncio.create_task(
            _own(server, ready, stop), name=f"agentq-mcp:{slot.name}"
        )  # the current context is the attempt's empty one
        try:
            async with asyncio.timeout(slot.spec.timeout_s):
                await asyncio.shield(ready)
                tools = [t.name for t in await server.list_tools()]
        except BaseException as exc:
            stop.set()
            owner.cancel()
            with contextlib.suppress(BaseException):
                await owner
            if isinstance(exc, asyncio.CancelledError):
                raise
            slot.error = slot.spec.scrub(_error_text(exc))
            slot.failures += 1
            backoff = min(RETRY_MIN_S * 2 ** (slot.failures - 1), RETRY_MAX_S)
            slot.retry_at = time.monotonic() + backoff
            log.warning(
                "mcp.connect_failed",
                name=slot.name,
                server=slot.spec.describe(),
                error=slot.error,
                retry_in_s=backoff,
            )
            raise McpUnavailable(self._down_message(slot)) from None
        slot.server, slot.owner, slot.stop = server, owner, stop
        slot.error, slot.failures, slot.tools = None, 0, tools
        slot.connects += 1
        log.info(
            "mcp.connected" if slot.connects == 1 else "mcp.reconnected",
            name=slot.name,
            server=slot.spec.describe(),
            tools=tools,
        )

    def _retire(self, slot: _Slot) -> None:
        """Let the slot's owner task close its connection, in the background."""
        if slot.stop is not None:
            slot.stop.set()
        if slot.owner is not None and not slot.owner.done():
            self._retiring.add(slot.owner)
            slot.owner.add_done_callback(self._retiring.discard)
        slot.server, slot.owner, slot.stop = None, None, None

    def _down_message(self, slot: _Slot) -> str:
        spec = slot.spec
        if spec.command is not None:
            check = (
                f"check that the command of {slot.name!r} in {ENV_VAR} (`{spec.command}` with "
                "its args) starts an MCP server on stdio (run it by hand), and its env/cwd"
            )
        else:
            check = (
                f"check that the server is running and reachable at {_safe_url(spec.url or '')} "
                f"from this worker, and its headers (e.g. Authorization) in {ENV_VAR}"
            )
        wait = max(0.0, slot.retry_at - time.monotonic())
        return (
            f"MCP server {slot.name!r} ({spec.describe()}) is unavailable: {slot.error}. "
            f"{check[0].upper()}{check[1:]}. The worker retries the connection "
            f"(next attempt in {wait:.0f} s or later)."
        )


async def _own(
    server: _StdioServer | _HttpServer, ready: asyncio.Future[None], stop: asyncio.Event
) -> None:
    """Own one connection: open it, hold it until `stop`, close it — all in this one task,
    as anyio's cancel scopes in the SDK's transports require."""
    try:
        await server.connect()  # on failure, the SDK has already cleaned up
    except BaseException as exc:
        if not ready.done():
            if isinstance(exc, asyncio.CancelledError):
                ready.cancel()
            else:
                ready.set_exception(exc)
        if isinstance(exc, asyncio.CancelledError):
            raise
        return
    try:
        if not ready.done():
            ready.set_result(None)
        await stop.wait()
    finally:
        try:
            await server.cleanup()
        except Exception as exc:
            log.warning("mcp.cleanup_failed", name=server.name, error=_error_text(exc))


def _consume(task: asyncio.Task[None]) -> None:
    """Retrieve a connection attempt's exception: its waiters may all have been cancelled."""
    if not task.cancelled():
        task.exception()
