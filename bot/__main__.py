"""``python -m bot``: start the Telegram bot (long polling)."""

from __future__ import annotations

import logging
from datetime import timedelta

from diagnosis.monitoring import serve_metrics
from diagnosis.settings import Settings

from .app import ALLOWED_UPDATES, build_application


def configure_logging(level: str) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level.upper())
    # httpx logs every request URL at INFO, and Bot API URLs contain the bot token; so does
    # python-telegram-bot's Bot at DEBUG ("Set Bot API URL: …/bot<token>").
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    quiet = max(logging.INFO, logging.getLogger().getEffectiveLevel())
    for name in ("telegram.Bot", "telegram.ext.ExtBot"):
        logging.getLogger(name).setLevel(quiet)


def main() -> None:
    settings = Settings()
    configure_logging(settings.LOG_LEVEL)
    application = build_application(settings)
    serve_metrics(settings.METRICS_PORT, settings.REDIS_URL)
    application.run_polling(
        allowed_updates=ALLOWED_UPDATES,
        timeout=timedelta(seconds=settings.POLL_TIMEOUT_S),
        drop_pending_updates=False,
    )


if __name__ == "__main__":
    main()
