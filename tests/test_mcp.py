"""MCP servers on the workers: configuration, connecting once and sharing, reconnecting, agent
runs through the real Agents SDK calling a real MCP server (examples/mcp_words_server.py) over
stdio and over streamable HTTP, against the simulated Router."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import (
    Agent,
    Model,
    ModelProvider,
    OpenAIChatCompletionsModel,
    RunConfig,
    Runner,
)
from openai import AsyncOpenAI

from ops.simrouter import SimRouter
from tests.conftest import ROUTER_KEY
from worker.errors import InvalidJob
from worker.mcp import McpPool, McpServerSpec, McpUnavailable, parse_mcp_config
from worker.supervisor import die_with_parent

FIXTURE = Path(__file__).resolve().parent.parent / "examples" / "mcp_words_server.py"
TOKEN = "s3cret-mcp-token"
PROMPT = "Please word_count this text"  # the simulated model passes it all as `text`
ANSWER = "4 words"


# ---------------------------------------------------------------- helpers
def stdio_spec(pidfile: Path, **extra: Any) -> McpServerSpec:
    return McpServerSpec(
        command=sys.executable,
        args=[str(FIXTURE), "stdio"],
        env={"MCP_FIXTURE_PIDFILE": str(pidfile)},
        **extra,
    )


def read_pid(pidfile: Path) -> int:
    return int(pidfile.read_text())


def alive(pid: int) -> bool:
    """Running (a reaped or zombie process is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stdio_children() -> list[int]:
    """Live child processes of this test process running the fixture server over stdio."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if (
            int(fields[1]) == os.getpid()
            and fields[0] != "Z"
            and str(FIXTURE).encode() in cmdline
            and b"stdio" in cmdline
        ):
            found.append(int(proc.name))
    return found


class Recorder:
    """Stands in for worker.mcp's structlog logger: records (event, fields), level included."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def record(event: str, **fields: Any) -> None:
            self.events.append({"event": event, "log_level": level, **fields})

        return record

    def names(self) -> list[str]:
        return [e["event"] for e in self.events]


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr("worker.mcp.log", recorder)
    return recorder


async def wait_for(check: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


class SimProvider(ModelProvider):
    """Every model is the simulated Router's, through Chat Completions."""

    def __init__(self, sim: SimRouter) -> None:
        self.client = AsyncOpenAI(base_url=sim.url, api_key=ROUTER_KEY, max_retries=0)

    def get_model(self, model_name: str | None) -> Model:
        return OpenAIChatCompletionsModel(model=model_name or "gpt-4o", openai_client=self.client)


async def run_words(pool: McpPool, provider: SimProvider, names: list[str] | None = None) -> str:
    agent = Agent(
        name="A",
        instructions="Use your tools to answer.",
        mcp_servers=await pool.servers(names or ["words"]),
    )
    result = await Runner.run(
        agent,
        PROMPT,
        run_config=RunConfig(model="gpt-4o", model_provider=provider, tracing_disabled=True),
    )
    return str(result.final_output)


class HttpFixture:
    """The fixture server over streamable HTTP as a subprocess, restartable on its port."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.url = ""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(FIXTURE), "http", "--port", str(self.port), "--token", TOKEN],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            preexec_fn=die_with_parent,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "mcp fixture listening on" in line, line
        self.url = line.rsplit(" ", 1)[1].strip()
        self.port = int(self.url.split(":")[2].split("/")[0])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def spec(self, token: str = TOKEN) -> McpServerSpec:
        return McpServerSpec(url=self.url, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def http_server() -> Iterator[HttpFixture]:
    server = HttpFixture()
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def provider(sim: SimRouter) -> AsyncIterator[SimProvider]:
    p = SimProvider(sim)
    yield p
    await p.client.close()


@pytest.fixture
async def pool() -> AsyncIterator[McpPool]:
    p = McpPool()
    yield p
    await p.close()


@pytest.fixture(params=["stdio", "http"])
def words_spec(request: pytest.FixtureRequest, tmp_path: Path) -> McpServerSpec:
    if request.param == "stdio":
        return stdio_spec(tmp_path / "words.pid")
    http_server: HttpFixture = request.getfixturevalue("http_server")
    return http_server.spec()


# ---------------------------------------------------------------- configuration
def test_config_accepts_both_kinds() -> None:
    specs = parse_mcp_config(
        '{"files": {"command": "python", "args": ["-m", "x"], "env": {"A": "1"}, "cwd": "/tmp"},'
        ' "search": {"url": "http://127.0.0.1:9000/mcp",'
        ' "headers": {"Authorization": "Bearer abc"}, "timeout_s": 5, "cache_tools": false}}'
    )
    assert specs["files"].transport == "stdio"
    assert specs["files"].args == ["-m", "x"] and specs["files"].env == {"A": "1"}
    assert specs["files"].timeout_s == 30 and specs["files"].cache_tools
    assert specs["search"].transport == "http"
    assert specs["search"].headers == {"Authorization": "Bearer abc"}
    assert specs["search"].timeout_s == 5 and not specs["search"].cache_tools
    assert parse_mcp_config("") == {} and parse_mcp_config("  ") == {}
    assert parse_mcp_config("{}") == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"files": {"command": "x"', "AGENTQ_MCP_SERVERS is not valid JSON"),
        ('["x"]', "must be a JSON object of server name -> server"),
        ('{"files": "python -m x"}', "server 'files' must be an object"),
        ('{"both": {"command": "x", "url": "http://h/mcp"}}', "server 'both': give exactly one"),
        ('{"neither": {"args": ["x"]}}', "server 'neither': give exactly one of `command`"),
        ('{"s": {"url": "http://h/mcp", "args": ["a"]}}', "server 's': `args` go with `command`"),
        ('{"f": {"command": "x", "headers": {"a": "b"}}}', "`headers` go with `url`"),
        ('{"f": {"command": "x", "tiemout_s": 3}}', "server 'f': tiemout_s: Extra inputs"),
        ('{"f": {"command": "x", "timeout_s": 0}}', "server 'f': timeout_s: Input should be"),
        ('{"f": {"command": "x", "args": "a b"}}', "server 'f': args: Input should be a valid"),
        ('{"s": {"url": "ftp://h/x"}}', "server 's': `url` must be an http(s) URL"),
        ('{"f": {"command": " "}}', "server 'f': `command` is empty"),
    ],
)
def test_config_rejects_bad_input(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_mcp_config(text)
    assert expected in str(err.value)


def test_config_url_credentials_stay_out_of_messages() -> None:
    spec = McpServerSpec(url="https://user:pw@h.example/mcp?key=k", headers={"X-Key": "hdr"})
    assert spec.describe() == "streamable HTTP: https://h.example/mcp"


ARG_SECRET = "postgres://app:pg-S3cret@db/app"
ENV_SECRET = "env-S3cret"


def test_stdio_args_and_env_stay_out_of_descriptions() -> None:
    spec = McpServerSpec(
        command="pg-mcp", args=["--dsn", ARG_SECRET], env={"PGPASSWORD": ENV_SECRET}
    )
    for text in (spec.describe(), repr(spec), str(spec)):
        assert "S3cret" not in text, text
    assert spec.describe() == "stdio: pg-mcp with 2 arguments"
    assert spec.scrub(f"failed: {ARG_SECRET} / {ENV_SECRET}") == "failed: [REDACTED] / [REDACTED]"


def test_worker_log_redactor_knows_mcp_args_and_env(settings: Any) -> None:
    from worker.settings import _secrets

    config = {"pg": {"command": "pg-mcp", "args": ["-v", ARG_SECRET], "env": {"P": ENV_SECRET}}}
    found = _secrets(settings.model_copy(update={"mcp_servers": json.dumps(config)}))
    assert {ARG_SECRET, ENV_SECRET} <= set(found) and "-v" not in found


# ---------------------------------------------------------------- connecting and sharing
async def test_pool_connects_and_offers_tools(pool: McpPool, words_spec: McpServerSpec) -> None:
    await pool.start({"words": words_spec})
    assert pool.names() == ["words"]
    assert pool.status() == {"words": "connected"}
    [server] = await pool.servers(["words"])
    assert [t.name for t in await server.list_tools()] == ["word_count"]
    result = await server.call_tool("word_count", {"text": "one two three"})
    assert result.content[0].text == "3 words"  # type: ignore[union-attr]
    # the same object every time: connected once, shared
    assert (await pool.servers(["words", "words"])) == [server]


async def test_agent_calls_the_mcp_tool(
    pool: McpPool, words_spec: McpServerSpec, provider: SimProvider, sim: SimRouter
) -> None:
    await pool.start({"words": words_spec})
    assert ANSWER in await run_words(pool, provider)
    offered = [t["function"]["name"] for t in sim.stats.requests[0]["body"]["tools"]]
    assert offered == ["word_count"]


async def test_twenty_concurrent_runs_share_one_server(
    pool: McpPool, words_spec: McpServerSpec, provider: SimProvider
) -> None:
    await pool.start({"words": words_spec})
    [server] = await pool.servers(["words"])
    outputs = await asyncio.gather(*(run_words(pool, provider) for _ in range(20)))
    assert all(ANSWER in out for out in outputs), outputs
    # and raw concurrent calls with different arguments get their own answers
    results = await asyncio.gather(
        *(server.call_tool("word_count", {"text": "w " * n}) for n in range(1, 41))
    )
    assert [r.content[0].text for r in results] == [  # type: ignore[union-attr]
        f"{n} word" if n == 1 else f"{n} words" for n in range(1, 41)
    ]
    assert (await pool.servers(["words"])) == [server]


async def test_unknown_server_is_an_invalid_job(pool: McpPool, tmp_path: Path) -> None:
    await pool.start({"words": stdio_spec(tmp_path / "p"), "zeta": McpServerSpec(command="nope")})
    with pytest.raises(InvalidJob) as err:
        await pool.servers(["words", "files"])
    assert str(err.value) == "unknown MCP servers ['files']; the workers offer: words, zeta"
    empty = McpPool()
    await empty.start({})
    with pytest.raises(InvalidJob, match="the workers offer: none"):
        await empty.servers(["words"])
    await empty.close()


# ---------------------------------------------------------------- failures and reconnection
def test_what_counts_as_a_lost_connection() -> None:
    from agents.exceptions import UserError
    from mcp.shared.exceptions import MCPError

    from worker.mcp import _is_connection_error

    lost = MCPError(-32000, "Connection closed")
    assert _is_connection_error(lost)
    assert _is_connection_error(BrokenPipeError())
    assert _is_connection_error(ExceptionGroup("g", [ExceptionGroup("h", [lost])]))
    assert _is_connection_error(
        UserError(
            "Failed to call tool 'x' on MCP server 'w': "
            "Connection lost. The server may have disconnected."
        )
    )
    wrapped = RuntimeError("tool failed")
    wrapped.__cause__ = lost
    assert _is_connection_error(wrapped)
    # the server answered: not a connection problem
    assert not _is_connection_error(MCPError(-32602, "Invalid params"))
    assert not _is_connection_error(MCPError(-32001, "Request timed out"))
    assert not _is_connection_error(UserError("missing required parameters: text"))
    assert not _is_connection_error(asyncio.CancelledError())


async def test_killed_stdio_server_is_reconnected_once(
    pool: McpPool, tmp_path: Path, provider: SimProvider, logs: Recorder
) -> None:
    pidfile = tmp_path / "words.pid"
    await pool.start({"words": stdio_spec(pidfile)})
    [first] = await pool.servers(["words"])
    pid = read_pid(pidfile)
    pidfile.unlink()
    os.kill(pid, signal.SIGKILL)
    # noticed without any request: the session's transport reached EOF
    await wait_for(lambda: pool.status()["words"] == "lost", what="the server to be seen lost")

    logs.events.clear()
    # 20 jobs at once, each in its own task: one reconnection, shared
    outputs = await asyncio.gather(*(run_words(pool, provider) for _ in range(20)))
    assert all(ANSWER in out for out in outputs), outputs
    assert logs.names() == ["mcp.connection_lost", "mcp.reconnected"]
    [second] = await pool.servers(["words"])
    assert second is not first
    new_pid = read_pid(pidfile)
    assert new_pid != pid and alive(new_pid)
    assert pool.status() == {"words": "connected"}


async def test_job_right_after_a_kill_then_reconnect(
    pool: McpPool, tmp_path: Path, provider: SimProvider
) -> None:
    """Killed while a job already holds the server: that call fails (the model sees the tool
    error), the server is marked lost, and the next job gets a new connection."""
    pidfile = tmp_path / "words.pid"
    await pool.start({"words": stdio_spec(pidfile)})
    [server] = await pool.servers(["words"])
    os.kill(read_pid(pidfile), signal.SIGKILL)
    with contextlib.suppress(Exception):
        await server.call_tool("word_count", {"text": "a b"})
    await wait_for(lambda: pool.status()["words"] == "lost", what="lost")
    assert ANSWER in await run_words(pool, provider)


async def test_dead_http_server_is_noticed_on_a_failed_call(
    pool: McpPool, http_server: HttpFixture, provider: SimProvider, logs: Recorder
) -> None:
    await pool.start({"words": http_server.spec()})
    assert ANSWER in await run_words(pool, provider)
    http_server.kill()
    # Nothing tells an HTTP client that the server died until it is used: this run's tool call
    # fails (the SDK hands the error to the model) and marks the server lost.
    out = await run_words(pool, provider)
    assert ANSWER not in out
    assert "mcp.connection_lost" in logs.names(), logs.events
    assert pool.status()["words"] == "lost"
    http_server.start()  # back, on the same port
    assert ANSWER in await run_words(pool, provider)
    assert logs.names()[-1] == "mcp.reconnected"
    assert pool.status()["words"] == "connected"


async def test_bad_command_does_not_stop_the_worker(
    pool: McpPool, tmp_path: Path, provider: SimProvider, logs: Recorder
) -> None:
    await pool.start(
        {
            "words": stdio_spec(tmp_path / "p"),
            "broken": McpServerSpec(
                command="/nonexistent/mcp-server",
                args=["--token", ARG_SECRET],
                env={"PGPASSWORD": ENV_SECRET},
            ),
        }
    )
    failed = [e for e in logs.events if e["event"] == "mcp.connect_failed"]
    assert [(e["name"], e["log_level"]) for e in failed] == [("broken", "warning")]
    assert "No such file or directory" in failed[0]["error"]
    assert pool.status()["words"] == "connected"
    assert pool.status()["broken"].startswith("down: ")
    with pytest.raises(McpUnavailable) as err:
        await pool.servers(["words", "broken"])
    message = str(err.value)
    assert "MCP server 'broken' (stdio: /nonexistent/mcp-server with 2 arguments)" in message
    assert "No such file or directory" in message
    assert "Check that the command of 'broken' in AGENTQ_MCP_SERVERS" in message
    # configured args and env values never reach a message or a log event
    for text in (message, repr(logs.events), repr(pool.status())):
        assert ARG_SECRET not in text and ENV_SECRET not in text
    # jobs not naming it still work
    assert ANSWER in await run_words(pool, provider)


async def test_down_server_is_retried_after_its_back_off(
    pool: McpPool, http_server: HttpFixture, provider: SimProvider, monkeypatch: Any
) -> None:
    monkeypatch.setattr("worker.mcp.RETRY_MIN_S", 0.2)
    spec = http_server.spec()
    http_server.kill()
    await pool.start({"words": spec})
    with pytest.raises(McpUnavailable) as err:
        await pool.servers(["words"])
    assert f"reachable at {http_server.url}" in str(err.value)
    assert TOKEN not in str(err.value)
    http_server.start()
    await asyncio.sleep(0.25)
    assert ANSWER in await run_words(pool, provider)


async def test_wrong_header_is_reported(pool: McpPool, http_server: HttpFixture) -> None:
    await pool.start({"words": http_server.spec(token="wrong")})
    with pytest.raises(McpUnavailable) as err:
        await pool.servers(["words"])
    assert "headers (e.g. Authorization)" in str(err.value)
    assert "wrong" not in str(err.value)


async def test_connect_timeout(pool: McpPool, tmp_path: Path) -> None:
    """A command that never speaks MCP: the connection gives up after timeout_s."""
    spec = McpServerSpec(
        command=sys.executable, args=["-c", "import time; time.sleep(60)"], timeout_s=0.5
    )
    started = time.monotonic()
    await pool.start({"mute": spec})
    assert time.monotonic() - started < 10
    with pytest.raises(McpUnavailable, match="timed out"):
        await pool.servers(["mute"])
    assert stdio_children() == []


# ---------------------------------------------------------------- closing
async def test_close_from_another_task_leaves_no_processes(
    tmp_path: Path, http_server: HttpFixture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="openai.agents")
    pool = McpPool()
    pidfiles = [tmp_path / f"{n}.pid" for n in range(3)]
    specs = {f"s{n}": stdio_spec(p) for n, p in enumerate(pidfiles)}
    # started in one task (like arq's on_startup), reconnected from job tasks, closed in another
    await asyncio.create_task(pool.start({**specs, "h": http_server.spec()}))
    pids = [read_pid(p) for p in pidfiles]
    os.kill(pids[0], signal.SIGKILL)
    await wait_for(lambda: pool.status()["s0"] == "lost", what="lost")
    await asyncio.gather(*(asyncio.create_task(pool.servers(["s0", "h"])) for _ in range(5)))
    pids.append(read_pid(pidfiles[0]))
    assert len(set(pids)) == 4 and all(alive(p) for p in pids[1:])
    assert sorted(stdio_children()) == sorted(pids[1:])

    await asyncio.create_task(pool.close())
    assert not any(alive(p) for p in pids)
    assert stdio_children() == []
    assert "cancel scope" not in caplog.text
    assert "Error cleaning up" not in caplog.text
    with pytest.raises(McpUnavailable, match="shutting down"):
        await pool.servers(["s1"])
    await pool.close()  # twice is fine


async def test_close_during_a_connection_attempt(tmp_path: Path) -> None:
    """A worker stopping while a server is still connecting: waiting jobs get McpUnavailable
    (not a CancelledError that looks like their own cancellation), and no process is left."""
    pool = McpPool()
    mute = McpServerSpec(command=sys.executable, args=["-c", "import time; time.sleep(60)"])
    starting = asyncio.create_task(pool.start({"mute": mute}))
    await wait_for(lambda: pool.status().get("mute") == "connecting", what="connecting")
    waiter = asyncio.create_task(pool.servers(["mute"]))
    await asyncio.sleep(0.05)
    await pool.close()
    await starting
    with pytest.raises(McpUnavailable, match="shutting down"):
        await waiter
    assert stdio_children() == []


async def test_start_twice_is_an_error(pool: McpPool, tmp_path: Path) -> None:
    await pool.start({"words": stdio_spec(tmp_path / "p")})
    with pytest.raises(RuntimeError):
        await pool.start({"words": stdio_spec(tmp_path / "p")})
