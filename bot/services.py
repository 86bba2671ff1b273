"""What every handler shares: the settings, Redis, the Celery producer, the pending list; the user's language."""

from __future__ import annotations

from dataclasses import dataclass, field

from telegram import Update
from telegram.ext import ContextTypes

from contract.i18n import DEFAULT_LANGUAGE
from contract.settings import Settings

from .acks import BurstAcks
from .dispatch import Dispatcher
from .intake import Intake
from .pending import PendingRequests
from .store import Store


@dataclass
class Services:
    """Shared per application (``application.bot_data["services"]``)."""

    settings: Settings
    store: Store
    dispatcher: Dispatcher
    pending: PendingRequests | None = None  # accepted requests not yet seen answered (bot.pending)
    intake: Intake | None = None  # durable intake: per-update notes let an interrupted handler resume
    acks: BurstAcks | None = None  # one acknowledgement per burst of images (bot.acks)
    analysable_parts: list[str] = field(default_factory=list)  # body parts with an abnormality model (/start)


def services(context: ContextTypes.DEFAULT_TYPE) -> Services:
    return context.application.bot_data["services"]


async def language_of(update: Update, context: ContextTypes.DEFAULT_TYPE) -> str:
    """The remembered /language choice, else the user's Telegram language (unknown → English)."""
    user = update.effective_user
    if user is None:
        return DEFAULT_LANGUAGE
    return await services(context).store.language(user.id, user.language_code)
