"""The console's one secret: a bearer token, because run metrics and adapters are the operator's alone.

Three ways to present it, each checked in constant time:
- `Authorization: Bearer TOKEN`: scripts, `curl`, the Prometheus scrape (`authorization: {credentials_file: ...}`);
- `?token=TOKEN`: the URL `fedtune console` prints, and the scrape's `params: {token: [...]}` form. On a page the
  console swaps it at once for a session cookie and redirects to the address without it (`session.py`), so the
  token never stays in the address bar, the history or a Referer; the page itself never writes it into a link;
- the session cookie: what the browser sends for every page, poll and download after that first visit.

A request that offers a bearer header is judged by it alone, then one with a `?token=` by that alone: a wrong
credential is refused even if a valid cookie rides along, so a mistyped token never looks accepted.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable

from fastapi import HTTPException, Request, status

from fedtune.server.console.session import Sessions

TOKEN_ENV = "FEDTUNE_CONSOLE_TOKEN"
DENIED = (
    "console token required: open the URL `fedtune console` printed (it ends in ?token=...) or sign in at /login, "
    "or send `Authorization: Bearer TOKEN`"
)


def resolve_token(given: str | None) -> tuple[str, bool]:
    """The token to require: --token, else $FEDTUNE_CONSOLE_TOKEN, else a fresh one (returned as generated)."""
    token = given or os.environ.get(TOKEN_ENV)
    if token:
        if len(token) < 16:
            raise ValueError(f"the console token must be at least 16 characters (got {len(token)})")
        return token, False
    return secrets.token_urlsafe(24), True


def token_matches(offered: str, token: str) -> bool:
    """Constant-time comparison, so response timing tells nothing about how much of a guess was right."""
    return bool(offered) and secrets.compare_digest(offered.encode(), token.encode())


def bearer(request: Request) -> str | None:
    """The token of an `Authorization: Bearer` header; None without one (another scheme counts as none)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def denied() -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED, detail=DENIED, headers={"WWW-Authenticate": "Bearer"}
    )


def token_guard(token: str, sessions: Sessions) -> Callable[[Request], None]:
    """A dependency that admits a request with the token (bearer header or `?token=`) or a live session cookie."""

    def check(request: Request) -> None:
        offered = bearer(request)
        if offered is None and "token" in request.query_params:
            offered = request.query_params["token"]
        if offered is not None:
            if token_matches(offered, token):
                return
            raise denied()
        if not sessions.presented(request):
            raise denied()

    return check
