"""Redis with a password, over TLS (rediss://) and over a unix socket (unix://), for producer
and worker alike."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from ops.procs import start_valkey
from ops.simrouter import SimRouter
from producer import AgentJob, Producer, Settings, Status
from tests.conftest import ROUTER_KEY
from tests.helpers import records, run_batch
from tests.procs import agentq, base_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(args: list[str], url: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--save", "", "--appendonly", "no", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            redis_sync.Redis.from_url(url).ping()
            return proc
        except redis_sync.RedisError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[str]:
    if not shutil.which("redis-server") or not shutil.which("openssl"):
        pytest.skip("needs redis-server and openssl on PATH")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    url = f"rediss://:s3cret-pw@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"
    try:
        proc = start_redis(
            [
                "--port",
                "0",
                "--tls-port",
                str(port),
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-ca-cert-file",
                str(cert),
                "--tls-auth-clients",
                "no",
                "--requirepass",
                "s3cret-pw",
            ],
            url,
        )
    except redis_sync.RedisError as exc:  # a TLS regression must show as a failure
        pytest.fail(f"could not reach the TLS Redis: {exc}")
    yield url
    proc.kill()
    proc.wait(5)


async def test_batch_over_tls_with_password(tls_redis: str, sim: SimRouter, tmp_path: Path) -> None:
    settings = Settings(
        redis_url=tls_redis,
        router_url=sim.url,
        api_key=ROUTER_KEY,  # type: ignore[arg-type]
        poll_delay_s=0.01,
        data_dir=str(tmp_path),
    )
    async with Producer.from_env(settings) as p:
        batch = await p.submit([AgentJob(custom_id="a", input="What is 20 + 22?")])
        await run_batch(p, settings, batch.id)
        out = await records(p, batch.id)
    assert out["a"].status == Status.SUCCEEDED and out["a"].output == "42"


def test_wrong_password_is_a_clear_error(tls_redis: str) -> None:
    bad = tls_redis.replace("s3cret-pw", "wrong-pw-123")
    res = agentq("status", "b_x", env={**base_env(bad, "http://127.0.0.1:9/v1")}, timeout=120)
    assert res.returncode == 1
    assert "check REDIS_URL" in res.stderr and "rediss://***@127.0.0.1" in res.stderr
    assert "wrong-pw-123" not in res.stderr


async def test_batch_over_a_unix_socket(sim: SimRouter, tmp_path: Path) -> None:
    """REDIS_URL=unix://PATH: the producer and the worker connect without the TCP-only
    socket_keepalive (redis-py refused it for a unix socket: TypeError at the first command)."""
    socks = Path(tempfile.mkdtemp(prefix="aqux", dir="/tmp"))  # a socket path has 107 bytes
    server = start_valkey(tmp_path, unix_socket_path=socks / "r.sock")
    try:
        settings = Settings(
            redis_url=f"unix://{socks / 'r.sock'}?db=0",
            router_url=sim.url,
            api_key=ROUTER_KEY,  # type: ignore[arg-type]
            poll_delay_s=0.01,
            data_dir=str(tmp_path / ".agentq"),
        )
        async with Producer.from_env(settings) as p:
            batch = await p.submit([AgentJob(custom_id="a", input="What is 20 + 22?")])
            await run_batch(p, settings, batch.id)
            out = await records(p, batch.id)
    finally:
        server.stop()
        shutil.rmtree(socks, ignore_errors=True)
    assert out["a"].status == Status.SUCCEEDED and out["a"].output == "42"
