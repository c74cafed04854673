"""A static key table for the LiteLLM proxy: `general_settings.custom_auth` in config.yaml.

Without a database the proxy cannot look up virtual keys, and answers any key but the master
key with 400 `no_db_connection`. This hook accepts the keys in ``ROUTER_KEYS`` (comma-separated;
when unset, ``HANZO_API_KEY`` or else ``LITELLM_MASTER_KEY``) and answers every other key,
or none, with 401 `auth_error`, as a Router with a key database does. With no key configured
at all it rejects everything.

The proxy loads this file by path (it sits beside config.yaml) and runs it inside its own
virtualenv (.venv-router), so it imports litellm and fastapi, which agentq's .venv lacks.
"""

from __future__ import annotations

import hmac
import os

from fastapi import Request, status
from litellm.proxy._types import ProxyErrorTypes, ProxyException, UserAPIKeyAuth


def allowed_keys() -> list[str]:
    """The keys this Router accepts, read from the environment on every request."""
    table = [k.strip() for k in os.environ.get("ROUTER_KEYS", "").split(",") if k.strip()]
    if table:
        return table
    master = os.environ.get("HANZO_API_KEY") or os.environ.get("LITELLM_MASTER_KEY") or ""
    return [master.strip()] if master.strip() else []


def _reject(message: str) -> ProxyException:
    return ProxyException(
        message=f"Authentication Error, {message}",
        type=ProxyErrorTypes.auth_error,
        param="api_key",
        code=status.HTTP_401_UNAUTHORIZED,
    )


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    """Accept a key from the table; raise a 401 for anything else."""
    given = (api_key or "").removeprefix("Bearer ").strip()
    if not given:
        raise _reject("No api key passed in.")
    # Compare with every key in constant time, so timing does not tell how much matched.
    matched = False
    for key in allowed_keys():
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if not matched:
        raise _reject(f"Invalid proxy server token passed. Received API Key = sk-...{given[-4:]}")
    return UserAPIKeyAuth(api_key=given)
