"""``/v1``: analyses (create, read, overlays, delete) and the page's texts.

An upload is read into memory with a hard cap (never spooled to disk), checked by the pipeline's
own intake (``diagnosis.intake.decode``: the same formats and refusals as the bot, in a thread),
counted against the key's rate limit and daily quota, stored in Redis with the blob TTL and
enqueued as ``diagnose`` with ``channel="api"``. Accepted requests are answered exactly once
(``worker.api_out``); an Idempotency-Key makes a retried POST return the first analysis.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from contract import texts as bot_texts
from contract.analyses import analysis_path, callback_target_refused
from contract.envelope import MODES
from contract.formats import FORMAT_NAMES
from contract.i18n import LANGUAGES, accepted_language
from contract.monitoring import ERRORS

from .problems import MEDIA_TYPE, Problem
from .schema import Analysis
from .texts import page_texts
from .watchdog import envelope_for

router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="or the key in X-API-Key")
MULTIPART_OVERHEAD = 64 * 1024  # form fields and part headers around the image
REJECTION_STATUS = {"too_large": 413, "unsupported": 415}  # other intake refusals: 422
PROBLEM = {"content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


class InMemoryMultiPartParser(MultiPartParser):
    spool_max_size = 1 << 30  # above any accepted upload: the image never rolls over to a temporary file


def authenticate(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)] = None,
                 header_key: Annotated[str | None, Depends(api_key_header)] = None) -> str:
    """The client's name for a live key; 401 otherwise. The key itself goes nowhere else."""
    key = credentials.credentials if credentials is not None else header_key
    client = request.app.state.keys.authenticate(key)
    if client is None:
        raise Problem(401, "unauthorized", "Missing, wrong or revoked API key. Send it as 'Authorization: Bearer "
                      "<key>'.", headers={"WWW-Authenticate": 'Bearer realm="xray-second-opinion"'})
    return client


Client = Annotated[str, Depends(authenticate)]

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary", "description": FORMAT_NAMES},
        "mode": {"type": "string", "enum": list(MODES), "default": "screening"},
        "language": {"type": "string", "enum": list(LANGUAGES), "default": "en"},
        "callback_url": {"type": "string", "format": "uri", "description": "POSTed the finished analysis, signed"},
    }}}}}}


async def read_capped(request: Request, image_limit: int) -> bytes:
    """The form's bytes, refused once they pass the image limit and the form's own overhead (before the
    form's language is known: the "too large" wording in the language of ``Accept-Language``)."""
    limit = image_limit + MULTIPART_OVERHEAD
    language = accepted_language(request.headers.get("accept-language"))
    too_large = Problem(413, "too-large", bot_texts.too_large(language, image_limit // 2**20), code="too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_form(request: Request, body: bytes) -> dict[str, Any]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise Problem(415, "not-multipart", "Send the image as multipart/form-data with the field 'image'.")

    async def once():  # type: ignore[no-untyped-def]
        yield body

    try:
        form = await InMemoryMultiPartParser(request.headers, once(), max_files=1, max_fields=8).parse()
    except MultiPartException as error:
        raise Problem(400, "bad-form", f"The form could not be read: {error.message}") from None
    return dict(form.multi_items())


def field(form: dict[str, Any], name: str, default: str, allowed: Any) -> str:
    value = form.get(name) or default
    if not isinstance(value, str) or value not in allowed:
        raise Problem(422, "invalid-field", f"'{name}' must be one of: {', '.join(allowed)}.")
    return value


async def check_callback(request: Request, url: str | None) -> str | None:
    if not url:
        return None
    settings = request.app.state.settings
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError:
        parts = None
    schemes = ("https", "http") if settings.API_CALLBACK_ALLOW_HTTP else ("https",)
    if parts is None or parts.scheme not in schemes or not parts.hostname or len(url) > 2000:
        raise Problem(422, "invalid-callback", f"callback_url must be an absolute {' or '.join(schemes)} URL.")
    if settings.API_CALLBACK_SECRET is None:
        raise Problem(422, "callbacks-disabled", "This server has no API_CALLBACK_SECRET: callbacks are off. Poll "
                      "GET /v1/analyses/{id} instead.")
    refused = await run_in_threadpool(callback_target_refused, url, settings.API_CALLBACK_ALLOW_PRIVATE)
    if refused:
        raise Problem(422, "callback-not-public", refused)
    return url


def request_fingerprint(data: bytes, mode: str, language: str, callback_url: str | None) -> str:
    """What an Idempotency-Key is bound to besides the analysis: the same key with another image or
    other fields is a different request (refused), not a retry."""
    digest = hashlib.sha256(data)
    for part in (mode, language, callback_url or ""):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


async def check_image(data: bytes, language: str) -> None:
    from diagnosis.intake import ImageRejected, decode
    from diagnosis.messages import rejection_text

    try:
        await run_in_threadpool(decode, data)  # the decoded pixels are dropped at once
    except ImageRejected as error:
        status = REJECTION_STATUS.get(error.code, 422)
        kind = {413: "too-large", 415: "not-an-image"}.get(status, "unusable-image")
        raise Problem(status, kind, rejection_text(error.code, language), code=error.code) from None


def accepted(document: dict[str, Any], replayed: bool = False) -> JSONResponse:
    headers = {"Location": document["url"], "Retry-After": "1"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(document, status_code=202, headers=headers)


@router.post("/v1/analyses", status_code=202, tags=["analyses"], summary="Submit an image for analysis",
             openapi_extra=UPLOAD_BODY, response_model=Analysis,
             responses={202: {"description": "Accepted: poll the analysis URL (or wait for the callback)"},
                        **{code: PROBLEM for code in (400, 401, 413, 415, 422, 429, 503)}})
async def create_analysis(request: Request, client: Client,
                          idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None
                          ) -> JSONResponse:
    settings, store = request.app.state.settings, request.app.state.store
    body = await read_capped(request, settings.API_MAX_UPLOAD_BYTES)
    form = await parse_form(request, body)
    del body
    language = field(form, "language", "en", tuple(LANGUAGES))
    mode = field(form, "mode", MODES[0], MODES)
    callback_url = await check_callback(request, form.get("callback_url")
                                        if isinstance(form.get("callback_url"), str) else None)
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise Problem(422, "missing-image", "Attach the image as the form field 'image'.")
    data = await upload.read()
    await upload.close()
    if len(data) > settings.API_MAX_UPLOAD_BYTES:
        raise Problem(413, "too-large", bot_texts.too_large(language, settings.API_MAX_UPLOAD_BYTES // 2**20),
                      code="too_large")
    await check_image(data, language)

    request_id = store.new_request_id()
    if idempotency_key:
        fingerprint = request_fingerprint(data, mode, language, callback_url)
        existing, bound_to = await store.claim_idempotency(client, idempotency_key, request_id, fingerprint)
        if existing is not None:
            if bound_to and bound_to != fingerprint:  # empty: bound before fingerprints were kept
                raise Problem(422, "idempotency-key-reused", "This Idempotency-Key was already used with a different "
                              "request (another image, mode, language or callback_url). Use a new key for a new "
                              "request.")
            document = await store.document(existing, client)
            if document is None:
                raise Problem(409, "idempotency-in-progress", "A request with this Idempotency-Key is being "
                              "accepted; retry in a second.", headers={"Retry-After": "1"})
            return accepted(document, replayed=True)
    verdict, wait = await store.admit(client)
    if verdict != "ok":
        if idempotency_key:
            await store.release_idempotency(client, idempotency_key)
        retry_after = str(max(1, math.ceil(wait)))
        if verdict == "quota":
            raise Problem(429, "quota-exceeded", f"This key's daily quota ({settings.API_DAILY_QUOTA} images) is "
                          "used up; it renews at midnight UTC.", headers={"Retry-After": retry_after})
        raise Problem(429, "rate-limited", f"At most {settings.API_RATE_LIMIT} images per {settings.API_RATE_WINDOW_S}"
                      f" s per key. Retry in {retry_after} s.", headers={"Retry-After": retry_after})
    await store.accept(request_id, client, data, mode, language, callback_url)
    del data
    meta = {"client": client, "mode": mode, "language": language, "callback_url": callback_url or ""}
    try:
        await request.app.state.dispatcher.enqueue(envelope_for(settings.keys, request_id, meta))
    except Exception as error:
        await store.forget_accept(request_id)
        ERRORS.labels("api").inc()
        raise Problem(503, "unavailable", "The analysis queue is unavailable right now. Please try again in a few "
                      "minutes.", headers={"Retry-After": "30"}) from error
    document = await store.document(request_id, client)
    return accepted(document or {"id": request_id, "url": analysis_path(request_id), "status": "queued"})


async def owned(request: Request, analysis_id: str, client: str) -> dict[str, Any]:
    document = await request.app.state.store.document(analysis_id, client)
    if document is None:
        raise Problem(404, "not-found", "No such analysis for this key (it may have expired: results are kept "
                      f"{request.app.state.settings.BLOB_TTL_S // 60} minutes, or been deleted).")
    return document


@router.get("/v1/analyses/{analysis_id}", tags=["analyses"], summary="The analysis: status, then the result",
            response_model=Analysis,
            responses={200: {"description": "status queued|processing|succeeded|failed; result as xray-diagnose "
                             "--json"}, 401: PROBLEM, 404: PROBLEM})
async def get_analysis(request: Request, analysis_id: str, client: Client) -> JSONResponse:
    document = await owned(request, analysis_id, client)
    pending = document["status"] in ("queued", "processing")
    return JSONResponse(document, headers={"Retry-After": "1"} if pending else None)


@router.get("/v1/analyses/{analysis_id}/overlays/{number}", tags=["analyses"], summary="One heat-map overlay (JPEG)",
            response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, 401: PROBLEM, 404: PROBLEM})
async def get_overlay(request: Request, analysis_id: str, number: int, client: Client) -> Response:
    document = await owned(request, analysis_id, client)
    overlays = document.get("overlays") or []
    if not 1 <= number <= len(overlays):
        raise Problem(404, "not-found", f"This analysis has {len(overlays)} overlay(s).")
    jpeg = await request.app.state.store.overlay(analysis_id, overlays[number - 1]["label"])
    if jpeg is None:
        raise Problem(404, "not-found", "The overlay has expired.")
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, no-store"})


@router.delete("/v1/analyses/{analysis_id}", status_code=204, tags=["analyses"],
               summary="Delete the image, the result and the overlays now", responses={401: PROBLEM, 404: PROBLEM})
async def delete_analysis(request: Request, analysis_id: str, client: Client) -> Response:
    await owned(request, analysis_id, client)
    await request.app.state.store.delete(analysis_id)
    return Response(status_code=204)


@router.get("/v1/texts/{language}", tags=["page"], summary="The web page's texts in one language")
async def texts(language: str) -> dict[str, Any]:
    if language not in LANGUAGES:
        raise Problem(404, "not-found", f"Languages: {', '.join(LANGUAGES)}.")
    return page_texts(language)
