"""Tools and agent profiles the workers offer, by name. Jobs name them; code never travels
through Redis. Users add their own through plugin modules (AGENTQ_PLUGINS)."""

from __future__ import annotations

import ast
import importlib
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agents import FunctionTool, function_tool

from producer.models import AgentSpec

from .baton import gives_turn_while_waiting


class CalculatorError(ValueError):
    pass


_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_MAX_EXPONENT = 1000
_MAX_CHARS = 500
_MAX_BITS = 4096


def evaluate(expression: str) -> int | float:
    """Evaluate arithmetic by walking its AST: numbers, + - * / // % ** and parentheses only.
    Never eval: the expression comes from a model."""
    if len(expression) > _MAX_CHARS:
        raise CalculatorError(f"expression longer than {_MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*"), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not an arithmetic expression: {expression!r}") from None
    return _walk(tree.body)


def _walk(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        if isinstance(node.value, bool):
            raise CalculatorError("booleans are not numbers here")
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _bounded(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_walk(node.operand))
    raise CalculatorError(f"unsupported element in expression: {ast.dump(node)[:60]}")


def _check_power(base: float, exponent: float) -> None:
    """Refuse powers whose result would be huge before computing them: nested powers
    otherwise build numbers of millions of bits and stall the worker."""
    if abs(exponent) > _MAX_EXPONENT:
        raise CalculatorError(f"exponent {exponent} is too large (max {_MAX_EXPONENT})")
    if isinstance(base, int) and abs(base) > 1 and exponent > 0:
        if abs(base).bit_length() * exponent > _MAX_BITS:
            raise CalculatorError("result too large")


def _bounded(value: object) -> int | float:
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > _MAX_BITS:
        raise CalculatorError("result too large")
    if not isinstance(value, int | float):
        raise CalculatorError("the result is not a number")
    return value


async def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as "15 * 23" or "(2 + 3) ** 2".

    Args:
        expression: The arithmetic expression to evaluate.
    """
    value = evaluate(expression)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


@dataclass(frozen=True)
class AgentProfile:
    """A named agent registered on the workers; a job names it and may override its fields."""

    spec: AgentSpec
    model: str | None = None


@dataclass
class Registry:
    tools: dict[str, FunctionTool] = field(default_factory=dict)
    agents: dict[str, AgentProfile] = field(default_factory=dict)

    def add_tool(self, tool: FunctionTool | Callable[..., Any], name: str | None = None) -> None:
        """Register a FunctionTool, or a plain (sync or async) typed function to wrap as one.
        Sync functions run in a thread, so they never block the event loop."""
        ft = tool if isinstance(tool, FunctionTool) else function_tool(tool, name_override=name)
        self.tools[name or ft.name] = gives_turn_while_waiting(ft)

    def add_agent(self, name: str, *, model: str | None = None, **spec: Any) -> None:
        """Register an agent profile: instructions, tools, output_schema, model_settings..."""
        profile = AgentProfile(AgentSpec(name=spec.pop("display_name", name), **spec), model)
        unknown = [t for t in profile.spec.tools if t not in self.tools]
        if unknown:
            raise ValueError(f"agent profile {name!r} names unknown tools {unknown}")
        self.agents[name] = profile


def default_registry() -> Registry:
    reg = Registry()
    reg.add_tool(calculator)
    reg.add_agent(
        "calculator",
        display_name="Calculator",
        instructions="You are a precise calculator. Use the calculator tool for arithmetic.",
        tools=["calculator"],
    )
    return reg


def load_plugins(registry: Registry, modules: list[str]) -> None:
    """Import each plugin module and call its `register(registry)`."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise RuntimeError(
                f"cannot import plugin module {name!r} (AGENTQ_PLUGINS): {exc}. "
                "Is it installed or on PYTHONPATH?"
            ) from exc
        register = getattr(module, "register", None)
        if not callable(register):
            raise RuntimeError(f"plugin module {name!r} has no register(registry) function")
        register(registry)
