"""The commands (/start, /help, /privacy, /forget, /language, /mode), other messages and errors.

Texts live in ``contract.texts`` (gettext domain ``bot``); here only what each command does.
"""

from __future__ import annotations

import logging
from contextlib import suppress

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.error import TelegramError
from telegram.ext import ContextTypes

from contract import texts
from contract.envelope import MODES
from contract.i18n import DEFAULT_LANGUAGE, LANGUAGES
from contract.monitoring import BOT_UPDATES, ERRORS
from diagnosis.messages import analysable_sentence

from .services import language_of, services

logger = logging.getLogger(__name__)

LANGUAGE_CALLBACK = "lang:"


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/start: what the bot does and does not do, the disclaimer, privacy in two lines."""
    language = await language_of(update, context)
    await update.effective_message.reply_text(
        texts.start(language, analysable_sentence(services(context).analysable_parts, language)))


async def help_command(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/help: how to send a good image, the limits, the commands."""
    settings = services(context).settings
    language = await language_of(update, context)
    await update.effective_message.reply_text(
        texts.help_text(language, settings.RATE_LIMIT_IMAGES, settings.RATE_LIMIT_WINDOW_S))


async def privacy(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/privacy: what is stored, for how long, and that Telegram chats are cloud chats."""
    await update.effective_message.reply_text(texts.privacy(await language_of(update, context)))


async def forget(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/forget: delete the user's language, rate-limit data and any image still being processed."""
    language = await language_of(update, context)
    user = update.effective_user
    if user is not None:
        svc = services(context)
        deleted = await svc.store.forget(user.id)
        if svc.pending is not None:
            svc.pending.forget_user(user.id)
        logger.info("forget: deleted %d keys", deleted)
    await update.effective_message.reply_text(texts.forgotten(language))


LANGUAGE_MENU_COLUMNS = 3


async def language_menu(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/language: an inline keyboard with every shipped language, each in its own name, three a row."""
    buttons = [InlineKeyboardButton(name, callback_data=f"{LANGUAGE_CALLBACK}{code}")
               for code, name in LANGUAGES.items()]
    keyboard = InlineKeyboardMarkup(
        [buttons[row:row + LANGUAGE_MENU_COLUMNS] for row in range(0, len(buttons), LANGUAGE_MENU_COLUMNS)]
    )
    await update.effective_message.reply_text(texts.choose_language(await language_of(update, context)),
                                              reply_markup=keyboard)


async def language_chosen(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """A language button: remember the choice in Redis and confirm in the new language."""
    query = update.callback_query
    code = (query.data or "")[len(LANGUAGE_CALLBACK):]
    if code not in LANGUAGES or update.effective_user is None:
        await query.answer()
        return
    await services(context).store.set_language(update.effective_user.id, code)
    text = texts.language_set(code)
    await query.answer(text)
    with suppress(TelegramError):  # the menu message may be too old to edit
        await query.edit_message_text(text)


async def mode(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """/mode [screening|clinician]: set the chat's reply mode (no argument: switch to the other one),
    remembered in Redis with a TTL; the reply says what each mode means."""
    language = await language_of(update, context)
    chat = update.effective_chat
    store = services(context).store
    wanted = (context.args or [""])[0].lower() if context.args else ""
    if wanted and wanted not in MODES:
        await update.effective_message.reply_text(texts.mode_unknown(language))
        return
    if not wanted:
        current = await store.mode(chat.id)
        wanted = MODES[1] if current == MODES[0] else MODES[0]
    await store.set_mode(chat.id, wanted)
    days = max(1, services(context).settings.MODE_TTL_S // 86400)
    await update.effective_message.reply_text(texts.mode_set(language, wanted, days))


async def on_other(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Text, stickers, video, voice, unknown commands…: a friendly hint on what to send."""
    BOT_UPDATES.labels("other").inc()
    await update.effective_message.reply_text(texts.other_message(await language_of(update, context)))


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Log (no message content) and tell the user something went wrong: never silence."""
    update_id = getattr(update, "update_id", None)
    logger.error("update %s failed: %r", update_id, context.error, exc_info=context.error)
    ERRORS.labels("bot").inc()
    if isinstance(update, Update) and update.effective_message is not None:
        try:
            language = await language_of(update, context)
        except Exception:
            language = DEFAULT_LANGUAGE
        with suppress(Exception):
            await update.effective_message.reply_text(texts.internal_error(language))
