"""A tiny real MCP server (for the MCP example and tests): one tool, `word_count`.

    python examples/mcp_words_server.py stdio
    python examples/mcp_words_server.py http --port N [--token T]   # streamable HTTP at /mcp

The installed `mcp` is 2.x, where v1's `mcp.server.fastmcp.FastMCP` is
`mcp.server.mcpserver.MCPServer` (same decorator API).

When MCP_FIXTURE_PIDFILE is set, the server writes its pid there at start (tests kill it to
check reconnection). Over HTTP, `--token T` makes every request need `Authorization: Bearer T`
(tests check that configured headers reach the server); `--port 0` picks a free port, and the
server prints "mcp fixture listening on http://127.0.0.1:PORT/mcp" once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import Any

from mcp.server.mcpserver import MCPServer

server = MCPServer("words")


@server.tool()
def word_count(text: str) -> str:
    """Count the words of a text."""
    n = len(text.split())
    return f"{n} word" if n == 1 else f"{n} words"


def _write_pid() -> None:
    path = os.environ.get("MCP_FIXTURE_PIDFILE")
    if path:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def _require_token(app: Any, token: str) -> Any:
    """Plain ASGI middleware: 401 for HTTP requests without the bearer token."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != expected:
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b"missing or bad token"})
            return
        await app(scope, receive, send)

    return guarded


async def _serve_http(port: int, token: str | None) -> None:
    import uvicorn

    app: Any = server.streamable_http_app(streamable_http_path="/mcp")
    if token:
        app = _require_token(app, token)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    web = uvicorn.Server(config)
    task = asyncio.create_task(web.serve(sockets=[sock]))
    while not web.started:
        if task.done():
            await task
            return
        await asyncio.sleep(0.02)
    print(f"mcp fixture listening on http://127.0.0.1:{sock.getsockname()[1]}/mcp", flush=True)
    await task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    _write_pid()
    if args.transport == "stdio":
        server.run("stdio")
    else:
        try:
            asyncio.run(_serve_http(args.port, args.token))
        except KeyboardInterrupt:
            sys.exit(0)


if __name__ == "__main__":
    main()
