"""End to end with real processes: the simulated Router and `agentq worker`s as separate
processes over HTTP and Redis, driven through the `agentq` command line."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from producer.embedded import embedded_status, stop_embedded_redis
from tests.procs import (
    KEY,
    ROOT,
    agentq,
    base_env,
    keys_containing,
    start_sim,
    start_worker,
    stop,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def router_url() -> Iterator[str]:
    proc, url = start_sim("--latency-ms", "5")
    yield url
    stop(proc)


@pytest.fixture
def env(redis_url: str, router_url: str) -> dict[str, str]:
    redis_sync.Redis.from_url(redis_url).flushdb()
    return base_env(redis_url, router_url)


@pytest.fixture
def workers(env: dict[str, str], tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [start_worker(env, tmp_path / f"worker{i}.log") for i in range(2)]
    yield procs
    for p in procs:
        p.terminate()
    for p in procs:
        assert p.wait(20) == 0, "worker did not stop cleanly on SIGTERM"


def write_jobs(path: Path, n: int) -> dict[str, str]:
    """n jobs mixing plain and calculator-tool jobs; returns the expected output per id."""
    expected = {}
    with path.open("w") as f:
        for i in range(n):
            a, b = i, i % 17 + 2
            if i % 2:
                line = {
                    "custom_id": f"t{i}",
                    "input": f"What is {a} * {b}?",
                    "agent": {"name": "Calc", "tools": ["calculator"]},
                    "model": "gpt-4o",
                }
                expected[f"t{i}"] = f"The result of {a} * {b} is {a * b}."
            else:
                line = {"custom_id": f"p{i}", "input": f"What is {a} + {b}?", "model": "auto"}
                expected[f"p{i}"] = str(a + b)
            f.write(json.dumps(line) + "\n")
    return expected


def test_500_job_batch_across_two_worker_processes(
    env: dict[str, str], workers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    expected = write_jobs(jobs, 500)
    sub = agentq("submit", str(jobs), env=env)
    assert sub.returncode == 0, sub.stderr
    batch_id = sub.stdout.strip().splitlines()[-1]

    waited = agentq("wait", batch_id, "--timeout", "150", env=env)
    assert waited.returncode == 0, waited.stderr

    out = tmp_path / "out.jsonl"
    res = agentq("results", batch_id, "-o", str(out), env=env)
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == list(expected)  # one each, input order
    assert {r["custom_id"]: r["output"] for r in records} == expected
    assert all(r["status"] == "succeeded" for r in records)
    assert len({r["worker"] for r in records}) == 2, "both worker processes took jobs"
    assert all(r["logs"] and r["logs"][-1]["event"] == "job.finished" for r in records)

    st = json.loads(agentq("status", batch_id, "--json", env=env).stdout)
    assert st["total"] == 500 and st["counts"]["succeeded"] == 500 and st["finished"]
    assert st["usage"]["total_tokens"] == sum(r["usage"]["total_tokens"] for r in records)

    again = agentq("submit", str(jobs), "--batch-id", batch_id, env=env)
    assert again.returncode == 0 and "(0 new)" in again.stderr  # idempotent resubmit

    dump = "".join(p.read_text() for p in tmp_path.glob("worker*.log"))
    assert KEY not in dump and KEY not in out.read_text()
    assert keys_containing(env["REDIS_URL"], KEY) == []
    assert keys_containing(env["REDIS_URL"], "What is 3 * 5?")  # the scan does find things


def test_bad_file_is_rejected_and_nothing_enqueued(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"custom_id": "ok1", "input": "What is 2+2?"}\n'
        '{"custom_id": "ok1", "input": "dup"}\n'
        "{not json}\n"
        '{"input": "no id"}\n'
        "\n"
        '{"custom_id": "x", "input": "", "tools": []}\n'
    )
    res = agentq("submit", str(bad), env=env)
    assert res.returncode == 2
    err = res.stderr
    assert "4 bad lines; nothing was enqueued" in err
    assert "line 2: duplicate custom_id 'ok1' (first on line 1)" in err
    assert "line 3: malformed JSON" in err
    assert "line 4: missing required field 'custom_id'" in err
    assert "line 6:" in err and "unknown field 'tools'" in err
    r = redis_sync.Redis.from_url(env["REDIS_URL"])
    assert r.dbsize() == 0


def test_run_quickstart_on_embedded_redis(router_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(HANZO_ROUTER_URL=router_url, HANZO_API_KEY=KEY, PYTHONPATH=str(ROOT))
    try:
        res = agentq(
            "run",
            str(ROOT / "examples" / "quickstart.jsonl"),
            "-o",
            "out.jsonl",
            env=env,
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr
        records = {
            json.loads(x)["custom_id"]: json.loads(x)
            for x in (tmp_path / "out.jsonl").read_text().splitlines()
        }
        assert records["q1"]["output"] == "4"
        assert records["q2"]["output"] == "The result of 15 * 23 is 345."
        # `agentq run` started the embedded server for itself, and stopped it at the end
        # (issue 14: servers piled up in every directory)...
        assert embedded_status(tmp_path / ".agentq") is None
        assert "stopped the embedded server" in res.stderr
        # ...and the next command starts it again, with the data on disk.
        batch_id = records["q1"]["batch_id"]
        st = agentq("status", batch_id, "--json", env=env, cwd=tmp_path)
        assert st.returncode == 0 and json.loads(st.stdout)["counts"]["succeeded"] == 5
        assert embedded_status(tmp_path / ".agentq") is not None
    finally:
        stop_embedded_redis(tmp_path / ".agentq")


def test_health_lists_router_redis_and_workers(
    env: dict[str, str], workers: list[subprocess.Popen[bytes]]
) -> None:
    import time

    deadline = time.monotonic() + 20
    while True:
        res = agentq("health", env=env)
        if "Workers alive: 2" in res.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "✓ Router health check passed" in res.stdout
    assert "✓ Available models:" in res.stdout and "found" in res.stdout
    assert "Workers alive: 2" in res.stdout

    down = {**env, "HANZO_ROUTER_URL": "http://127.0.0.1:9/v1"}
    res = agentq("health", env=down)
    assert res.returncode == 1
    assert "Cannot connect to Router at http://127.0.0.1:9/v1 — is it running?" in res.stdout

    wrong = {**env, "HANZO_API_KEY": "sk-wrong"}
    res = agentq("models", env=wrong)
    assert res.returncode == 1 and "401 from Router: invalid HANZO_API_KEY" in res.stderr
