"""The FastAPI application: ``create_app(settings)``. Routes in ``api.routes``; this wires the rest.

Lifespan: the Redis store, the Celery producer (``bot.dispatch``: ``diagnose`` by name, JSON only),
the keys file and the watchdog loop. Every response is counted in ``xray_api_requests_total`` by
route template (never by id) and status; errors are problem details (``api.problems``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from bot.dispatch import Dispatcher
from contract.analyses import SCHEMA_VERSION
from contract.formats import FORMAT_NAMES
from contract.monitoring import API_REQUESTS, API_SECONDS, queue_collector
from contract.settings import ServiceSettings

from . import problems, routes
from .auth import KeyFile
from .schema import Problem
from .store import ApiStore
from .watchdog import Watchdog

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_collector_registered = False

DESCRIPTION = "Post an X-ray (" + FORMAT_NAMES + """), get the same analysis as the Telegram bot: whether it is an
X-ray, which body part, the chest findings with their probabilities, heat maps and the prompt to see
a physician. **A decision aid, not a diagnosis.** Authenticate with `Authorization: Bearer <key>`.
Errors are RFC 9457 problem details. Analysis schema version """ + SCHEMA_VERSION + "; see docs/api.md."


def create_app(settings: ServiceSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = ApiStore(settings)
        dispatcher = Dispatcher(settings)
        app.state.store, app.state.dispatcher = store, dispatcher
        watchdog = Watchdog(store, dispatcher.enqueue)
        task = asyncio.create_task(watchdog.run(), name="api-watchdog")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            dispatcher.close()
            await store.close()

    app = FastAPI(title="X-ray second opinion API", version=SCHEMA_VERSION, description=DESCRIPTION,
                  lifespan=lifespan)
    app.state.settings = settings
    app.state.keys = KeyFile(settings.API_KEYS_FILE)
    problems.install(app)
    app.include_router(routes.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _register_queue_depth(settings)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    @app.middleware("http")
    async def count(request: Request, call_next):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        API_REQUESTS.labels(route, str(response.status_code)).inc()
        API_SECONDS.labels(route).observe(time.perf_counter() - started)
        if route in ("/", "/static"):
            response.headers["Content-Security-Policy"] = PAGE_CSP
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Redis answers and the keys file is readable")
    async def readyz(request: Request) -> Response:
        try:
            redis_ok = await asyncio.wait_for(request.app.state.store.ping(), timeout=2)
        except Exception:
            redis_ok = False
        keys_ok = request.app.state.keys.readable()
        if redis_ok and keys_ok:
            return Response('{"status":"ready"}', media_type="application/json")
        detail = "Redis does not answer" if not redis_ok else "the API keys file cannot be read"
        return problems.problem_response(503, "not-ready", detail, "/readyz")

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    def metrics() -> Response:  # a thread: the queue depth is read from Redis synchronously
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document plus the Problem schema the error responses refer to."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        document.setdefault("components", {}).setdefault("schemas", {})["Problem"] = Problem.model_json_schema()
        app.openapi_schema = document
    return app.openapi_schema


def _register_queue_depth(settings: ServiceSettings) -> None:
    global _collector_registered
    if not _collector_registered:
        REGISTRY.register(queue_collector(settings))
        _collector_registered = True
