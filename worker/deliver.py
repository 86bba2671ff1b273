"""Celery task ``deliver`` (queue ``delivery``): the reply, rendered once in the user's language, sent once.

Requests from the HTTP API (``envelope.channel == "api"``) are answered by ``worker.api_out`` instead:
the answer is stored in Redis for ``GET /v1/analyses/{id}`` and the signed callback queued.

The text (from the JSON result, ``diagnosis.messages.render_reply``) and then the overlays (one per
drawn finding: one as a photo with its localized caption, several as one album with one caption on
its first photo, naming each photo's finding in order) are sent
exactly once: each part is marked in Redis *after* Telegram accepted it and the mark is checked
before sending, so retried or redelivered tasks never send twice. In clinician mode an analysed
result adds a last part, ``report``: the one-page PDF (``diagnosis.pdf_report``, in the user's
language, no patient identifiers), made here from the result, the overlays and the image while
they are still held, and sent as a document. DICOM objects are never sent into a chat (PHI). An
album is one Bot API call (``sendMediaGroup``) and one part (``album``): Telegram accepts or refuses
it as a whole. Then the image and the overlays are deleted. No models and no torch here:
delivery-only workers stay light.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from contract import texts
from contract.bursts import UNKNOWN, earlier_unanswered, leave_ack, leave_turns
from contract.envelope import RequestEnvelope
from contract.keys import (
    DELIVER_TASK,
    DELIVERY_QUEUE,
    TELEGRAM_ALBUM_LIMIT,
    TELEGRAM_CAPTION_LIMIT,
    TELEGRAM_TEXT_LIMIT,
    Keys,
)
from contract.monitoring import DELIVERIES
from contract.settings import Settings

from .api_out import store_answer
from .celery_app import app
from .celery_app import settings as service_settings
from .resources import (
    REDIS_UNAVAILABLE,
    get_out,
    get_redis,
    get_scheduler,
    get_settings,
    has_bot_token,
    retry_later,
    retry_while_redis_is_down,
    telegram_settings,
)
from .telegram_out import Deferred, TelegramOut, Undeliverable

logger = get_task_logger(__name__)

LOCK_RELEASE_LUA = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@app.task(
    name=DELIVER_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=service_settings.DELIVER_SOFT_TIME_LIMIT_S,
    time_limit=service_settings.DELIVER_TIME_LIMIT_S,
    max_retries=service_settings.DELIVER_MAX_RETRIES,
)
def deliver(
    self: Task,
    envelope: dict[str, Any],
    result: dict[str, Any] | None = None,
    overlay_key: str | None = None,
    failure: str | None = None,
    turn_since: float | None = None,
) -> dict[str, Any]:
    """Send the reply (text, then the overlay photo or album) exactly once, then clean up.

    A chat's replies go out in the order its images were sent (``contract.bursts``): while an
    earlier image of the chat is unanswered this run parks the task for ``ORDER_POLL_S`` and ends;
    ``turn_since`` (Redis' clock, seconds) is when it first found itself waiting, which bounds the
    wait to ``DELIVER_ORDER_WAIT_S``. Parking does not count as a retry."""
    request = RequestEnvelope.model_validate(envelope)
    settings = get_settings()
    if request.channel == "api":  # the HTTP API: store the answer for GET /v1/analyses/{id}, then the callback
        try:
            outcome = store_answer(get_redis(), app, settings, request, result, overlay_key, failure)
        except REDIS_UNAVAILABLE as error:
            raise retry_while_redis_is_down(self, settings, request.request_id, error) from None
        DELIVERIES.labels("stored" if outcome.get("stored") else "duplicate").inc()
        return outcome
    try:
        waiting = wait_for_turn(get_redis(), settings, request, turn_since)
        if waiting is not None:
            get_scheduler().later(DELIVER_TASK, {**dict(self.request.kwargs or {}), "turn_since": waiting},
                                  DELIVERY_QUEUE, ORDER_POLL_S, self.request.retries)
            return {"sent": [], "waiting_since": waiting}
    except REDIS_UNAVAILABLE as error:
        raise retry_while_redis_is_down(self, settings, request.request_id, error) from None
    try:
        if not has_bot_token():  # a worker of an API-only deployment: leave Telegram to one with the token
            raise Deferred(settings.MAX_RETRY_DELAY_S, "no TELEGRAM_BOT_TOKEN on this worker")
        sent = send_reply(get_redis(), get_out(), telegram_settings(), request, result=result,
                          overlay_key=overlay_key, failure=failure)
    except Deferred as deferred:
        DELIVERIES.labels("deferred").inc()
        if self.request.retries >= (self.max_retries or 0):
            logger.error("request %s: giving up delivery after %d retries (%s)", request.request_id,
                         self.request.retries, deferred.reason)
            cleanup(get_redis(), settings.keys, request, overlay_key)
            return {"sent": [], "gave_up": deferred.reason}
        countdown = min(max(deferred.delay, 0.5), settings.MAX_RETRY_DELAY_S)
        logger.info("request %s: delivery deferred (%s), retry in %.1fs", request.request_id, deferred.reason,
                    countdown)
        return retry_later(self, DELIVERY_QUEUE, countdown)
    except REDIS_UNAVAILABLE as error:  # raised before anything was sent (see send_reply)
        raise retry_while_redis_is_down(self, settings, request.request_id, error) from None
    except Undeliverable as error:
        logger.warning("request %s: undeliverable: %s", request.request_id, error)
        DELIVERIES.labels("undeliverable").inc()
        cleanup(get_redis(), settings.keys, request, overlay_key)
        return {"sent": [], "undeliverable": str(error)}
    DELIVERIES.labels("sent").inc(len(sent))
    return {"sent": sent}


ORDER_POLL_S = 0.5  # how often a reply waiting for an earlier one of its chat looks again


def wait_for_turn(r: redis.Redis, settings: Settings, request: RequestEnvelope,
                  since: float | None) -> float | None:
    """None: answer now. Else the time (Redis' clock) this request started waiting for the chat's
    earlier requests to be answered: park it and look again."""
    if settings.DELIVER_ORDER_WAIT_S <= 0 or r.exists(settings.keys.done(request.request_id)):
        return None
    earlier = earlier_unanswered(r, settings.keys, request.chat_id, request.request_id)
    if not earlier:
        return None
    seconds, micros = r.time()
    now = seconds + micros / 1e6
    since = now if since is None else since
    if now - since < settings.DELIVER_ORDER_WAIT_S:
        return since
    # Stuck (a dead worker, a long retry): its chat's later replies stop waiting for it.
    logger.warning("request %s: %d earlier request(s) of its chat still unanswered after %.0fs; answering "
                   "out of order", request.request_id, len(earlier), now - since)
    leave_turns(r, settings.keys, request.chat_id, *earlier)
    return None


def compose_texts(language: str, result: dict[str, Any] | None, failure: str | None) -> list[str]:
    """The reply as one or more Telegram messages (≤ 4096 characters each), rendered here and only here."""
    from diagnosis.messages import apology, render_reply

    if failure == "expired":
        text = texts.expired(language)
    elif failure is not None or result is None:
        text = apology(language)
    else:
        from diagnosis.report import DiagnosisResult

        try:
            text = render_reply(DiagnosisResult.model_validate(result), language)
        except Exception:
            logger.exception("rendering the reply failed")
            text = apology(language)
    return split_text(text, TELEGRAM_TEXT_LIMIT)


def split_text(text: str, limit: int) -> list[str]:
    """Split at paragraph or line breaks so that every piece fits one message."""
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = rest.rfind("\n\n", 0, limit)
        if cut <= 0:
            cut = rest.rfind("\n", 0, limit)
        if cut <= 0:
            cut = rest.rfind(" ", 0, limit)
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest or not pieces:
        pieces.append(rest)
    return pieces


def send_reply(
    r: redis.Redis,
    out: TelegramOut,
    settings: Settings,
    request: RequestEnvelope,
    *,
    result: dict[str, Any] | None = None,
    overlay_key: str | None = None,
    failure: str | None = None,
) -> list[str]:
    """Idempotent delivery; returns the parts sent by this call. Raises ``Deferred``/``Undeliverable``."""
    keys, request_id, chat_id = settings.keys, request.request_id, request.chat_id
    if r.exists(keys.done(request_id)):  # answered already (redelivered or duplicated task)
        leave_ack(r, keys, request_id)  # in case a run died between the done mark and this
        cleanup(r, keys, request, overlay_key)
        return []
    token = secrets.token_hex(8)
    if not r.set(keys.lock(request_id), token, nx=True, ex=settings.DELIVER_TIME_LIMIT_S):
        raise Deferred(2.0, "another delivery of this request is in progress")
    sent: list[str] = []
    try:
        if r.exists(keys.done(request_id)):  # finished while we waited for the lock (or claimed lost by the bot)
            cleanup(r, keys, request, overlay_key)
            return []
        parts: list[tuple[str, str]] = [
            (f"text{index}", text) for index, text in enumerate(compose_texts(request.language, result, failure))
        ]
        overlays = load_overlays(r, overlay_key, result) if overlay_key and failure is None else []
        if overlays:  # none: expired or forgotten; the text is enough
            parts.append(("photo" if len(overlays) == 1 else "album", overlay_key))
        if request.mode == "clinician" and failure is None and (result or {}).get("outcome") == "analysed":
            parts.append(("report", ""))
        marks = [keys.sent(request_id, part) for part, _ in parts]
        already = [bool(flag) for flag in r.mget(marks)]
        # From here on Telegram is the record: once a part is accepted, a Redis failure (a restart)
        # must not stop the rest of the answer, nor leave the acknowledgement standing (the bot
        # would then tell the user the request was lost). Marks are written best effort.
        for (part, payload), mark, done_before in zip(parts, marks, already, strict=True):
            if done_before:
                continue
            if part == "report":
                document = report_document(r, request, result, overlays)
                if document is None:
                    continue  # could not be made: the reply stands without it
                out.send_document(chat_id, document, REPORT_FILENAME, caption=report_caption(request.language),
                                  reply_to=request.reply_to_message_id)
            elif part in ("photo", "album"):
                captions = [overlay_caption(label, result, request.language) for label, _jpeg in overlays]
                if part == "photo":
                    out.send_photo(chat_id, overlays[0][1], caption=captions[0], reply_to=request.reply_to_message_id)
                else:  # one caption for the album, on its first photo: Telegram shows it once, under the album
                    caption = album_caption(captions)
                    photos = [(jpeg, caption if index == 0 else None) for index, (_label, jpeg) in enumerate(overlays)]
                    out.send_media_group(chat_id, photos, reply_to=request.reply_to_message_id)
            else:
                out.send_text(chat_id, payload, reply_to=request.reply_to_message_id)
            sent.append(part)
            _best_effort(r.set, mark, "1", ex=settings.MARK_TTL_S)  # only after Telegram accepted it
        del overlays
        mark_answered(r, keys.done(request_id), settings.MARK_TTL_S)
        # The answer replaces the acknowledgement; one covering a burst (contract.bursts) goes with
        # the burst's last answer.
        try:
            ack = leave_ack(r, keys, request_id)
        except redis.RedisError:
            ack = UNKNOWN
        if ack == UNKNOWN:
            ack = request.ack_message_id or 0
        if ack > 0:
            out.delete_message(chat_id, ack)
        _best_effort(cleanup, r, keys, request, overlay_key)
    finally:
        _best_effort(r.eval, LOCK_RELEASE_LUA, 1, keys.lock(request_id), token)
    return sent


def load_overlays(r: redis.Redis, key: str, result: dict[str, Any] | None) -> list[tuple[str | None, bytes]]:
    """(label, JPEG) per overlay, in the order drawn (``result["heatmap_labels"]``); [] when gone.

    The key holds a hash (finding label → JPEG); a plain string (one overlay, written by an older
    worker during a rolling update) is read as a single overlay of the first drawn label."""
    labels = list((result or {}).get("heatmap_labels") or [])
    kind = r.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind == "string":
        data = r.get(key)
        return [(labels[0] if labels else None, data)] if data is not None else []
    if kind != "hash":
        return []
    stored = {(k.decode() if isinstance(k, bytes) else k): v for k, v in r.hgetall(key).items()}
    ordered = [label for label in labels if label in stored] + sorted(set(stored) - set(labels))
    return [(label, stored[label]) for label in ordered][:TELEGRAM_ALBUM_LIMIT]


REPORT_FILENAME = "xray-second-opinion-report.pdf"


def report_document(r: redis.Redis, request: RequestEnvelope, result: dict[str, Any] | None,
                    overlays: list[tuple[str | None, bytes]]) -> bytes | None:
    """The PDF report of an analysed result, in memory; None when it cannot be made (logged, no details).

    The image is read from Redis while it is still there (best effort: without it the report shows
    the evidence maps only); nothing is written to disk."""
    from diagnosis.intake import ImageRejected, decode
    from diagnosis.pdf_report import report_pdf
    from diagnosis.report import DiagnosisResult

    image = None
    try:
        data = r.get(request.blob_key)
        image = decode(data).gray if data else None
    except (redis.RedisError, ImageRejected) as error:
        logger.info("request %s: report without the image (%s)", request.request_id, type(error).__name__)
    try:
        return report_pdf(DiagnosisResult.model_validate(result), overlays, image, request.language)
    except Exception as error:  # a report is an extra: never let it cost the reply
        logger.warning("request %s: PDF report not made (%s)", request.request_id, type(error).__name__)
        return None


def report_caption(language: str) -> str:
    from diagnosis.messages import OVERLAY_NOT_A_DIAGNOSIS, gettext_for
    from diagnosis.pdf_report import TITLE

    _ = gettext_for(language)
    return f"{_(TITLE)}\n{_(OVERLAY_NOT_A_DIAGNOSIS)}"[:TELEGRAM_CAPTION_LIMIT]


def overlay_caption(label: str | None, result: dict[str, Any] | None, language: str) -> str:
    """The localized caption of one overlay: the finding in words, its estimate, what the colours mean."""
    from diagnosis.messages import overlay_caption as caption

    finding = next((f for f in (result or {}).get("findings", []) if f.get("label") == label), {})
    # Drawn although not flagged (nothing was): the overlay has no red and the caption says so.
    return caption(label, finding.get("probability"), language,
                   flagged=bool(finding.get("positive", True)))[:TELEGRAM_CAPTION_LIMIT]


def album_caption(captions: list[str]) -> str:
    """The album's one caption: each photo's title in order, the colours and "not a diagnosis" once."""
    from diagnosis.messages import album_caption as caption

    return caption(captions)[:TELEGRAM_CAPTION_LIMIT]


MARK_WAIT_S = 30.0  # how long an answered delivery waits for Redis to come back to say so
MARK_POLL_S = 0.25


def mark_answered(r: redis.Redis, done_key: str, ttl_s: int, wait_s: float = MARK_WAIT_S) -> bool:
    """Write the ``done`` mark of a request whose answer Telegram accepted; False if Redis stayed away.

    Waits for Redis (a restart) instead of giving up at once: without the mark the bot's watchdog
    (``bot.pending``) takes the answered request for lost once its grace ends, and a user who has
    the answer is also told to send the image again. The wait ends with the task's soft time limit."""
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                r.set(done_key, "1", ex=ttl_s)
                return True
            except redis.RedisError as error:
                if time.monotonic() >= deadline:
                    logger.error("done mark not written after %.0fs: %s", wait_s, type(error).__name__)
                    return False
            time.sleep(MARK_POLL_S)
    except SoftTimeLimitExceeded:
        logger.error("done mark not written before the task's time limit")
        return False


def _best_effort(call: Any, *args: Any, **kwargs: Any) -> None:
    """A Redis write that must not undo what Telegram already accepted (marks, clean-up)."""
    try:
        call(*args, **kwargs)
    except redis.RedisError as error:
        logger.warning("redis write skipped after delivery: %s", type(error).__name__)


def cleanup(r: redis.Redis, keys: Keys, request: RequestEnvelope, overlay_key: str | None) -> None:
    """The user has the answer (or cannot get one): delete the image and the overlay now."""
    names = [*keys.request_keys(request.request_id), request.blob_key, *([overlay_key] if overlay_key else [])]
    r.delete(*names)
    if request.channel == "telegram":
        leave_turns(r, keys, request.chat_id, request.request_id)  # later replies of the chat need not wait
