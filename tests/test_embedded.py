"""Tests for the shared embedded Valkey server (real valkey-server daemons in tmp dirs)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import structlog

from producer.embedded import (
    EmbeddedRedisError,
    embedded_status,
    ensure_embedded_redis,
    stop_embedded_redis,
)

ROOT = Path(__file__).resolve().parents[1]


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def _loose(d: Path) -> list[str]:
    """Everything under d (and d) that is not 0700 (dirs) or 0600 (files)."""
    return [
        f"{p.relative_to(d.parent)} {oct(_mode(p))}"
        for p in [d, *d.rglob("*")]
        if _mode(p) != (0o700 if p.is_dir() else 0o600)
    ]


def _pid(d: Path) -> int:
    return int((d / "valkey.pid").read_text())


def _dead(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _starts(d: Path) -> int:
    """How many servers were started in ``d`` (one log line per successful start)."""
    return (d / "valkey.log").read_text().count("Ready to accept connections")


def _run_ensure(d: Path) -> subprocess.Popen[str]:
    code = (
        "import sys; from producer.embedded import ensure_embedded_redis as e; "
        "print(e(sys.argv[1]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(d)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh data dir whose server (if any) is stopped — or killed — afterwards."""
    d = tmp_path / ".agentq"
    yield d
    stop_embedded_redis(d)
    if (d / "valkey.pid").exists() and not _dead(pid := _pid(d)):
        os.kill(pid, signal.SIGKILL)


def test_starts_and_reuses(data_dir: Path) -> None:
    url = ensure_embedded_redis(data_dir)
    assert url.startswith("redis://:") and "@127.0.0.1:" in url and url.endswith("/0")
    client = redis.Redis.from_url(url)
    client.set("k", "v")
    assert client.get("k") == b"v"
    pid = _pid(data_dir)

    assert ensure_embedded_redis(data_dir) == url
    assert embedded_status(data_dir) == url
    assert _pid(data_dir) == pid and _starts(data_dir) == 1
    assert (data_dir / ".gitignore").read_text().strip() == "*"
    client.close()


def test_survives_the_starting_process(data_dir: Path) -> None:
    proc = _run_ensure(data_dir)
    url = proc.communicate(timeout=30)[0].strip()
    assert proc.returncode == 0
    client = redis.Redis.from_url(url)
    assert client.ping()
    assert embedded_status(data_dir) == url
    assert ensure_embedded_redis(data_dir) == url
    client.close()


def test_concurrent_first_use_starts_one_server(data_dir: Path) -> None:
    procs = [_run_ensure(data_dir) for _ in range(4)]
    urls = {p.communicate(timeout=30)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(urls) == 1
    assert _starts(data_dir) == 1
    assert embedded_status(data_dir) == urls.pop()


def test_stale_files_after_kill_start_a_fresh_server(data_dir: Path) -> None:
    ensure_embedded_redis(data_dir)
    old_pid = _pid(data_dir)
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _dead(old_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (data_dir / "valkey.port").exists()  # stale
    assert embedded_status(data_dir) is None

    url = ensure_embedded_redis(data_dir)
    assert _pid(data_dir) != old_pid and _starts(data_dir) == 2
    assert redis.Redis.from_url(url).ping()


def test_data_persists_across_stop_and_start(data_dir: Path) -> None:
    client = redis.Redis.from_url(ensure_embedded_redis(data_dir))
    client.set("job:1", "queued")
    client.close()
    assert stop_embedded_redis(data_dir)

    client = redis.Redis.from_url(ensure_embedded_redis(data_dir))
    assert client.get("job:1") == b"queued"
    client.close()


def test_stop(data_dir: Path, tmp_path: Path) -> None:
    assert not stop_embedded_redis(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    url = ensure_embedded_redis(data_dir)
    pid = _pid(data_dir)

    assert stop_embedded_redis(data_dir)
    assert embedded_status(data_dir) is None
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    deadline = time.monotonic() + 10
    while not _dead(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dead(pid)
    assert not stop_embedded_redis(data_dir)


def test_startup_failure_explains_itself(data_dir: Path) -> None:
    ensure_embedded_redis(data_dir)
    stop_embedded_redis(data_dir)
    manifest = next((data_dir / "appendonlydir").glob("*.manifest"))
    manifest.write_text("garbage\n")

    with pytest.raises(EmbeddedRedisError) as err:
        ensure_embedded_redis(data_dir)
    assert "Invalid AOF manifest" in str(err.value)
    assert "REDIS_URL" in str(err.value)
    assert embedded_status(data_dir) is None


def test_an_unused_server_stops_itself_and_keeps_its_data(data_dir: Path) -> None:
    url = ensure_embedded_redis(data_dir, idle_s=1)
    client = redis.Redis.from_url(url)
    client.set("kept", "yes")
    client.close()
    pid = _pid(data_dir)
    deadline = time.monotonic() + 30
    while not _dead(pid) and time.monotonic() < deadline:  # looking must not use the server
        time.sleep(0.2)
    assert _dead(pid), "the idle server is still running"
    again = redis.Redis.from_url(ensure_embedded_redis(data_dir))
    try:
        assert again.get("kept") == b"yes"
    finally:
        again.close()


def test_a_used_server_stays_up(data_dir: Path) -> None:
    url = ensure_embedded_redis(data_dir, idle_s=1)
    client = redis.Redis.from_url(url)
    try:
        client.ping()  # a connected client (a worker, say) keeps it up
        time.sleep(4)
        assert embedded_status(data_dir) == url
    finally:
        client.close()


def test_release_stops_only_an_unused_server_started_here(data_dir: Path) -> None:
    from producer.embedded import STARTED_HERE, release_embedded_redis

    url = ensure_embedded_redis(data_dir)
    assert data_dir.resolve() in STARTED_HERE
    other = redis.Redis.from_url(url)
    try:
        other.ping()
        assert not release_embedded_redis(data_dir)  # another process uses it
    finally:
        other.close()
    assert release_embedded_redis(data_dir)
    assert embedded_status(data_dir) is None


def test_data_dir_and_every_file_in_it_are_private_under_umask_022(data_dir: Path) -> None:
    from worker import logs

    # what an older agentq left: a 0755 dir with a 0644 job log
    (data_dir / "logs").mkdir(parents=True, mode=0o755)
    data_dir.chmod(0o755)
    (data_dir / "logs" / "old.jsonl").write_text("{}\n")
    (data_dir / "logs" / "old.jsonl").chmod(0o644)
    old = os.umask(0o022)
    try:
        client = redis.Redis.from_url(ensure_embedded_redis(data_dir))
        client.set("k", "v")
        client.close()
        logs.configure(fmt="json", log_file=data_dir / "logs" / "b_1.jsonl")
        structlog.get_logger().info("job.finished")
        running = {p.name for p in data_dir.rglob("*")}
        assert {
            "valkey.password",
            "valkey.port",
            "valkey.conf",
            "valkey.log",
            "b_1.jsonl",
        } <= running
        assert any(n.endswith(".aof") for n in running), running
        assert _loose(data_dir) == []
        assert stop_embedded_redis(data_dir)  # SHUTDOWN SAVE writes an RDB
        assert (data_dir / "dump.rdb").exists()
        assert _loose(data_dir) == []
    finally:
        os.umask(old)
        logs.configure()


def test_the_server_refuses_clients_without_its_password(data_dir: Path) -> None:
    url = ensure_embedded_redis(data_dir)
    port = urlsplit(url).port
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=5).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, password="guess", socket_timeout=5).ping()
    password = (data_dir / "valkey.password").read_text().strip()
    assert len(password) >= 32 and urlsplit(url).password == password
    assert redis.Redis.from_url(url).ping()


def test_a_server_started_without_a_password_is_replaced_keeping_its_data(
    data_dir: Path,
) -> None:
    """An older agentq's server (no requirepass) still running: the next command stops it
    (SHUTDOWN SAVE) and starts a private one on the same data."""
    client = redis.Redis.from_url(ensure_embedded_redis(data_dir))
    client.set("kept", "yes")
    client.config_set("requirepass", "")
    client.close()
    (data_dir / "valkey.password").unlink()
    old_pid = _pid(data_dir)

    url = ensure_embedded_redis(data_dir)
    assert _pid(data_dir) != old_pid and _dead(old_pid)
    again = redis.Redis.from_url(url)
    try:
        assert again.get("kept") == b"yes"
    finally:
        again.close()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=urlsplit(url).port, socket_timeout=5).ping()


def test_the_cli_reports_a_server_that_cannot_start_without_a_traceback(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from producer.cli import EXIT_FAILED, main

    ensure_embedded_redis(data_dir)
    stop_embedded_redis(data_dir)
    next((data_dir / "appendonlydir").glob("*.manifest")).write_text("garbage\n")
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("AGENTQ_DATA_DIR", str(data_dir))
    with pytest.raises(SystemExit) as exit_:
        main(["status", "b1"])
    assert exit_.value.code == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("agentq: The embedded Valkey server in") and "REDIS_URL" in err


@pytest.mark.skipif(os.getuid() != 0, reason="making a dir of another user needs root")
def test_a_data_dir_of_another_user_is_refused(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o777)
    os.chown(data_dir, 12345, 12345)
    try:
        with pytest.raises(EmbeddedRedisError, match=r"belongs to another user.*AGENTQ_DATA_DIR"):
            ensure_embedded_redis(data_dir)
        assert not (data_dir / "valkey.password").exists()
    finally:
        os.chown(data_dir, os.getuid(), os.getgid())
