"""Image intake: photos, image documents, album items and forwarded images.

Each image is acknowledged (one message per burst of images, ``bot.acks``), downloaded, stored in
Redis under a random key with a TTL and handed to the ``diagnose`` task by name with its request
envelope; the bot never waits for the result, the ``deliver`` task answers, in the order the chat's
images were sent (``contract.bursts``).
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from pathlib import PurePosixPath

from telegram import Message, Update
from telegram.constants import ChatAction
from telegram.error import TelegramError
from telegram.ext import ContextTypes

from contract import texts
from contract.bursts import UNKNOWN
from contract.envelope import RequestEnvelope
from contract.formats import EXTENSIONS, MIME_TYPES
from contract.keys import TELEGRAM_DOWNLOAD_LIMIT
from contract.monitoring import BOT_UPDATES

from .pending import PendingRequest
from .services import language_of, services

logger = logging.getLogger(__name__)

GENERIC_MIME_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})


def is_image_document(file_name: str | None, mime_type: str | None) -> bool:
    """A format of ``contract.formats`` by MIME type or extension; extension-less (DICOM) files too.

    The worker detects the real format from the bytes, so a wrong guess here only costs a polite
    "unsupported" answer, never a crash.
    """
    mime = (mime_type or "").lower().split(";")[0].strip()
    suffix = PurePosixPath(file_name or "").suffix.lower()
    if mime in MIME_TYPES or suffix in EXTENSIONS:
        return True
    # DICOM files are often called "IM0001" or "1.2.840.113619.2.55.3.6046": no usable extension.
    return mime in GENERIC_MIME_TYPES and (suffix == "" or suffix[1:].isdigit())


async def on_photo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A photo (also forwarded or in an album): analyse the largest size, ``photo[-1]``."""
    photo = update.effective_message.photo[-1]
    await accept_image(update, context, photo.file_id, photo.file_size)


async def on_document(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A file: images and DICOM (with or without extension) are analysed, anything else gets a hint."""
    document = update.effective_message.document
    if not is_image_document(document.file_name, document.mime_type):
        await update.effective_message.reply_text(texts.not_an_image_file(await language_of(update, context)))
        return
    await accept_image(update, context, document.file_id, document.file_size)


async def _rate_notice(svc, context: ContextTypes.DEFAULT_TYPE, message: Message, user_id: int, language: str,
                       wait_s: float) -> None:
    """One notice per burst saying how many images were accepted and how many were not; later
    refusals of the same burst edit it."""
    refused, accepted, notice = await svc.store.note_refused(user_id)
    if refused == 1:
        sent = await message.reply_text(texts.rate_limited(language, wait_s, accepted, refused))
        latest = await svc.store.set_rate_notice(user_id, sent.message_id)
        if latest == refused:
            return
        notice, refused = sent.message_id, latest  # more were refused while it was being sent
    if notice is None:
        return  # the first refusal's notice is still being sent; it reads the count once sent
    with suppress(TelegramError):
        await context.bot.edit_message_text(texts.rate_limited(language, wait_s, accepted, refused),
                                            chat_id=message.chat_id, message_id=notice)


async def accept_image(
    update: Update, context: ContextTypes.DEFAULT_TYPE, file_id: str, file_size: int | None
) -> None:
    """Size check, rate limit, acknowledgement, download, blob in Redis, enqueue ``diagnose``.

    An update can be handled twice: the bot stores every update before Telegram forgets it and
    handles it again if it died midway (``bot.intake``). Notes kept per update (the request id, the
    rate-limit slot, the acknowledgement, "enqueued") let the second run resume: same request id
    (so the workers answer it once), no second acknowledgement, nothing enqueued twice.
    """
    svc = services(context)
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    notes = await svc.intake.progress(update.update_id) if svc.intake is not None else {}
    if notes.get("enqueued"):
        return  # a previous run finished; it died before the update was marked done

    async def note(**fields: str | int) -> None:
        if svc.intake is not None:
            await svc.intake.note(update.update_id, **fields)

    language = await language_of(update, context)
    if file_size and file_size > TELEGRAM_DOWNLOAD_LIMIT:
        BOT_UPDATES.labels("too_large").inc()
        await message.reply_text(texts.too_large(language))
        return

    if "slot" in notes:
        request_id, slot = notes["request_id"], notes["slot"]
    else:
        wait_s, slot = await svc.store.take_image_slot(user.id)
        if wait_s > 0:
            BOT_UPDATES.labels("rate_limited").inc()
            await _rate_notice(svc, context, message, user.id, language, wait_s)
            return
        request_id = svc.store.new_request_id()
        await note(request_id=request_id, slot=slot)

    waiting = await svc.store.queue_length()
    burst: str | None = None
    if svc.acks is not None:
        # One acknowledgement per burst (bot.acks): this image joins the chat's open one or opens it;
        # the message is sent and edited in the background at the chat's pace, never dropped.
        await svc.store.take_turn(chat.id, request_id, message.message_id)  # replies in the order sent
        burst, _count, opened = await svc.acks.join(chat.id, request_id)
        svc.acks.acknowledge(context.bot, chat.id, burst, opened, message.message_id, language, waiting)
        if opened:
            with suppress(TelegramError):
                await context.bot.send_chat_action(chat.id, ChatAction.TYPING)

    async def refuse(text: str) -> None:
        await svc.store.give_back_slot(user.id, slot)
        await _answer_instead(svc, context, chat.id, request_id, text, message)

    try:
        telegram_file = await context.bot.get_file(file_id)
        if telegram_file.file_size and telegram_file.file_size > TELEGRAM_DOWNLOAD_LIMIT:
            await refuse(texts.too_large(language))
            return
        data = bytes(await telegram_file.download_as_bytearray(read_timeout=120))
    except TelegramError as error:
        logger.warning("download failed: %s", type(error).__name__)
        BOT_UPDATES.labels("download_failed").inc()
        await refuse(texts.download_failed(language))
        return
    if len(data) > TELEGRAM_DOWNLOAD_LIMIT:
        await refuse(texts.too_large(language))
        return

    request_id, blob_key = await svc.store.put_blob(user.id, data, request_id)
    del data
    request = RequestEnvelope(
        request_id=request_id,
        blob_key=blob_key,
        chat_id=chat.id,
        reply_to_message_id=message.message_id,
        language=language,
        # The burst's acknowledgement when already sent (it is deleted once all its images are answered).
        ack_message_id=await svc.acks.message_id(burst) if svc.acks is not None and burst else None,
        mode=await svc.store.mode(chat.id),
    )
    try:
        await svc.dispatcher.enqueue(request)
    except Exception:
        logger.exception("could not enqueue request %s", request_id)
        BOT_UPDATES.labels("enqueue_failed").inc()
        await svc.store.drop_blob(user.id, request_id)
        await refuse(texts.service_unavailable(language))
        return
    await note(enqueued=1)
    if svc.pending is not None:
        svc.pending.add(PendingRequest(envelope=request, user_id=user.id, accepted_at=time.monotonic(), burst=burst))
    BOT_UPDATES.labels("enqueued").inc()
    logger.info("request %s enqueued (%d waiting before it)", request_id, waiting)


async def _answer_instead(svc, context: ContextTypes.DEFAULT_TYPE, chat_id: int, request_id: str, text: str,
                          message: Message) -> None:
    """The image will not be analysed: say why. The acknowledgement becomes ``text`` when it covered
    only this image (or this was the last unanswered one of its burst); otherwise reply to the image."""
    await svc.store.leave_turn(chat_id, request_id)
    left = await svc.acks.leave(request_id) if svc.acks is not None else UNKNOWN
    if left > 0:
        try:
            await context.bot.edit_message_text(text, chat_id=chat_id, message_id=left)
            return
        except TelegramError:
            pass
    with suppress(TelegramError):
        await message.reply_text(text)
