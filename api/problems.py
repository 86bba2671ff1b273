"""Errors as RFC 9457 problem details (``application/problem+json``), never a stack trace.

``type`` is a stable URI per kind of problem (documented in docs/api.md), ``title`` its short
English summary, ``detail`` what happened to this request (in the request's language where the
text exists in the catalogs), ``status`` the HTTP status; 429s carry ``Retry-After``.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.monitoring import ERRORS

MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "urn:xray-second-opinion:problem:"  # + the kind, e.g. ...:rate-limited (docs/api.md)
TITLES = {
    400: "Bad request", 401: "Missing or wrong API key", 404: "Not found", 405: "Method not allowed",
    409: "Conflict", 413: "Upload too large", 415: "Not an image", 422: "Unusable input", 429: "Too many requests",
    500: "Internal error", 503: "Service unavailable",
}

log = logging.getLogger(__name__)


class Problem(Exception):
    def __init__(self, status: int, kind: str, detail: str, *, headers: dict[str, str] | None = None,
                 **extra: object):
        super().__init__(kind)
        self.status, self.kind, self.detail, self.headers, self.extra = status, kind, detail, headers or {}, extra


def problem_response(status: int, kind: str, detail: str, instance: str | None = None,
                     headers: dict[str, str] | None = None, **extra: object) -> JSONResponse:
    body = {"type": TYPE_BASE + kind, "title": TITLES.get(status, "Error"), "status": status, "detail": detail,
            **({"instance": instance} if instance else {}), **extra}
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, error: Problem) -> JSONResponse:
        return problem_response(error.status, error.kind, error.detail, request.url.path, error.headers,
                                **error.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        fields = [".".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("msg", "")) for e in error.errors()]
        return problem_response(422, "invalid-request", "; ".join(fields) or "invalid request", request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not-found", 405: "method-not-allowed"}.get(error.status_code, "http-error")
        detail = error.detail if isinstance(error.detail, str) else TITLES.get(error.status_code, "Error")
        return problem_response(error.status_code, kind, detail, request.url.path, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error("unexpected %s on %s %s", type(error).__name__, request.method, request.url.path, exc_info=error)
        ERRORS.labels("api").inc()
        return problem_response(500, "internal-error", "Something went wrong on our side. Please try again.",
                                request.url.path)
