"""worker/fastbody.py skips openai's request transform for plain JSON bodies. It leans on two
facts about openai's internals, checked here so an upgrade that moves them fails loudly: the
chat-completion params declare no alias and no format (so the transform of plain JSON is the
identity, less omitted values), and `chat.completions.create` builds its body through the
module's `async_maybe_transform`. And the bodies agentq sends are byte for byte the same."""

from __future__ import annotations

import inspect
import json
import typing
from typing import Any

import httpx2
import pydantic
import pytest
import typing_extensions
from agents import Agent, ModelSettings, RunConfig, Runner, function_tool
from agents.models.openai_chatcompletions import OpenAIChatCompletionsModel
from openai import NOT_GIVEN, AsyncOpenAI, omit
from openai._models import BaseModel as OpenAIModel
from openai._utils import PropertyInfo, async_maybe_transform
from openai._utils import _transform as openai_transform
from openai.resources.chat.completions import completions as chat_module
from openai.types.chat import completion_create_params as params

from worker import fastbody
from worker.tools import calculator


def _walk(tp: Any, seen: dict[int, Any], found: list[tuple[str, PropertyInfo]]) -> None:
    """Every TypedDict reachable from a type annotation (fields, unions, lists) into seen, and
    every PropertyInfo met on the way into found. openai's params are typing_extensions
    TypedDicts (typing.is_typeddict says no to them on Python 3.11)."""
    if id(tp) in seen:
        return
    seen[id(tp)] = tp
    for arg in typing.get_args(tp):
        if isinstance(arg, PropertyInfo):
            found.append((repr(tp), arg))
        else:
            _walk(arg, seen, found)
    if typing_extensions.is_typeddict(tp):
        for hint in typing_extensions.get_type_hints(tp, include_extras=True).values():
            _walk(hint, seen, found)


def _transforming(tp: Any) -> tuple[list[str], list[tuple[str, PropertyInfo]]]:
    """(names of the TypedDicts reached, PropertyInfos that rename or format a value)."""
    seen: dict[int, Any] = {}
    found: list[tuple[str, PropertyInfo]] = []
    _walk(tp, seen, found)
    names = [t.__name__ for t in seen.values() if typing_extensions.is_typeddict(t)]
    return names, [(w, i) for w, i in found if i.alias is not None or i.format is not None]


@pytest.mark.parametrize(
    "params_type",
    [params.CompletionCreateParamsNonStreaming, params.CompletionCreateParamsStreaming],
)
def test_chat_params_declare_no_alias_and_no_format(params_type: Any) -> None:
    reached, found = _transforming(params_type)
    for name in ("ChatCompletionFunctionToolParam", "FunctionDefinition", "ImageURL"):
        assert name in reached, f"the walk no longer reaches {name}: fix the walk"
    assert not found, f"openai now transforms chat params: re-check worker/fastbody.py: {found}"


class _Inner(typing_extensions.TypedDict, total=False):
    card_id: typing_extensions.Annotated[str, PropertyInfo(alias="cardID")]


class _Outer(typing_extensions.TypedDict, total=False):
    items: list[_Inner | str]


def test_the_walk_finds_an_alias_below_the_top() -> None:
    reached, found = _transforming(_Outer)
    assert {"_Outer", "_Inner"} <= set(reached)
    assert [info.alias for _, info in found] == ["cardID"]


def test_create_builds_its_body_through_the_name_install_replaces() -> None:
    create = inspect.unwrap(chat_module.AsyncCompletions.create)
    assert "async_maybe_transform" in create.__code__.co_names
    current = chat_module.async_maybe_transform
    assert getattr(current, "agentq_original", current) is async_maybe_transform


BODIES: list[dict[str, Any]] = [
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be concise."},
            {"role": "user", "content": "What is 1 + 1?"},
        ],
        "stream": False,
        "temperature": omit,
        "tools": NOT_GIVEN,
    },
    {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}]},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "calc", "arguments": '{"x": 1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "2"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "calc",
                    "parameters": {"type": "object", "properties": {"x": {"type": "number"}}},
                    "strict": True,
                },
            }
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
        },
        "max_tokens": 10,
        "top_p": 0.5,
        "parallel_tool_calls": True,
        "metadata": {"k": "v"},
        "stop": ["\n"],
        "user": None,
    },
]


@pytest.mark.parametrize("body", BODIES)
async def test_a_plain_body_comes_out_as_openais_transform_makes_it(body: dict[str, Any]) -> None:
    fast = fastbody.make_chat_body(async_maybe_transform)
    expected = await async_maybe_transform(body, params.CompletionCreateParamsNonStreaming)
    got = await fast(body, params.CompletionCreateParamsNonStreaming)
    assert got == expected
    assert json.dumps(got) == json.dumps(expected)  # the same keys in the same order


class _Schema(pydantic.BaseModel):
    name: str


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": ({"role": "user", "content": "hi"},)},  # a tuple
        {"model": "m", "messages": [{"role": "user", "content": "hi", "name": omit}]},
        {"model": "m", "messages": [], "metadata": _Schema(name="x")},  # a pydantic model
        {"model": "m", "messages": [], 1: "not a str key"},
        [{"role": "user", "content": "hi"}],  # not a dict
    ],
)
async def test_anything_else_goes_to_openais_transform(body: Any) -> None:
    seen: list[Any] = []

    async def transform(data: object, expected_type: object) -> Any:
        seen.append(data)
        return "openai's"

    fast = fastbody.make_chat_body(transform)
    assert await fast(body, params.CompletionCreateParamsNonStreaming) == "openai's"
    assert seen == [body]


def test_is_plain() -> None:
    assert fastbody.is_plain({"a": [1, 2.5, True, None, "s", {"b": []}]})
    assert not fastbody.is_plain({"a": [(1,)]})
    assert not fastbody.is_plain({"a": OpenAIModel()})
    deep: Any = []
    for _ in range(100_000):  # deeper than the recursion limit: the walk is iterative
        deep = [deep]
    assert fastbody.is_plain(deep)


def test_install_is_idempotent_and_uninstall_restores() -> None:
    before = chat_module.async_maybe_transform  # a worker built earlier in this process may
    original = getattr(before, "agentq_original", before)  # have installed it already
    try:
        assert fastbody.install() and fastbody.install()
        assert chat_module.async_maybe_transform.agentq_original is original  # type: ignore[attr-defined]
        fastbody.uninstall()
        assert chat_module.async_maybe_transform is original
    finally:
        chat_module.async_maybe_transform = before


def _completion(i: int, tool_call: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "4"}
    if tool_call:
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_{i}",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "2 + 2"}'},
                }
            ],
        }
    return {
        "id": f"cmpl-{i}",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }


async def _wire_bodies() -> list[bytes]:
    """The request bodies of one tool-using agent run through the real SDK and openai client."""
    sent: list[bytes] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(request.content)
        return httpx2.Response(200, json=_completion(len(sent), tool_call=len(sent) == 1))

    client = AsyncOpenAI(
        base_url="http://router.test/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
    )
    agent = Agent(
        name="Calc",
        instructions="Use tools.",
        tools=[function_tool(calculator)],
        model=OpenAIChatCompletionsModel(model="m", openai_client=client),
        model_settings=ModelSettings(temperature=0.1, max_tokens=50),
    )
    await Runner.run(agent, "What is 2 + 2?", run_config=RunConfig(tracing_disabled=True))
    await client.close()
    return sent


async def test_the_sdk_sends_the_same_bytes_with_and_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as shipped, whatever a worker built earlier in this process installed (restored after)
    monkeypatch.setattr(chat_module, "async_maybe_transform", async_maybe_transform)
    shipped = await _wire_bodies()
    walks: list[Any] = []
    walk = openai_transform._async_transform_recursive

    async def counted(*args: Any, **kwargs: Any) -> Any:
        walks.append(args)
        return await walk(*args, **kwargs)

    monkeypatch.setattr(openai_transform, "_async_transform_recursive", counted)
    fastbody.install()
    fast = await _wire_bodies()
    assert len(shipped) == 2  # the tool call, then the answer with the tool's output
    assert fast == shipped
    assert walks == [], "the SDK's bodies should have skipped openai's transform"
