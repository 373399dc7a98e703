"""Response headers that keep the console's pages and data where they belong.

- `Referrer-Policy: no-referrer`: no page address leaves with a link the operator follows;
- `Cache-Control: no-store`: run figures and adapters are not left in shared or disk caches;
- a Content-Security-Policy on pages: scripts and styles only from the page itself, and only the inline blocks
  that carry this response's nonce, so text that came from a site (a decline reason, a label) can never run as
  script even if an escape were missed; requests only back to the console; no framing (clickjacking).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from fastapi import Request, Response

ALWAYS = {
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def new_nonce() -> str:
    return secrets.token_urlsafe(18)


def page_headers(nonce: str) -> dict[str, str]:
    """Headers for one HTML response whose inline `<script>` and `<style>` blocks carry `nonce`."""
    policy = (
        "default-src 'none'; "
        f"script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
    return {"Content-Security-Policy": policy}


async def add_common_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """HTTP middleware: `ALWAYS` on every response, without overriding a header a route set itself."""
    response = await call_next(request)
    for name, value in ALWAYS.items():
        response.headers.setdefault(name, value)
    return response
