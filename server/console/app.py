"""The console's web app: two HTML pages, a JSON API they poll, adapter downloads, and monitoring endpoints.

Every route sits behind the token but `/healthz`. Each request opens the store read-only for
its own duration, so the console never holds a lock the federation could wait on.

Monitoring: `/healthz` is open, because load balancers and uptime probes seldom send headers and it tells
nothing about a run (see `health.py`). `/metrics` (Prometheus text) carries every run's figures, epsilon
per site among them, so it takes the console token like every other route, through the same constant-time
check: Prometheus sends it as a bearer header with `authorization: {credentials_file: ...}` in its scrape
config (or `params: {token: [...]}`, the query form the pages use).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client.exposition import choose_encoder

from fedtune.server.console.auth import token_guard
from fedtune.server.console.export import adapter_zip
from fedtune.server.console.health import store_health
from fedtune.server.console.metrics import registry_for
from fedtune.server.console.pages import overview_page, run_page
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


def create_app(store_path: Path, token: str) -> FastAPI:
    store_path = Path(store_path)
    app = FastAPI(title="fedtune console", docs_url=None, redoc_url=None, openapi_url=None)
    guarded = APIRouter(dependencies=[Depends(token_guard(token))])
    zips = _ZipCache()
    registry = registry_for(store_path)

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

    @guarded.get("/", response_class=HTMLResponse)
    def overview() -> str:
        if not store_path.is_file():
            return overview_page([], token)
        with opened() as store:
            return overview_page(runs_overview(store), token)

    @guarded.get("/runs/{run}", response_class=HTMLResponse)
    def run_html(run: str) -> str:
        with opened() as store:
            return run_page(store.run(run), token)

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

    app.include_router(guarded)
    return app
