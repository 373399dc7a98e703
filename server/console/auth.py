"""The console's one secret: a bearer token, because run metrics and adapters are the operator's alone.

A header is what scripts send; the page itself is opened from a link that
carries `?token=`, which its script then sends as a header on every poll.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable

from fastapi import HTTPException, Request, status

TOKEN_ENV = "FEDTUNE_CONSOLE_TOKEN"


def resolve_token(given: str | None) -> tuple[str, bool]:
    """The token to require: --token, else $FEDTUNE_CONSOLE_TOKEN, else a fresh one (returned as generated)."""
    token = given or os.environ.get(TOKEN_ENV)
    if token:
        if len(token) < 16:
            raise ValueError(f"the console token must be at least 16 characters (got {len(token)})")
        return token, False
    return secrets.token_urlsafe(24), True


def token_guard(token: str) -> Callable[[Request], None]:
    """A dependency that admits a request carrying the token as a bearer header or `?token=` query."""
    expected = token.encode()

    def check(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        offered = value.strip() if scheme.lower() == "bearer" else request.query_params.get("token", "")
        if not offered or not secrets.compare_digest(offered.encode(), expected):
            raise HTTPException(
                status_code=status.HTTP_401_UNAUTHORIZED,
                detail="console token required: open the URL `fedtune console` printed (it ends in ?token=...), "
                "or send `Authorization: Bearer TOKEN`",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check
