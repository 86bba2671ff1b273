"""``build_application(settings)``: the bot as a python-telegram-bot ``Application`` (a factory tests call).

Imports neither torch nor the worker package (a test checks it).
"""

from __future__ import annotations

import asyncio
import logging
import time

from telegram import BotCommand, Update
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    MessageHandler,
    TypeHandler,
    filters,
)

from contract.i18n import DEFAULT_LANGUAGE, LANGUAGES
from contract.pacing import AsyncPacer, Limits
from contract.settings import Settings
from contract.telegram import RetryingRequest
from contract.texts import COMMANDS, translator
from diagnosis.cards import analysable_parts
from diagnosis.config import DEFAULT_MODELS_DIR

from . import access, commands, images
from .acks import BurstAcks
from .dispatch import Dispatcher
from .intake import READER_TASK, DurableApplication, DurableUpdateQueue, Intake, run_reader, stop_task
from .pending import PendingRequests
from .services import Services
from .store import Store

logger = logging.getLogger(__name__)

ALLOWED_UPDATES = [Update.MESSAGE, Update.CALLBACK_QUERY]
HEARTBEAT_INTERVAL_S = 15
# An answer of the bot's own (a command, a hint) waits this long for a send slot of its chat before
# it is given up (one user flooding the bot is then answered at Telegram's pace, ~1 message/s).
BOT_PACE_MAX_WAIT_S = 10.0


def build_application(settings: Settings) -> Application:
    """Wire handlers, Redis and the Celery producer; ``run_polling``/``run_webhook`` (or a test) drives it.

    Updates go through the durable intake (``bot.intake``): stored in Redis before Telegram is told
    they arrived, acknowledged once handled. The bot's own messages wait for a send slot shared with
    the delivery workers (``contract.pacing``).
    """
    store = Store(settings)
    intake = Intake(store.redis, settings.keys, consumer=settings.INTAKE_CONSUMER,
                    claim_idle_s=settings.INTAKE_CLAIM_IDLE_S, seen_ttl_s=settings.MARK_TTL_S)
    # The bot's own messages (acknowledgements, notices) take a chat's next send slot before the workers' replies.
    pacer = AsyncPacer(store.redis, settings.keys, Limits.from_settings(settings), priority=True)
    application = (
        Application.builder()
        .application_class(DurableApplication)
        .update_queue(DurableUpdateQueue(intake))
        .token(settings.TELEGRAM_BOT_TOKEN.get_secret_value())
        .base_url(settings.api_base_url)
        .base_file_url(settings.file_base_url)
        .concurrent_updates(8)
        # 429 with a short retry_after and 5xx are retried (an acknowledgement is not lost to them).
        .request(RetryingRequest(connection_pool_size=64, connect_timeout=10, read_timeout=30, write_timeout=30,
                                 media_write_timeout=60, pacer=pacer, max_pace_wait_s=BOT_PACE_MAX_WAIT_S))
        .post_init(on_startup)
        .post_stop(on_stop)
        .post_shutdown(on_shutdown)
        .build()
    )
    dispatcher = Dispatcher(settings)
    # The watchdog enqueues a request again when the broker lost its task (bot.pending).
    acks = BurstAcks(store.redis, settings.keys, settings.ACK_MERGE_S, settings.BLOB_TTL_S)
    pending = PendingRequests(settings, store, requeue=dispatcher.enqueue, acks=acks)
    parts = analysable_parts(settings.MODELS_DIR or DEFAULT_MODELS_DIR, settings.ABNORMALITY_MODELS)
    application.bot_data["services"] = Services(settings, store, dispatcher, pending, intake, acks, parts)

    application.add_handler(TypeHandler(Update, access.gate), group=-1)
    new_messages = filters.UpdateType.MESSAGE
    application.add_handler(CommandHandler("start", commands.start, filters=new_messages))
    application.add_handler(CommandHandler("help", commands.help_command, filters=new_messages))
    application.add_handler(CommandHandler("privacy", commands.privacy, filters=new_messages))
    application.add_handler(CommandHandler("forget", commands.forget, filters=new_messages))
    application.add_handler(CommandHandler("language", commands.language_menu, filters=new_messages))
    application.add_handler(CommandHandler("mode", commands.mode, filters=new_messages))
    application.add_handler(CallbackQueryHandler(commands.language_chosen, pattern=f"^{commands.LANGUAGE_CALLBACK}"))
    application.add_handler(MessageHandler(new_messages & filters.PHOTO, images.on_photo))
    application.add_handler(MessageHandler(new_messages & filters.Document.ALL, images.on_document))
    # Anything else in a private chat (text, stickers, video, voice, unknown commands): a hint.
    # In groups the bot stays quiet unless it is addressed with a command or an image.
    application.add_handler(MessageHandler(
        new_messages & ~filters.StatusUpdate.ALL & (filters.ChatType.PRIVATE | filters.COMMAND), commands.on_other
    ))
    application.add_error_handler(commands.on_error)
    return application


def _services(application: Application) -> Services:
    return application.bot_data["services"]


async def on_startup(application: Application) -> None:
    """Command menu per language; the intake reader; heartbeat for the container health check."""
    for language in LANGUAGES:
        _, _n = translator(language)
        menu = [BotCommand(name, _(description)) for name, description in COMMANDS]
        try:
            await application.bot.set_my_commands(
                menu, language_code=None if language == DEFAULT_LANGUAGE else language
            )
        except TelegramError as error:
            logger.warning("setMyCommands(%s) failed: %s", language, error)
    # Stored updates → the application: what a previous run left unfinished first, then new ones.
    application.bot_data[READER_TASK] = asyncio.create_task(run_reader(application))
    services = _services(application)
    if services.settings.HEARTBEAT_FILE is not None:
        application.bot_data["heartbeat"] = asyncio.create_task(_heartbeat(application))
    if services.pending is not None:  # tells users whose accepted request was lost (e.g. Redis restarted)
        application.bot_data["pending-watchdog"] = asyncio.create_task(services.pending.run(application.bot))


async def _heartbeat(application: Application) -> None:
    """Touch HEARTBEAT_FILE while updates arrive (polling or webhook), the intake reader runs and Redis
    answers (read by ``python -m bot.healthcheck``)."""
    services = _services(application)
    path = services.settings.HEARTBEAT_FILE
    while True:
        try:
            reader = application.bot_data.get(READER_TASK)
            healthy = (await services.store.ping() and application.updater is not None
                       and application.updater.running and reader is not None and not reader.done())
            if healthy:
                path.write_text(str(time.time()))
        except Exception as error:
            logger.warning("heartbeat: %s", type(error).__name__)
        await asyncio.sleep(HEARTBEAT_INTERVAL_S)


async def on_stop(application: Application) -> None:
    for name in ("heartbeat", "pending-watchdog"):  # the intake reader was stopped first (DurableApplication.stop)
        task = application.bot_data.pop(name, None)
        if task is not None:  # both read Redis too: a lost cancellation must not hang the stop
            await stop_task(task, name=f"the {name} task")
    acks = _services(application).acks
    if acks is not None:
        await acks.close()


async def on_shutdown(application: Application) -> None:
    services = _services(application)
    await services.store.close()
    services.dispatcher.close()
