"""Service tests: the bot, the workers, Redis and a fake Telegram Bot API (all offline)."""
