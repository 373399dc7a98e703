"""How a browser gets its session cookie: the printed `?token=` URL once, or the /login form.

Either way the answer is a 303 redirect that sets the cookie and lands on an address without the token, so the
token is not left in the address bar, in the history entry the page makes, nor in the Referer of a link followed
from it. A wrong token gets 401 and no cookie.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fedtune.server.console.auth import denied, token_matches
from fedtune.server.console.pages import login_page
from fedtune.server.console.security import new_nonce, page_headers
from fedtune.server.console.session import Sessions

MAX_FORM_BYTES = 4096  # a token and a path: anything larger is not our form


def without_token(request: Request) -> str:
    """The request's path and query, less `token`: where the browser should be once it holds the cookie."""
    rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
    return request.url.path + (f"?{urlencode(rest)}" if rest else "")


def safe_next(value: str | None) -> str:
    """Only a path on this console: `next` must never send a freshly signed-in browser to another site."""
    if not value or not value.startswith("/") or value.startswith(("//", "/\\")) or any(c < " " for c in value):
        return "/"
    return value


def signed_in(request: Request, sessions: Sessions, location: str) -> RedirectResponse:
    response = RedirectResponse(location, status_code=303)
    sessions.attach(response, request)
    return response


def exchange_query_token(request: Request, token: str, sessions: Sessions) -> RedirectResponse | None:
    """On a page opened with `?token=`: the cookie and a redirect to the same page without it; else None."""
    if "token" not in request.query_params:
        return None
    if not token_matches(request.query_params["token"], token):
        raise denied()
    return signed_in(request, sessions, without_token(request))


async def _small_form(request: Request) -> dict[str, list[str]]:
    """The urlencoded form, read only up to `MAX_FORM_BYTES`: an open route must not buffer whatever it is sent."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    return parse_qs(body.decode("utf-8", "replace"))


def login_html(next_url: str, *, error: str | None = None, status_code: int = 200) -> HTMLResponse:
    nonce = new_nonce()
    html = login_page(nonce, next_url=safe_next(next_url), error=error)
    return HTMLResponse(html, status_code=status_code, headers=page_headers(nonce))


def login_router(token: str, sessions: Sessions) -> APIRouter:
    """GET /login (the form) and POST /login (token in the body, never in a URL); both open, like any sign-in."""
    router = APIRouter()

    @router.get("/login", response_class=HTMLResponse)
    def form(next_url: Annotated[str, Query(alias="next")] = "/") -> HTMLResponse:
        return login_html(next_url)

    @router.post("/login")
    async def submit(request: Request) -> Response:
        fields = await _small_form(request)
        offered = fields.get("token", [""])[0]
        next_url = safe_next(fields.get("next", ["/"])[0])
        if not token_matches(offered, token):
            return login_html(next_url, error="That is not this console's token.", status_code=401)
        return signed_in(request, sessions, next_url)

    return router
