"""Router health and model list, with the guide's troubleshooting hints on failure."""

from __future__ import annotations

from dataclasses import dataclass, field

import openai

from .redact import safe_url
from .settings import Settings


@dataclass
class RouterInfo:
    models: list[str] = field(default_factory=list)
    error: str | None = None


def health_url(router_url: str) -> str:
    """The Router's liveliness endpoint: the base URL without its /v1."""
    base = router_url.rstrip("/").removesuffix("/v1")
    return f"{base}/health/liveliness"


async def check_router(settings: Settings, timeout_s: float = 5.0) -> RouterInfo:
    """Liveliness, then the model list (which also proves the key works)."""
    url = settings.router_url
    async with openai.AsyncOpenAI(
        base_url=url,
        api_key=settings.api_key.get_secret_value() or "unset",
        max_retries=0,
        timeout=timeout_s,
    ) as client:
        try:
            await client.get(health_url(url), cast_to=object)
            page = await client.models.list()
        except openai.APIConnectionError:
            return RouterInfo(
                error=f"Cannot connect to Router at {safe_url(url)} — is it running? "
                "`docker compose up router` (or set HANZO_ROUTER_URL)"
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            return RouterInfo(
                error=f"{exc.status_code} from Router: invalid HANZO_API_KEY — generate a key in "
                "the Router dashboard and `export HANZO_API_KEY=...`"
            )
        except openai.APIStatusError as exc:
            return RouterInfo(
                error=f"{exc.status_code} from Router at {safe_url(url)}: {exc.message}"
            )
    return RouterInfo(models=sorted(m.id for m in page.data))


async def preflight(settings: Settings, timeout_s: float = 10.0) -> str | None:
    """Before `agentq run` enqueues anything: can the Router be reached, and does it take the
    key? The model list proves both. Returns the reason not to go on, or None. Other answers
    (a gateway without /models) are not a reason: the jobs will tell."""
    async with openai.AsyncOpenAI(
        base_url=settings.router_url,
        api_key=settings.api_key.get_secret_value() or "unset",
        max_retries=1,
        timeout=timeout_s,
    ) as client:
        try:
            await client.models.list()
        except openai.APIConnectionError:
            return (
                f"Cannot connect to Router at {safe_url(settings.router_url)} — is it running? "
                "`docker compose up router` (or set HANZO_ROUTER_URL)"
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            return (
                f"{exc.status_code} from Router at {safe_url(settings.router_url)}: invalid "
                "HANZO_API_KEY — generate a key in the Router dashboard and "
                "`export HANZO_API_KEY=...`"
            )
        except openai.APIStatusError:
            return None
    return None
