"""``python -m bot``: start the Telegram bot (long polling, or a webhook with ``BOT_MODE=webhook``)."""

from __future__ import annotations

import logging
from datetime import timedelta

from contract.monitoring import serve_service_metrics
from contract.settings import Settings
from contract.telegram import quiet_http_logging

from .app import ALLOWED_UPDATES, build_application


def configure_logging(level: str) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level.upper())
    quiet_http_logging()  # Bot API URLs contain the bot token


def main() -> None:
    settings = Settings()
    configure_logging(settings.LOG_LEVEL)
    webhook = settings.webhook_options() if settings.BOT_MODE == "webhook" else None  # checked before starting
    application = build_application(settings)
    serve_service_metrics(settings)
    if webhook is not None:
        # Plain HTTP on WEBHOOK_LISTEN:WEBHOOK_PORT behind the operator's TLS proxy; registers
        # WEBHOOK_URL with Telegram, which then sends the secret token with every update.
        application.run_webhook(allowed_updates=ALLOWED_UPDATES, drop_pending_updates=False, **webhook)
    else:
        application.run_polling(
            allowed_updates=ALLOWED_UPDATES,
            timeout=timedelta(seconds=settings.POLL_TIMEOUT_S),
            drop_pending_updates=False,
        )


if __name__ == "__main__":
    main()
