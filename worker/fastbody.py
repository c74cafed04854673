"""Chat-completion request bodies without openai's type-directed transform, when it would change
nothing.

openai's `chat.completions.create` passes every body through `async_maybe_transform`, which walks
the data against the params' TypedDicts, trying each member of every union (a message is a union
of six): about 0.27 ms of CPU for a two-message body, a tenth of a plain agent run's CPU on the
worker. The transform renames aliased keys, formats dates and files, dumps pydantic models and
drops omitted values; the chat-completion params declare no alias and no format
(tests/test_fastbody.py walks their types and fails if one appears). So a body whose values are
plain JSON (dict, list, str, int, float, bool, None) comes out of it as it went in, less the
omitted top-level values: that is what `chat_body` returns, in a few microseconds. Anything else
(a pydantic model, a tuple, an omitted value below the top) goes to openai's transform.

Installed by the worker at start-up (`install`), on openai's chat-completions module only."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from openai import NotGiven, Omit
from openai.resources.chat.completions import completions as _chat

Transform = Callable[[object, object], Coroutine[Any, Any, Any]]

_SCALARS = frozenset({str, int, float, bool, type(None)})


def is_plain(value: object) -> bool:
    """Whether value is JSON data built of dict (str keys), list and scalars only."""
    stack = [value]
    while stack:
        v = stack.pop()
        t = type(v)
        if t in _SCALARS:
            continue
        if t is dict:
            for k, item in v.items():  # type: ignore[attr-defined]
                if type(k) is not str:
                    return False
                stack.append(item)
        elif t is list:
            stack.extend(v)  # type: ignore[arg-type]
        else:
            return False
    return True


def make_chat_body(transform: Transform) -> Transform:
    """A drop-in for openai's `async_maybe_transform` that skips it for plain JSON dicts."""

    async def chat_body(data: object, expected_type: object) -> Any:
        if type(data) is dict:
            body = {k: v for k, v in data.items() if not isinstance(v, NotGiven | Omit)}
            if is_plain(body):
                return body
        return await transform(data, expected_type)

    chat_body.agentq_original = transform  # type: ignore[attr-defined]
    return chat_body


def install() -> bool:
    """Use chat_body for chat-completion requests in this process (idempotent); False when
    openai's module no longer has the name (its transform then runs as shipped)."""
    current = getattr(_chat, "async_maybe_transform", None)
    if current is None:
        return False
    if not hasattr(current, "agentq_original"):
        _chat.async_maybe_transform = make_chat_body(current)  # type: ignore[assignment]
    return True


def uninstall() -> None:
    original = getattr(getattr(_chat, "async_maybe_transform", None), "agentq_original", None)
    if original is not None:
        _chat.async_maybe_transform = original
