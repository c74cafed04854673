"""The worker's /metrics (no auth) listens on this machine only unless told otherwise."""

from __future__ import annotations

import socket
import urllib.request

import pytest

from producer.settings import Settings
from worker import metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _outward_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1; UDP connect sends nothing
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") else address


def test_metrics_listen_on_loopback_by_default() -> None:
    outward = _outward_address()
    if outward is None:
        pytest.skip("this machine has no address besides loopback")
    settings = Settings()  # type: ignore[call-arg]
    port = _free_port()
    metrics.serve(port, settings.metrics_host)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert b"agentq_jobs_in_flight" in resp.read()
    with pytest.raises(OSError):
        socket.create_connection((outward, port), timeout=5).close()
