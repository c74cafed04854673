"""The embedded server's idle watch: a small detached process, started with the server, that
shuts the server down cleanly (SHUTDOWN SAVE) once nobody has used it for a while, so the
servers of directories where someone once ran `agentq` do not pile up.

    python -m producer.embedded_idle DATA_DIR PORT IDLE_S

The server's password is read from DATA_DIR (never passed on the command line, which `ps`
shows to every user).

"Used" means any client besides this watch is connected, or commands were run since the last
look. Keys with a TTL (job records) are kept on disk: the next command starts the server again.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, cast

import redis

from producer.embedded import IDLE_CLIENT_NAME, read_password

CHECK_EVERY_S = 5.0


def _busy(client: redis.Redis, last_commands: int) -> tuple[bool, int]:
    info = cast(dict[str, Any], client.info())
    commands = int(info.get("total_commands_processed", 0))
    # This watch's own INFO counts as one command, and its connection as one client.
    used = int(info.get("connected_clients", 1)) > 1 or commands > last_commands + 1
    return used, commands


def watch(port: int, idle_s: float, password: str | None = None) -> None:
    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        password=password,
        socket_timeout=10,
        client_name=IDLE_CLIENT_NAME,
    )
    idle_since = time.monotonic()
    last = -10
    try:
        while True:
            try:
                used, last = _busy(client, last)
            except (redis.RedisError, OSError):
                return  # the server is gone (stopped, or crashed): nothing to watch
            now = time.monotonic()
            if used:
                idle_since = now
            elif now - idle_since >= idle_s:
                try:
                    client.shutdown(save=True)
                except (redis.RedisError, OSError):
                    pass
                return
            time.sleep(min(CHECK_EVERY_S, max(idle_s / 3, 0.2)))
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 3:
        sys.exit("usage: python -m producer.embedded_idle DATA_DIR PORT IDLE_S")
    watch(int(args[1]), float(args[2]), read_password(Path(args[0])))


if __name__ == "__main__":
    main()
