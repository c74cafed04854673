"""worker/agentids.py replaces the Agents SDK's agent identity map when no two agents share a
name. These tests build agent graphs with the real SDK and compare the fast map with the SDK's
(keys, order, and which agent object each key names), and fail loudly if the SDK moves the
function or the modules that import it by name."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, function_tool, handoff

from producer import Producer
from producer.models import AgentJob
from producer.settings import Settings
from tests.helpers import records, run_batch
from worker import agentids

identity = importlib.import_module("agents._run_state_agent_identity")


def _sdk_map() -> agentids.IdentityMap:
    fn = identity._build_agent_identity_map
    return getattr(fn, "agentq_original", fn)  # a worker built in this process installed it


def _pairs(m: dict[str, Any]) -> list[tuple[str, int]]:
    return [(key, id(agent)) for key, agent in m.items()]


@function_tool
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def _graphs() -> dict[str, Agent[Any]]:
    single = Agent(name="solo", instructions="hi")
    leaf = Agent(name="leaf", instructions="leaf", tools=[add])
    helper = Agent(name="helper", instructions="helps")
    distinct = Agent(
        name="root",
        instructions="root",
        tools=[add, helper.as_tool(tool_name="ask_helper", tool_description="ask")],
        handoffs=[leaf, handoff(Agent(name="via_handoff", instructions="x"))],
    )
    a = Agent(name="a", instructions="a")
    b = Agent(name="b", instructions="b", handoffs=[a])
    a.handoffs = [b]
    twin1 = Agent(name="twin", instructions="one")
    twin2 = Agent(name="twin", instructions="two", tools=[add])
    shared = Agent(name="top", instructions="top", handoffs=[twin2, twin1])
    inner = Agent(name="top", instructions="not the root")
    shared_root = Agent(name="top", instructions="root", handoffs=[inner])
    literal = Agent(name="x", handoffs=[Agent(name="x"), Agent(name="x#2"), Agent(name="x")])
    return {
        "single": single,
        "distinct names: tools, handoffs, an agent as a tool": distinct,
        "a cycle": a,
        "two agents share a name": shared,
        "an agent shares the root's name": shared_root,
        "a name that looks like a generated key": literal,
    }


@pytest.mark.parametrize("case", list(_graphs()))
def test_same_map_as_the_sdk(case: str) -> None:
    root = _graphs()[case]
    sdk = _sdk_map()
    fast = agentids.make_agent_identity_map(sdk, identity._iter_agent_graph)
    assert _pairs(fast(root)) == _pairs(sdk(root))


def test_distinct_names_skip_the_sdk_and_shared_names_call_it() -> None:
    calls: list[object] = []

    def sdk(agent: object) -> dict[str, Any]:
        calls.append(agent)
        return _sdk_map()(agent)

    fast = agentids.make_agent_identity_map(sdk, identity._iter_agent_graph)
    graphs = _graphs()
    fast(graphs["distinct names: tools, handoffs, an agent as a tool"])
    assert calls == []
    shared = graphs["two agents share a name"]
    fast(shared)
    assert calls == [shared]


def test_install_replaces_it_everywhere_the_sdk_uses_it_and_uninstall_restores() -> None:
    modules = [importlib.import_module(m) for m in agentids.MODULES]
    before = [getattr(m, agentids.NAME) for m in modules]  # the SDK must still have each
    original = getattr(before[0], "agentq_original", before[0])
    try:
        assert agentids.install() and agentids.install()
        fast = getattr(modules[0], agentids.NAME)
        assert fast.agentq_original is original
        assert all(getattr(m, agentids.NAME) is fast for m in modules)
        # The SDK's keys-by-id helper looks the map builder up in its module: it goes through it.
        root = _graphs()["distinct names: tools, handoffs, an agent as a tool"]
        calls: list[object] = []
        for m in modules:
            setattr(m, agentids.NAME, lambda a: calls.append(a) or fast(a))
        keys = identity._build_agent_identity_keys_by_id(root)
        assert calls == [root] and keys[id(root)] == "root"
        for m in modules:
            setattr(m, agentids.NAME, fast)
        agentids.uninstall()
        assert all(getattr(m, agentids.NAME) is original for m in modules)
    finally:
        for m, fn in zip(modules, before, strict=True):
            setattr(m, agentids.NAME, fn)


def test_install_changes_nothing_when_the_sdk_moved_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agentids, "MODULES", (*agentids.MODULES, "agents.no_such_module"))
    before = identity._build_agent_identity_map
    assert agentids.install() is False
    assert identity._build_agent_identity_map is before


@pytest.mark.parametrize("missing", [agentids.NAME, "_iter_agent_graph"])
def test_install_changes_nothing_when_a_name_is_gone(
    missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = importlib.import_module(
        agentids.MODULES[-1] if missing == agentids.NAME else agentids.MODULES[0]
    )
    before = identity._build_agent_identity_map
    monkeypatch.delattr(module, missing)
    assert agentids.install() is False
    assert identity._build_agent_identity_map is before


_SCAN = f"""
import importlib, json, pkgutil, sys
import agents
for info in pkgutil.walk_packages(agents.__path__, "agents."):
    try:
        importlib.import_module(info.name)
    except Exception:  # an optional extra that is not installed
        pass
original = importlib.import_module("{agentids.MODULES[0]}").{agentids.NAME}
print(json.dumps(sorted(
    name for name, module in list(sys.modules.items())
    if name.startswith("agents") and getattr(module, "{agentids.NAME}", None) is original
)))
"""


def test_every_sdk_module_that_holds_the_function_is_in_modules() -> None:
    """A module of a newer SDK that imports the function by name would keep the slow one. The
    scan imports every SDK module, in a process of its own (so this one keeps its state)."""
    out = subprocess.run(
        [sys.executable, "-c", _SCAN], capture_output=True, text=True, timeout=120, check=True
    )
    holders = set(json.loads(out.stdout.splitlines()[-1]))
    assert holders == set(agentids.MODULES), holders ^ set(agentids.MODULES)


async def test_a_worker_installs_it_and_says_so(
    producer: Producer, settings: Settings, tmp_path: Path
) -> None:
    batch = await producer.submit([AgentJob(custom_id="a", input="What is 2+2?")])
    log = tmp_path / "worker.jsonl"
    await run_batch(producer, settings, batch.id, log_file=log)
    assert (await records(producer, batch.id))["a"].status == "succeeded"
    started = [
        json.loads(line) for line in log.read_text().splitlines() if "worker.started" in line
    ]
    assert started and started[0]["fast_agent_ids"] is True, started
    fn = importlib.import_module(agentids.MODULES[1]).__dict__[agentids.NAME]
    assert hasattr(fn, "agentq_original")
