"""The browser's proof that it was given the token: a signed, expiring cookie, so the token stays out of URLs.

A URL carrying `?token=` ends up in the address bar, the browser's history, proxy logs and the Referer of every
link followed from the page. So the page takes the token once (the URL `fedtune console` prints, or the /login
form), answers with this cookie and a redirect to the same address without it, and from then on every page, poll
and download rides on the cookie.

The cookie is HttpOnly (no script on the page can read it) and SameSite=Strict (no other site's page can make the
browser send it), and Secure when the console is reached over HTTPS. It holds its issue time and an HMAC of that
time keyed by a hash of the token, never the token: it expires (`SESSION_TTL_S`), a console restarted with a new
token voids every cookie it issued, and a stolen cookie is not the bearer token that scripts and the Prometheus
scrape use.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

from fastapi import Request, Response

SESSION_TTL_S = 12 * 3600  # one working day: an operator signs in again each morning with the printed URL
COOKIE_PREFIX = "fedtune_console"


class Sessions:
    """Issues and checks the session cookies of one console (one token)."""

    def __init__(self, token: str, *, ttl_s: int = SESSION_TTL_S, clock: Callable[[], float] = time.time) -> None:
        # A key of its own, not the token: the cookie's MAC must never be usable as a token, nor the reverse.
        self._key = hashlib.sha256(b"fedtune console session v1\0" + token.encode()).digest()
        self.ttl_s = ttl_s
        self.clock = clock

    @staticmethod
    def cookie_name(request: Request) -> str:
        """Cookies ignore ports, so two consoles on one host (say, two stores) would overwrite one another's
        cookie under a shared name: each port gets its own."""
        port = request.url.port
        return f"{COOKIE_PREFIX}_{port}" if port else COOKIE_PREFIX

    def _mac(self, issued: str) -> str:
        return hmac.new(self._key, issued.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> str:
        issued = str(int(self.clock()))
        return f"{issued}.{self._mac(issued)}"

    def valid(self, value: str) -> bool:
        """True for a cookie this console issued that has not expired; the MAC is compared in constant time."""
        issued, _, mac = value.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(mac.encode(), self._mac(issued).encode()):
            return False
        age = self.clock() - int(issued)
        return -60 <= age < self.ttl_s  # a minute of clock slack; a cookie from the future is not one we issued

    def presented(self, request: Request) -> bool:
        value = request.cookies.get(self.cookie_name(request))
        return bool(value) and self.valid(value)

    def attach(self, response: Response, request: Request) -> None:
        """Set a fresh session cookie on `response`."""
        response.set_cookie(
            self.cookie_name(request),
            self.issue(),
            max_age=self.ttl_s,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
