"""The Agents SDK's agent identity map without its signature sort, when no two agents share a
name.

The SDK builds `{identity key: agent}` for the agent graph reachable from a run's starting agent
(`agents._run_state_agent_identity._build_agent_identity_map`) when it snapshots a run's tool
use: twice per run, plain or tool. To tell apart agents that share a name it sorts each name's
group by a JSON signature of the whole agent (instructions, model settings, tools, guardrails),
and it computes that signature for every agent, also for a group of one, where sorting cannot
change anything: about 0.24 ms a build for agentq's plain agent, 3-5% of the worker's CPU
samples in a plain run (py-spy, 50 runs in flight).

With distinct names the SDK's map is `{agent.name: agent}` in its graph-walk order; that is what
`agent_identity_map` returns then, from the SDK's own walk (`_iter_agent_graph`). With a shared
name it calls the SDK's function. One difference: the SDK's signature would raise for an agent
it cannot describe (a duck-typed agent without `.hooks`, prompt data that contains itself); the
fast path never looks at those fields, so it does not raise. tests/test_agentids.py checks the
maps are the same on graphs with tools, handoffs, agents as tools, cycles and shared names.

Installed by the worker at start-up (`install`). The SDK imports the function by name into
other modules, so it is replaced in each (MODULES); a module or name the SDK no longer has
leaves the SDK as shipped."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

IdentityMap = Callable[[Any], dict[str, Any]]

NAME = "_build_agent_identity_map"
MODULES = (
    "agents._run_state_agent_identity",  # defines it; its _build_agent_identity_keys_by_id calls it
    "agents.run_state",
    "agents.run_internal.tool_use_tracker",
)


def make_agent_identity_map(original: IdentityMap, walk: Callable[[Any], Any]) -> IdentityMap:
    """A drop-in for the SDK's map builder: `{name: agent}` when names are distinct, else it."""

    def agent_identity_map(initial_agent: Any) -> dict[str, Any]:
        by_name: dict[str, Any] = {}
        for agent in walk(initial_agent):
            if agent.name in by_name:
                return original(initial_agent)
            by_name[agent.name] = agent
        return by_name

    agent_identity_map.agentq_original = original  # type: ignore[attr-defined]
    return agent_identity_map


def _modules() -> list[Any] | None:
    try:
        return [importlib.import_module(name) for name in MODULES]
    except ImportError:
        return None


def install() -> bool:
    """Use the fast map in this process (idempotent); False, changing nothing, when the SDK no
    longer has one of MODULES or the function in it."""
    modules = _modules()
    if modules is None:
        return False
    current = getattr(modules[0], NAME, None)
    walk = getattr(modules[0], "_iter_agent_graph", None)
    if current is None or walk is None or not all(hasattr(m, NAME) for m in modules):
        return False
    if hasattr(current, "agentq_original"):
        fast = current
    else:
        fast = make_agent_identity_map(current, walk)
    for module in modules:
        setattr(module, NAME, fast)
    return True


def uninstall() -> None:
    modules = _modules() or []
    for module in modules:
        original = getattr(getattr(module, NAME, None), "agentq_original", None)
        if original is not None:
            setattr(module, NAME, original)
