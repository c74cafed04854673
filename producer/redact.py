"""URLs and values made safe to print: parsed, never sliced, so no part of a secret shows."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

HIDDEN = "***"

SAFE_QUERY_KEYS = frozenset(
    {"db", "ssl_cert_reqs", "ssl_check_hostname", "protocol", "decode_responses", "api-version"}
)
"""Query parameters whose values are shown; every other value (password=, key=, token=, and
ones we don't know) is hidden."""


def safe_url(url: str) -> str:
    """`url` for messages: the user name stays but the password goes (`user:***@host`), query
    values are hidden except a few known harmless ones, the fragment goes. A string that does
    not parse as a URL is hidden whole."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return HIDDEN
    if not parts.scheme:
        return HIDDEN
    if "@" in parts.path or "@" in parts.query or "@" in parts.fragment:
        # An unescaped @ after the host: a password with a / ? or # in it ran past the
        # netloc, so anything after the host may be part of it.
        return f"{parts.scheme}://{HIDDEN}"
    netloc = host or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if port is not None:
        netloc += f":{port}"
    if parts.username is not None or parts.password is not None:
        user = quote(parts.username or "", safe="")
        userinfo = f"{user}:{HIDDEN}" if parts.password is not None and user else HIDDEN
        netloc = f"{userinfo}@{netloc}"
    query = "&".join(
        f"{k}={v if k in SAFE_QUERY_KEYS else HIDDEN}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def url_secrets(url: str | None) -> list[str]:
    """The password and the query values of a URL, for a log redactor's list."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        return []
    found += [v for k, v in parse_qsl(parts.query) if k not in SAFE_QUERY_KEYS]
    return [s for s in found if s]
