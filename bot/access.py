"""Access control: with an allowlist configured, only listed users or chats get past this handler."""

from __future__ import annotations

from contextlib import suppress

from telegram import Update
from telegram.constants import ChatType
from telegram.error import TelegramError
from telegram.ext import ApplicationHandlerStop, ContextTypes

from contract import texts
from contract.monitoring import BOT_UPDATES

from .services import language_of, services

ALWAYS_ALLOWED_COMMANDS = frozenset({"/privacy", "/forget"})  # information and erasure: for everybody


async def gate(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Group -1: refuse users outside the allowlist (when one is configured) before any handler."""
    settings = services(context).settings
    user, chat, message = update.effective_user, update.effective_chat, update.effective_message
    if settings.allowed(user.id if user else None, chat.id if chat else None):
        return
    if message is not None and message.text and message.text.split()[0].split("@")[0] in ALWAYS_ALLOWED_COMMANDS:
        return
    text = texts.not_allowed(await language_of(update, context), user.id if user else "?")
    if update.callback_query is not None:
        with suppress(TelegramError):
            await update.callback_query.answer(text, show_alert=True)
    elif message is not None and chat is not None and (chat.type == ChatType.PRIVATE or message.text is None
                                                        or message.text.startswith("/")):
        await message.reply_text(text)
    BOT_UPDATES.labels("not_allowed").inc()
    raise ApplicationHandlerStop
