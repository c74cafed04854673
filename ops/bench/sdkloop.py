"""The baseline agentq is compared with: a plain in-process loop over the Agents SDK.

`asyncio.gather` over N `Runner.run` calls, bounded by a `Semaphore`, tracing disabled, with
one of two clients wrapped in an `OpenAIChatCompletionsModel`: `--client pooled` (the default),
the worker's own client (aiohttp transport, pool sized to the concurrency, no SDK retries): the
best loop a skilled engineer writes, and the one agentq is held to; or `--client default`, a
plain `AsyncOpenAI(base_url=..., api_key=...)` as a newcomer writes it. The same agents as the
bench's agentq jobs: a plain one, or one with agentq's calculator tool wrapped by
`agents.function_tool`.

    python -m ops.bench.sdkloop --url URL --n 1000 --concurrency 50 [--tool]

prints one JSON line: runs, seconds, runs_per_s, cpu_s, cpu_ms_per_run, failures. Only the N
runs are timed: a warm-up batch runs first, in the same process and client."""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

from agents import Agent, Runner, function_tool, set_tracing_disabled
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from openai import AsyncOpenAI

from worker.provider import router_client
from worker.tools import calculator

PLAIN_INSTRUCTIONS = "You are a helpful assistant. Be concise."
"""agentq's default AgentSpec instructions: both sides send the same prompt."""
TOOL_AGENT = {"name": "Calc", "instructions": "Use tools.", "tools": ["calculator"]}
"""The inline agent spec of the bench's agentq tool jobs (the same agent as below)."""


def question(i: int) -> str:
    return f"What is {i} + 1?"


def build_agent(client: AsyncOpenAI, model: str, tool: bool) -> Agent[Any]:
    llm = OpenAIChatCompletionsModel(model=model, openai_client=client)
    if tool:
        return Agent(
            name=str(TOOL_AGENT["name"]),
            instructions=str(TOOL_AGENT["instructions"]),
            tools=[function_tool(calculator)],
            model=llm,
        )
    return Agent(name="Assistant", instructions=PLAIN_INSTRUCTIONS, model=llm)


async def run_all(agent: Agent[Any], n: int, concurrency: int, offset: int) -> int:
    """Run n agent runs, `concurrency` at a time; returns how many failed."""
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> bool:
        async with slots:
            try:
                await Runner.run(agent, question(offset + i))
            except Exception:
                return False
            return True

    results = await asyncio.gather(*(one(i) for i in range(n)))
    return results.count(False)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    set_tracing_disabled(True)
    if args.client == "pooled":
        client = router_client(args.url, args.api_key, args.concurrency, 120.0)
    else:
        client = AsyncOpenAI(base_url=args.url, api_key=args.api_key)
    agent = build_agent(client, args.model, args.tool)
    try:
        await run_all(agent, args.warmup, args.concurrency, 10_000_000)
        cpu0, t0 = time.process_time(), time.perf_counter()
        failures = await run_all(agent, args.n, args.concurrency, 0)
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        await client.close()
    return {
        "runs": args.n,
        "failures": failures,
        "seconds": round(seconds, 4),
        "runs_per_s": round(args.n / seconds, 2),
        "cpu_s": round(cpu, 4),
        "cpu_ms_per_run": round(cpu * 1000 / args.n, 3),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "uvloop": args.uvloop,
        "client": args.client,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ops.bench.sdkloop", description=__doc__)
    ap.add_argument("--url", required=True, help="OpenAI-compatible base URL (the Router)")
    ap.add_argument("--api-key", default="sk-bench-router-key-0000")
    ap.add_argument("--n", type=int, default=1000, help="timed runs")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--tool", action="store_true", help="an agent with the calculator tool")
    ap.add_argument("--model", default="gpt-4o-mini")
    ap.add_argument("--warmup", type=int, default=20, help="untimed runs first")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop (default: asyncio)")
    ap.add_argument("--client", choices=["pooled", "default"], default="pooled")
    args = ap.parse_args(argv)
    loop_factory = None
    if args.uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        out = runner.run(main_async(args))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
