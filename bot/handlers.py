"""Telegram update handlers (python-telegram-bot v22, asyncio).

Images (photos, image documents, album items, forwarded images) are acknowledged at once, stored
in Redis under a random key with a TTL and handed to the ``diagnose`` task by name; the bot never
waits for the result, the ``deliver`` task answers. Every user-facing string is ``_("English")``
in the ``bot`` gettext domain (``diagnosis/locales/<lang>/LC_MESSAGES/bot.po``).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import PurePosixPath

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Message, ReplyParameters, Update
from telegram.constants import ChatAction, ChatType
from telegram.error import TelegramError
from telegram.ext import ApplicationHandlerStop, ContextTypes

from diagnosis.i18n import LANGUAGES, N_
from diagnosis.monitoring import BOT_UPDATES, ERRORS
from diagnosis.settings import TELEGRAM_DOWNLOAD_LIMIT, Settings

from .dispatch import DiagnoseRequest, Dispatcher
from .pending import PendingRequest, PendingRequests
from .store import Store
from .texts import translator

logger = logging.getLogger(__name__)

IMAGE_MIME_TYPES = frozenset({
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp", "image/tiff", "image/tif",
    "image/bmp", "image/x-ms-bmp", "application/dicom",
})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".tif", ".tiff", ".bmp",
                              ".dcm", ".dicom", ".dic"})
GENERIC_MIME_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
LANGUAGE_CALLBACK = "lang:"

# Command menu (setMyCommands), translated per language at startup.
COMMANDS = (
    ("start", N_("What this bot does and does not do")),
    ("help", N_("How to send an image")),
    ("language", N_("Choose the language")),
    ("privacy", N_("What is stored and for how long")),
    ("forget", N_("Delete everything the service holds about you")),
)
ALWAYS_ALLOWED_COMMANDS = frozenset({"/privacy", "/forget"})  # information and erasure: for everybody


@dataclass
class Services:
    """Shared per application (``application.bot_data["services"]``)."""

    settings: Settings
    store: Store
    dispatcher: Dispatcher
    pending: PendingRequests | None = None  # accepted requests not yet seen answered (bot.pending)


def services(context: ContextTypes.DEFAULT_TYPE) -> Services:
    return context.application.bot_data["services"]


async def language_of(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    user = update.effective_user
    if user is None:
        return "en"
    return await services(context).store.language(user.id, user.language_code)


def is_image_document(file_name: str | None, mime_type: str | None) -> bool:
    """JPEG/PNG/WebP/TIFF/BMP/DICOM by MIME type or extension; extension-less (DICOM) files too.

    The worker detects the real format from the bytes, so a wrong guess here only costs a polite
    "unsupported" answer, never a crash.
    """
    mime = (mime_type or "").lower().split(";")[0].strip()
    suffix = PurePosixPath(file_name or "").suffix.lower()
    if mime in IMAGE_MIME_TYPES or suffix in IMAGE_EXTENSIONS:
        return True
    # DICOM files are often called "IM0001" or "1.2.840.113619.2.55.3.6046": no usable extension.
    return mime in GENERIC_MIME_TYPES and (suffix == "" or suffix[1:].isdigit())


# --------------------------------------------------------------------------- access
async def gate(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Group -1: refuse users outside the allowlist (when one is configured) before any handler."""
    settings = services(context).settings
    user, chat, message = update.effective_user, update.effective_chat, update.effective_message
    if settings.allowed(user.id if user else None, chat.id if chat else None):
        return
    if message is not None and message.text and message.text.split()[0].split("@")[0] in ALWAYS_ALLOWED_COMMANDS:
        return
    _, _n = translator(await language_of(update, context))
    text = _("Sorry, this bot is available to approved users only. Your Telegram user id is {user_id}; "
             "ask the operator to add it.").format(user_id=user.id if user else "?")
    if update.callback_query is not None:
        with suppress(TelegramError):
            await update.callback_query.answer(text, show_alert=True)
    elif message is not None and chat is not None and (chat.type == ChatType.PRIVATE or message.text is None
                                                        or message.text.startswith("/")):
        await message.reply_text(text)
    BOT_UPDATES.labels("not_allowed").inc()
    raise ApplicationHandlerStop


# --------------------------------------------------------------------------- commands
async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/start: what the bot does and does not do, the disclaimer, privacy in two lines."""
    _, _n = translator(await language_of(update, context))
    text = _(
        "Hello! I give a second opinion on X-ray images.\n\n"
        "Send me a radiograph as a photo or as a file (JPEG, PNG, WebP, TIFF or DICOM, up to 20 MB). "
        "I check that it is an X-ray and which body part it shows; for chest X-rays I estimate the "
        "probability of common findings and send a heat map of the regions that drove them.\n\n"
        "What I do not do: I do not make a diagnosis and I do not replace a physician or a radiologist. "
        "Other body parts are not analysed yet. Always discuss your images and any result with a physician.\n\n"
        "Privacy: your image is held in memory for at most one hour and deleted once you have the answer; "
        "nothing is written to disk. Details: /privacy. Language: /language. Help: /help."
    )
    await update.effective_message.reply_text(text)


async def help_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/help: how to send a good image, the limits, the commands."""
    settings = services(context).settings
    _, ngettext = translator(await language_of(update, context))
    minutes = max(1, math.ceil(settings.RATE_LIMIT_WINDOW_S / 60))
    limit_line = ngettext(
        "You can send up to {limit} images per {minutes} minute.",
        "You can send up to {limit} images per {minutes} minutes.",
        minutes,
    ).format(limit=settings.RATE_LIMIT_IMAGES, minutes=minutes)
    text = _(
        "How to use this bot:\n"
        "• Send an X-ray as a photo, or as a file for full quality: JPEG, PNG, WebP, TIFF or DICOM, up to 20 MB. "
        "Albums work too: every image gets its own answer.\n"
        "• Photographing a film or a screen? Hold the phone parallel to it, fill the frame, avoid glare.\n"
        "• You get the findings with their probabilities and, when there is one, a heat map.\n"
        "• {limit_line}\n\n"
        "Commands:\n"
        "/start – what this bot does and does not do\n"
        "/language – English, Russian or Kazakh\n"
        "/privacy – what is stored and for how long\n"
        "/forget – delete everything the service holds about you\n"
        "/help – this message"
    ).format(limit_line=limit_line)
    await update.effective_message.reply_text(text)


async def privacy(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/privacy: what is stored, for how long, and that Telegram chats are cloud chats."""
    _, _n = translator(await language_of(update, context))
    text = _(
        "Privacy\n\n"
        "What this service stores, and for how long:\n"
        "• Your image and its heat map: in memory (Redis), never on disk, for at most one hour; "
        "deleted as soon as you have the answer.\n"
        "• Your language choice: until you use /forget, or a year without use.\n"
        "• For the rate limit: the times at which you sent your recent images, until they leave the limit window.\n"
        "• Images and results are not written to logs and are not used for training.\n\n"
        "Telegram chats are cloud chats: Telegram keeps the images and answers of this chat on its servers "
        "until you delete them.\n\n"
        "/forget deletes everything this service holds about you. To remove the chat history kept by "
        "Telegram, delete the chat."
    )
    await update.effective_message.reply_text(text)


async def forget(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/forget: delete the user's language, rate-limit data and any image still being processed."""
    _, _n = translator(await language_of(update, context))
    user = update.effective_user
    if user is not None:
        svc = services(context)
        deleted = await svc.store.forget(user.id)
        if svc.pending is not None:
            svc.pending.forget_user(user.id)
        logger.info("forget: deleted %d keys", deleted)
    await update.effective_message.reply_text(_(
        "Done: everything this service held about you (language choice, rate-limit data, images still being "
        "processed) has been deleted. Telegram keeps this chat's history until you delete the chat."
    ))


async def language_menu(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/language: an inline keyboard with the supported languages."""
    _, _n = translator(await language_of(update, context))
    keyboard = InlineKeyboardMarkup(
        [[InlineKeyboardButton(name, callback_data=f"{LANGUAGE_CALLBACK}{code}") for code, name in LANGUAGES.items()]]
    )
    await update.effective_message.reply_text(_("Choose your language:"), reply_markup=keyboard)


async def language_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A language button: remember the choice in Redis and confirm in the new language."""
    query = update.callback_query
    code = (query.data or "")[len(LANGUAGE_CALLBACK):]
    if code not in LANGUAGES or update.effective_user is None:
        await query.answer()
        return
    await services(context).store.set_language(update.effective_user.id, code)
    _, _n = translator(code)
    text = _("Done: I will answer in English.")
    await query.answer(text)
    with suppress(TelegramError):  # the menu message may be too old to edit
        await query.edit_message_text(text)


# --------------------------------------------------------------------------- images
async def on_photo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A photo (also forwarded or in an album): analyse the largest size, ``photo[-1]``."""
    photo = update.effective_message.photo[-1]
    await accept_image(update, context, photo.file_id, photo.file_size)


async def on_document(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A file: images and DICOM (with or without extension) are analysed, anything else gets a hint."""
    document = update.effective_message.document
    if not is_image_document(document.file_name, document.mime_type):
        _, _n = translator(await language_of(update, context))
        await update.effective_message.reply_text(_(
            "I cannot analyse this type of file. Please send a JPEG, PNG, WebP, TIFF or DICOM file, "
            "or send the X-ray as a photo."
        ))
        return
    await accept_image(update, context, document.file_id, document.file_size)


async def accept_image(
    update: Update, context: ContextTypes.DEFAULT_TYPE, file_id: str, file_size: int | None
) -> None:
    """Size check, rate limit, acknowledgement, download, blob in Redis, enqueue ``diagnose``."""
    svc = services(context)
    message, user, chat = update.effective_message, update.effective_user, update.effective_chat
    language = await language_of(update, context)
    _, ngettext = translator(language)
    too_large = _(
        "This file is too large: Telegram lets bots download at most 20 MB. "
        "Please send the X-ray as a photo, or reduce the file size first."
    )
    if file_size and file_size > TELEGRAM_DOWNLOAD_LIMIT:
        BOT_UPDATES.labels("too_large").inc()
        await message.reply_text(too_large)
        return

    wait_s, slot = await svc.store.take_image_slot(user.id)
    if wait_s > 0:
        BOT_UPDATES.labels("rate_limited").inc()
        if await svc.store.first_rate_notice(user.id):
            minutes = max(1, math.ceil(wait_s / 60))
            await message.reply_text(ngettext(
                "You have sent many images in a short time. Please try again in {minutes} minute.",
                "You have sent many images in a short time. Please try again in {minutes} minutes.",
                minutes,
            ).format(minutes=minutes))
        return

    waiting = await svc.store.queue_length()
    text = _("Received, analysing…")
    if waiting > 0:
        text += "\n" + ngettext(
            "{count} image is ahead of yours in the queue.",
            "{count} images are ahead of yours in the queue.",
            waiting,
        ).format(count=waiting)
    ack: Message | None
    try:  # an acknowledgement that cannot be sent (flood control…) must not cost the user the analysis
        ack = await message.reply_text(
            text, reply_parameters=ReplyParameters(message_id=message.message_id, allow_sending_without_reply=True)
        )
    except TelegramError as error:
        logger.warning("acknowledgement failed: %s; analysing anyway", type(error).__name__)
        ack = None
    with suppress(TelegramError):
        await context.bot.send_chat_action(chat.id, ChatAction.TYPING)

    try:
        telegram_file = await context.bot.get_file(file_id)
        if telegram_file.file_size and telegram_file.file_size > TELEGRAM_DOWNLOAD_LIMIT:
            await svc.store.give_back_slot(user.id, slot)
            await _edit(ack, too_large, message)
            return
        data = bytes(await telegram_file.download_as_bytearray(read_timeout=120))
    except TelegramError as error:
        logger.warning("download failed: %s", type(error).__name__)
        BOT_UPDATES.labels("download_failed").inc()
        await svc.store.give_back_slot(user.id, slot)
        await _edit(ack, _("I could not download this file from Telegram. Please send it again."), message)
        return
    if len(data) > TELEGRAM_DOWNLOAD_LIMIT:
        await svc.store.give_back_slot(user.id, slot)
        await _edit(ack, too_large, message)
        return

    request_id, blob_key = await svc.store.put_blob(user.id, data)
    del data
    request = DiagnoseRequest(
        request_id=request_id,
        blob_key=blob_key,
        chat_id=chat.id,
        reply_to_message_id=message.message_id,
        language=language,
        ack_message_id=ack.message_id if ack is not None else None,
    )
    try:
        await svc.dispatcher.enqueue(request)
    except Exception:
        logger.exception("could not enqueue request %s", request_id)
        BOT_UPDATES.labels("enqueue_failed").inc()
        await svc.store.drop_blob(user.id, request_id)
        await svc.store.give_back_slot(user.id, slot)
        await _edit(ack, _("Sorry, the analysis service is unavailable right now. Please try again in a few minutes."),
                    message)
        return
    if svc.pending is not None:
        svc.pending.add(PendingRequest(request_id=request_id, user_id=user.id, chat_id=chat.id,
                                       reply_to_message_id=message.message_id, ack_message_id=request.ack_message_id,
                                       language=language, accepted_at=time.monotonic()))
    BOT_UPDATES.labels("enqueued").inc()
    logger.info("request %s enqueued (%d waiting before it)", request_id, waiting)


async def _edit(ack: Message | None, text: str, message: Message) -> None:
    """Turn the acknowledgement into ``text``; without one (or if that fails) reply to ``message``."""
    if ack is not None:
        try:
            await ack.edit_text(text)
            return
        except TelegramError:
            pass
    with suppress(TelegramError):
        await message.reply_text(text)


# --------------------------------------------------------------------------- everything else
async def on_other(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Text, stickers, video, voice, unknown commands…: a friendly hint on what to send."""
    BOT_UPDATES.labels("other").inc()
    _, _n = translator(await language_of(update, context))
    await update.effective_message.reply_text(_(
        "I analyse X-ray images only. Please send a radiograph as a photo, or as a file "
        "(JPEG, PNG, WebP, TIFF or DICOM, up to 20 MB). More: /help"
    ))


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Log (no message content) and tell the user something went wrong: never silence."""
    update_id = getattr(update, "update_id", None)
    logger.error("update %s failed: %r", update_id, context.error, exc_info=context.error)
    ERRORS.labels("bot").inc()
    if isinstance(update, Update) and update.effective_message is not None:
        try:
            language = await language_of(update, context)
        except Exception:
            language = "en"
        _, _n = translator(language)
        with suppress(Exception):
            await update.effective_message.reply_text(_("Sorry, something went wrong on our side. Please try again."))
