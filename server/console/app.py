"""The console's web app: HTML pages, the JSON and CSV they serve, adapter downloads, monitoring endpoints.

Every route sits behind the token but `/healthz` and the sign-in form. A browser presents the token once (the
printed `?token=` URL or /login) and gets a session cookie and a redirect to an address without it (`login.py`,
`session.py`): the pages never put the token in a link. Scripts send `Authorization: Bearer TOKEN`. Each request
opens the store read-only for its own duration, so the console never holds a lock the federation could wait on.

Monitoring: `/healthz` is open, because load balancers and uptime probes seldom send headers and it tells
nothing about a run (see `health.py`). `/metrics` (Prometheus text) carries every run's figures, epsilon
per site among them, so it takes the console token like every other route, through the same constant-time
check: Prometheus sends it as a bearer header with `authorization: {credentials_file: ...}` in its scrape
config (or `params: {token: [...]}`, the query form, which a scraper keeps out of any browser history).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client.exposition import choose_encoder
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedtune.server.console.auth import token_guard
from fedtune.server.console.export import adapter_zip
from fedtune.server.console.health import store_health
from fedtune.server.console.login import exchange_query_token, login_html, login_router, without_token
from fedtune.server.console.metrics import registry_for
from fedtune.server.console.pages import overview_page, recipe_html, run_page
from fedtune.server.console.recipe import recipe_sections
from fedtune.server.console.rounds_csv import rounds_csv
from fedtune.server.console.security import add_common_headers, new_nonce, page_headers
from fedtune.server.console.session import Sessions
from fedtune.server.console.views import run_view, runs_overview
from fedtune.server.store import CheckpointError, RunStore, StoreError


class _ZipCache:
    """Building an adapter zip loads the base model (seconds); a checkpoint never changes, so keep a few."""

    def __init__(self, size: int = 4) -> None:
        self._items: OrderedDict[tuple[str, int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.size = size

    def get(self, store: RunStore, run: str, round_: int) -> bytes:
        sha = store.checkpoint(run, round_).sha256
        key = (run, round_, sha)
        with self._lock:  # one build at a time: two would only double the memory for the same bytes
            if key not in self._items:
                self._items[key] = adapter_zip(store, run, round_)
                while len(self._items) > self.size:
                    self._items.popitem(last=False)
            self._items.move_to_end(key)
            return self._items[key]


def _wants_html(request: Request) -> bool:
    """A browser navigating (not the page's own fetch, nor a script): it should get the sign-in form."""
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


def create_app(store_path: Path, token: str) -> FastAPI:
    store_path = Path(store_path)
    app = FastAPI(title="fedtune console", docs_url=None, redoc_url=None, openapi_url=None)
    app.middleware("http")(add_common_headers)
    sessions = Sessions(token)
    guarded = APIRouter(dependencies=[Depends(token_guard(token, sessions))])
    zips = _ZipCache()
    registry = registry_for(store_path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 401 and _wants_html(request):
            wrong = "That is not this console's token." if "token" in request.query_params else None
            response = login_html(without_token(request), error=wrong, status_code=401)
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return await http_exception_handler(request, exc)

    @contextmanager
    def opened() -> Iterator[RunStore]:
        try:
            store = RunStore(store_path, readonly=True)
        except StoreError as exc:
            raise HTTPException(503, detail=str(exc)) from None
        try:
            yield store
        except CheckpointError as exc:
            raise HTTPException(409, detail=str(exc)) from None
        except StoreError as exc:
            raise HTTPException(404, detail=str(exc)) from None
        finally:
            store.close()

    def page(render: Callable[[str], str]) -> HTMLResponse:
        nonce = new_nonce()
        return HTMLResponse(render(nonce), headers=page_headers(nonce))

    @guarded.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> Response:
        if (redirect := exchange_query_token(request, token, sessions)) is not None:
            return redirect
        if not store_path.is_file():
            return page(lambda nonce: overview_page([], nonce))
        with opened() as store:
            runs = runs_overview(store)
        return page(lambda nonce: overview_page(runs, nonce))

    @guarded.get("/runs/{run}", response_class=HTMLResponse)
    def run_html(run: str, request: Request) -> Response:
        if (redirect := exchange_query_token(request, token, sessions)) is not None:
            return redirect
        with opened() as store:
            info = store.run(run)
        federation = json.loads(info["federation"])
        recipe = recipe_html(recipe_sections(federation, info), federation)
        return page(lambda nonce: run_page(info, recipe, nonce))

    @guarded.get("/api/runs")
    def api_runs() -> list[dict[str, Any]]:
        if not store_path.is_file():
            return []
        with opened() as store:
            return runs_overview(store)

    @guarded.get("/api/runs/{run}")
    def api_run(run: str) -> dict[str, Any]:
        with opened() as store:
            return run_view(store, run)

    @guarded.get("/api/runs/{run}/recipe")
    def api_recipe(run: str) -> dict[str, Any]:
        """The recipe sections the page shows, and the stored spec they were read from."""
        with opened() as store:
            info = store.run(run)
        federation = json.loads(info["federation"])
        return {"run": info["id"], "sections": recipe_sections(federation, info), "federation": federation}

    @guarded.get("/api/runs/{run}/rounds.csv")
    def api_rounds_csv(run: str) -> Response:
        with opened() as store:
            run_id = store.run(run)["id"]
            text = rounds_csv(store, run_id)
        return Response(
            text,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="fedtune-{run_id}-rounds.csv"'},
        )

    @guarded.get("/api/runs/{run}/checkpoints/{round_}/adapter.zip")
    def download(run: str, round_: int) -> Response:
        with opened() as store:
            run_id = store.run(run)["id"]
            data = zips.get(store, run_id, round_)
        filename = f"fedtune-{run_id}-round-{round_}.zip"
        return Response(
            data, media_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{filename}"'}
        )

    @guarded.get("/metrics")
    def metrics(request: Request) -> Response:
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), media_type=content_type)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        code, body = store_health(store_path)
        return JSONResponse(body, status_code=code)

    app.include_router(login_router(token, sessions))
    app.include_router(guarded)
    return app
