"""The reading commands with real processes: `results --follow` against a worker process
finishing jobs, `job`, `logs [--follow]`, `batches`, every --json output, and no colour for
NO_COLOR or a pipe."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import pty
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from tests.procs import ROOT, agentq, base_env, start_sim, start_worker, stop, until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def router_url() -> Iterator[str]:
    proc, url = start_sim()
    yield url
    stop(proc)


@pytest.fixture
def env(redis_url: str, router_url: str, tmp_path: Path) -> dict[str, str]:
    redis_sync.Redis.from_url(redis_url).flushdb()
    env = base_env(redis_url, router_url, AGENTQ_DATA_DIR=str(tmp_path / "d"))
    env.pop("NO_COLOR", None)
    return env


def write_jobs(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(j) + "\n" for j in jobs))
    return path


def submit(jobs: list[dict[str, Any]], env: dict[str, str], tmp_path: Path) -> str:
    res = agentq("submit", str(write_jobs(tmp_path / f"{uuid.uuid4().hex}.jsonl", jobs)), env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def burst_worker(env: dict[str, str], concurrency: int = 50) -> None:
    """An `agentq worker --burst` process: runs what is queued, then exits."""
    res = agentq("worker", "--burst", env={**env, "AGENTQ_CONCURRENCY": str(concurrency)})
    assert res.returncode == 0, res.stderr[-3000:]


def popen(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "producer.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def retry_one(redis_url: str, batch_id: str, custom_id: str) -> None:
    """Re-enqueue one cancelled job (the CLI retries whole batches)."""
    from redis.asyncio import Redis

    from producer.models import Status, job_id_for
    from producer.store import Store

    async def go() -> None:
        r = Redis.from_url(redis_url)
        try:
            store = Store(r, queue="agentq:queue", result_ttl_s=3600)
            assert await store.retry(
                batch_id, [job_id_for(batch_id, custom_id)], [Status.CANCELLED]
            )
        finally:
            await r.aclose()

    asyncio.run(go())


def job(custom_id: str, **kw: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "input": f"What is 2+2? ({uuid.uuid4().hex[:6]})", **kw}


def test_results_follow_streams_records_in_the_order_jobs_finish(
    env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    batch = submit([job("a"), job("b"), job("c")], env, tmp_path)
    assert agentq("cancel", batch, env=env).returncode == 0
    # b queued before a: a worker running one job at a time finishes b, then a. c stays
    # cancelled: final before the follower starts.
    retry_one(redis_url, batch, "b")
    time.sleep(0.05)  # Redis's clock moves on: a's queue score is after b's
    retry_one(redis_url, batch, "a")
    follower = popen("results", batch, "--follow", env=env)
    try:
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())
        assert (first["custom_id"], first["status"]) == ("c", "cancelled")
        burst_worker(env, concurrency=1)  # the follower is subscribed: it printed c
        out, err = follower.communicate(timeout=60)
    finally:
        stop(follower)
    rest = [json.loads(line) for line in out.splitlines()]
    assert [(r["custom_id"], r["status"]) for r in rest] == [("b", "succeeded"), ("a", "succeeded")]
    assert rest[0]["finished_at"] < rest[1]["finished_at"]
    assert follower.returncode == 1, err  # as `wait`: c was cancelled


def test_results_follow_failed_as_csv_and_exit_codes(env: dict[str, str], tmp_path: Path) -> None:
    batch = submit([job("ok1"), job("bad", model="no-such-model"), job("ok2")], env, tmp_path)
    follower = popen("results", batch, "--follow", "--failed", "--format", "csv", env=env)
    try:
        burst_worker(env)
        out, err = follower.communicate(timeout=60)
    finally:
        stop(follower)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["custom_id"], r["status"], r["error_type"]) for r in rows] == [
        ("bad", "failed", "model_not_found")
    ]
    assert follower.returncode == 1, err
    # A done batch: follow prints what is there and exits at once, 0 when all succeeded.
    ok = submit([job("x")], env, tmp_path)
    burst_worker(env)
    res = agentq("results", ok, "--follow", env=env)
    assert res.returncode == 0, res.stderr
    assert [json.loads(line)["custom_id"] for line in res.stdout.splitlines()] == ["x"]


def test_results_follow_times_out_with_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    batch = submit([job("a")], env, tmp_path)  # no worker runs
    res = agentq("results", batch, "--follow", "--timeout", "0.5", env=env)
    assert res.returncode == 2 and "timed out after 0.5 s: 0/1 jobs done" in res.stderr
    assert res.stdout == ""


async def test_python_api_follows_results_until_the_batch_is_done(
    producer: Any, settings: Any
) -> None:
    from producer import AgentJob
    from tests.helpers import run_batch

    batch = await producer.submit(
        [AgentJob(custom_id=f"j{i}", input=f"What is {i} + 1?") for i in range(20)]
    )

    async def follow() -> list[Any]:
        return [r async for r in producer.results(batch.id, follow=True)]

    follower = asyncio.create_task(follow())
    await run_batch(producer, settings, batch.id)
    got = await asyncio.wait_for(follower, 30)
    assert sorted(r.custom_id for r in got) == sorted(f"j{i}" for i in range(20))
    assert all(r.status == "succeeded" for r in got)


async def test_follow_reads_the_batch_again_when_notices_are_lost(
    producer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pub/sub drops what nobody heard: with every notice lost, a job's record still comes
    while the batch runs on (the counters disagree after a quiet second), not only at the end."""
    from producer import AgentJob, ResultRecord, Status, follow
    from producer.models import job_id_for
    from producer.store import now_iso

    async def deaf(pubsub: Any) -> list[tuple[str, str]]:
        await pubsub.get_message(ignore_subscribe_messages=True, timeout=follow.QUIET_S)
        return []

    monkeypatch.setattr(follow, "read_burst", deaf)
    batch = await producer.submit([AgentJob(custom_id=c, input="x") for c in ("a", "b")])
    got: asyncio.Queue[ResultRecord] = asyncio.Queue()

    async def follower() -> None:
        async for r in producer.results(batch.id, follow=True):
            await got.put(r)

    task = asyncio.create_task(follower())

    async def finish(custom_id: str) -> None:
        job_id = job_id_for(batch.id, custom_id)
        claim = await producer.store.claim(job_id, batch.id, "test:1", "1")
        record = ResultRecord(
            custom_id=custom_id,
            job_id=job_id,
            batch_id=batch.id,
            status=Status.SUCCEEDED,
            finished_at=now_iso(),
        )
        assert await producer.store.finish(record, claim.token) == 1

    try:
        await finish("a")
        first = await asyncio.wait_for(got.get(), 10)
        assert first.custom_id == "a" and not (await producer.status(batch.id)).finished
        await finish("b")
        second = await asyncio.wait_for(got.get(), 10)
        assert second.custom_id == "b"
        await asyncio.wait_for(task, 10)  # the batch is done: it ends
    finally:
        task.cancel()
    assert got.empty()


def test_job_shows_one_record_for_a_person_and_as_json(env: dict[str, str], tmp_path: Path) -> None:
    batch = submit([job("q1", model="gpt-4o"), job("q2", model="no-such-model")], env, tmp_path)
    burst_worker(env)
    res = agentq("job", batch, "q1", env=env)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for expected in ("status      succeeded", "model       gpt-4o", "attempts", "1. gpt-4o on "):
        assert expected in text, text
    assert "input       What is 2+2?" in text
    log = text.split("log (", 1)[1].splitlines()
    assert any("job.finished" in line for line in log) and log[1].lstrip().startswith("+")
    as_json = json.loads(agentq("job", batch, "q1", "--json", env=env).stdout)
    from_results = {
        r["custom_id"]: r
        for r in map(json.loads, agentq("results", batch, env=env).stdout.splitlines())
    }
    assert as_json == from_results["q1"]
    by_id = agentq("job", batch, as_json["job_id"], "--json", env=env)
    assert json.loads(by_id.stdout) == as_json
    failed = agentq("job", batch, "q2", env=env).stdout
    assert "model_not_found" in failed and "status      failed" in failed
    missing = agentq("job", batch, "nope", env=env)
    assert missing.returncode == 2 and "no job 'nope' in batch" in missing.stderr


def test_logs_prints_events_filters_them_and_follows(env: dict[str, str], tmp_path: Path) -> None:
    batch = submit([job("a"), job("b")], env, tmp_path)
    follower = popen("logs", batch, "--follow", env=env)
    one = popen("logs", batch, "b", "--follow", "--json", env=env)
    r = redis_sync.Redis.from_url(env["REDIS_URL"])
    try:
        # Both listen before any job runs, so the live channel is what prints the events (a
        # follower that starts mid-job holds them until the job's record lands).
        until(lambda: r.pubsub_numsub(f"agentq:logs:{batch}")[0][1] == 2, what="subscribed")
        burst_worker(env)
        out, err = follower.communicate(timeout=60)
        one_out, one_err = one.communicate(timeout=60)
    finally:
        stop(follower, one)
    assert follower.returncode == 0, err
    lines = out.splitlines()
    for cid in ("a", "b"):
        mine = [line for line in lines if f"  {cid}  " in line]
        assert any("job.started" in line for line in mine) and "job.finished" in mine[-1]
    assert one.returncode == 0, one_err
    events = [json.loads(line) for line in one_out.splitlines()]
    assert {e["custom_id"] for e in events} == {"b"} and events[-1]["event"] == "job.finished"

    calls = agentq("logs", batch, "--event", "model_call", env=env).stdout.splitlines()
    assert calls and all(line.split()[3] == "model_call" for line in calls)
    pattern = agentq("logs", batch, "--event", "job.*", "--json", env=env).stdout.splitlines()
    assert {json.loads(line)["event"] for line in pattern} >= {"job.started", "job.finished"}
    assert all(json.loads(line)["event"].startswith("job.") for line in pattern)
    quiet = agentq("logs", batch, "--level", "warning", "--json", env=env)
    assert quiet.returncode == 0 and all(
        json.loads(line)["level"] in ("warning", "error") for line in quiet.stdout.splitlines()
    )


def test_batches_lists_newest_first_with_status_and_limit(
    env: dict[str, str], tmp_path: Path
) -> None:
    done = submit([job("a")], env, tmp_path)
    burst_worker(env)
    active = submit([job("b"), job("c")], env, tmp_path)  # no worker: stays active

    def listed(*args: str) -> list[dict[str, Any]]:
        res = agentq("batches", "--json", *args, env=env)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    every = listed()
    assert [(b["batch_id"], b["active"], b["done"], b["total"]) for b in every] == [
        (active, True, 0, 2),
        (done, False, 1, 1),
    ]
    assert every[1]["counts"]["succeeded"] == 1 and every[1]["cost_usd"] > 0
    assert [b["batch_id"] for b in listed("--status", "active")] == [active]
    assert [b["batch_id"] for b in listed("--status", "done")] == [done]
    assert [b["batch_id"] for b in listed("--limit", "1")] == [active]
    text = agentq("batches", env=env).stdout.splitlines()
    assert text[0].split() == [
        "batch",
        "status",
        "done/total",
        "succeeded",
        "failed",
        "cancelled",
        "cost",
        "age",
    ]
    assert text[1].split()[:3] == [active, "active", "0/2"]
    assert text[2].split()[:4] == [done, "done", "1/1", "1"]
    bad = agentq("batches", "--limit", "0", env=env)
    assert bad.returncode == 2 and "expected a whole number of 1 or more" in bad.stderr


def test_every_json_output_parses(env: dict[str, str], tmp_path: Path) -> None:
    batch = submit([job("a")], env, tmp_path)
    burst_worker(env)
    outputs = {
        "status": agentq("status", batch, "--json", env=env),
        "wait": agentq("wait", batch, "--json", env=env),
        "job": agentq("job", batch, "a", "--json", env=env),
        "batches": agentq("batches", "--json", env=env),
        "health": agentq("health", "--json", env=env),
        "models": agentq("models", "--json", env=env),
        "embedded": agentq("embedded", "status", "--json", env=env),
    }
    for name, res in outputs.items():
        assert res.returncode in (0, 1), (name, res.stderr)
        json.loads(res.stdout)
    assert json.loads(outputs["wait"].stdout)["counts"]["succeeded"] == 1
    assert "gpt-4o" in json.loads(outputs["models"].stdout)
    assert json.loads(outputs["embedded"].stdout)["running"] is False
    for args in (("results", batch, "--json"), ("logs", batch, "--json")):
        lines = agentq(*args, env=env).stdout.splitlines()
        assert lines and all(isinstance(json.loads(line), dict) for line in lines)
    clash = agentq("results", batch, "--json", "--format", "csv", env=env)
    assert clash.returncode == 2 and "--json and --format csv" in clash.stderr


def on_terminal(*args: str, env: dict[str, str]) -> bytes:
    """What `agentq ARGS` writes to a terminal (stdout and stderr on a pty)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", *args],
        env={**env, "TERM": "xterm-256color", "COLUMNS": "200"},
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(60) in (0, 1), out.decode(errors="replace")
    finally:
        stop(proc)
        os.close(master)
    return out


def test_colour_only_on_a_terminal_and_never_under_no_color(
    env: dict[str, str], tmp_path: Path
) -> None:
    batch = submit([job("a"), job("b", model="no-such-model")], env, tmp_path)
    burst_worker(env)
    commands = [
        ("status", batch),
        ("wait", batch),
        ("job", batch, "b"),
        ("logs", batch),
        ("batches",),
    ]
    for args in commands:
        assert b"\x1b[" in on_terminal(*args, env=env), args  # the check below can fail
        plain = on_terminal(*args, env={**env, "NO_COLOR": "1"})
        assert plain.strip() and b"\x1b" not in plain, (args, plain)
        piped = agentq(*args, env=env)
        assert "\x1b" not in piped.stdout + piped.stderr, args
        assert (piped.stdout + piped.stderr).strip(), args


def test_help_version_and_completion(env: dict[str, str], tmp_path: Path) -> None:
    top = agentq("--help", env=env).stdout
    assert "example:" in top
    for name in ("status", "results", "job", "logs", "batches", "wait", "submit"):
        assert name in top
        sub = agentq(name, "--help", env=env)
        assert sub.returncode == 0 and "example:\n  agentq " + name in sub.stdout, name
    version = agentq("--version", env=env)
    assert version.returncode == 0 and version.stdout.startswith("agentq ")
    bash = agentq("completion", "bash", env=env)
    assert bash.returncode == 0 and "batches" in bash.stdout and "--follow" in bash.stdout
    script = tmp_path / "agentq.bash"
    script.write_text(bash.stdout)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    zsh = agentq("completion", "zsh", env=env)
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef agentq")


def test_logs_follow_prints_events_while_jobs_run_and_each_once(
    redis_url: str, tmp_path: Path
) -> None:
    """Live events: a job's first model call shows while the batch is not done (each of the
    two calls takes 1.5 s); nothing is printed twice once the records land; exits when done."""
    r = redis_sync.Redis.from_url(redis_url)
    r.flushdb()
    sim, url = start_sim("--latency-ms", "1500")
    env = base_env(redis_url, url, AGENTQ_DATA_DIR=str(tmp_path / "d"))
    calc = {"agent": {"tools": ["calculator"]}}
    batch = submit([job("a", **calc), job("b", **calc)], env, tmp_path)
    follower = popen("logs", batch, "--follow", "--json", env=env)
    one = popen("logs", batch, "b", "--follow", "--json", env=env)
    worker = None
    try:
        until(lambda: r.pubsub_numsub(f"agentq:logs:{batch}")[0][1] == 2, what="subscribed")
        worker = start_worker(env, tmp_path / "worker.log")
        assert follower.stdout is not None
        early = []
        while True:
            line = follower.stdout.readline()
            assert line, follower.stderr.read() if follower.stderr else ""
            early.append(line)
            if json.loads(line)["event"] == "model_call":
                counts = {
                    k.decode(): int(v)
                    for k, v in r.hgetall(f"agentq:batch:{batch}").items()
                    if v.isdigit()
                }
                break
        done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
        assert done < counts["total"] == 2, counts
        follower.wait(60)  # little output: the pipe does not fill
        rest, err = follower.stdout.read(), follower.stderr.read() if follower.stderr else ""
        one_out, one_err = one.communicate(timeout=60)
    finally:
        stop(follower, one, *([worker] if worker else []), sim)
    assert follower.returncode == 0, err  # the batch is done, every job succeeded
    lines = [norm(x) for x in early + rest.splitlines()]
    assert len(lines) == len(set(lines)), "an event was printed twice"
    stored = [norm(x) for x in agentq("logs", batch, "--json", env=env).stdout.splitlines()]
    assert sorted(lines) == sorted(stored)  # live or from the record: each event once
    assert sum('"event": "model_call"' in x for x in stored) == 4
    assert one.returncode == 0, one_err
    assert sorted(norm(x) for x in one_out.splitlines()) == [
        x for x in sorted(stored) if json.loads(x)["custom_id"] == "b"
    ]


def norm(line: str) -> str:
    return json.dumps(json.loads(line), sort_keys=True)


def test_logs_follow_started_mid_job_prints_its_events_in_order(
    redis_url: str, tmp_path: Path
) -> None:
    """A follower that starts while job a runs missed a's events 0 and 1: it hears 2 and 3
    live, and prints a's events 0-4 in index order once the record brings the rest. The worker
    is played by the test (claims, live entries, finishes), so the follower provably heard 2
    and 3 before the record landed: b's event 0, published after them, printed first."""
    from producer.models import ResultRecord, Status, job_id_for
    from producer.store import Store

    r = redis_sync.Redis.from_url(redis_url)
    r.flushdb()
    env = base_env(redis_url, "http://127.0.0.1:9/v1", AGENTQ_DATA_DIR=str(tmp_path / "d"))
    batch = submit([job("a"), job("b")], env, tmp_path)
    ids = {cid: job_id_for(batch, cid) for cid in ("a", "b")}
    events = {
        cid: [{"event": f"{cid}{i}", "level": "info", "run": 1} for i in range(n)]
        for cid, n in (("a", 5), ("b", 2))
    }

    async def play(step: str, tokens: dict[str, str]) -> None:
        from redis.asyncio import Redis

        client = Redis.from_url(redis_url)
        store = Store(client, queue="agentq:queue", result_ttl_s=3600)
        try:
            for cid, jid in ids.items():
                if step == "claim":
                    claim = await store.claim(jid, batch, "w:1", "1")
                    assert claim.state == "running", claim
                    tokens[cid] = claim.token
                else:
                    rec = ResultRecord(
                        custom_id=cid,
                        job_id=jid,
                        batch_id=batch,
                        status=Status.SUCCEEDED,
                        finished_at="2026-01-01T00:00:00Z",
                        logs=events[cid],
                    )
                    assert await store.finish(rec, tokens[cid]) == 1
        finally:
            await client.aclose()

    def publish(cid: str, *indexes: int) -> None:
        entries = [
            {"job_id": ids[cid], "custom_id": cid, "i": i, "event": events[cid][i]} for i in indexes
        ]
        r.publish(f"agentq:logs:{batch}", json.dumps(entries))

    tokens: dict[str, str] = {}
    asyncio.run(play("claim", tokens))  # a logged 0 and 1 now: nobody listens yet
    follower = popen("logs", batch, "--follow", "--json", env=env)
    try:
        until(lambda: r.pubsub_numsub(f"agentq:logs:{batch}")[0][1] == 1, what="subscribed")
        until(lambda: r.pubsub_numsub(f"agentq:events:{batch}")[0][1] == 1, what="following")
        publish("a", 2)
        publish("a", 3)
        publish("b", 0)
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())
        assert first["event"] == "b0", first  # a's 2 and 3 wait for 0 and 1
        asyncio.run(play("finish", tokens))
        out, err = follower.communicate(timeout=60)
    finally:
        stop(follower)
    assert follower.returncode == 0, err
    lines = [first, *map(json.loads, out.splitlines())]
    for cid in ("a", "b"):
        got = [x["event"] for x in lines if x["custom_id"] == cid]
        assert got == [e["event"] for e in events[cid]], (cid, got)
