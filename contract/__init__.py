"""The service contract shared by ``bot/`` and ``worker/`` (and read by ``diagnosis`` for its texts).

``settings`` (pydantic-settings, environment variables), ``keys`` (Celery queue and task names, the
Redis key layout, Telegram limits), ``envelope`` (the request passed bot → diagnose → deliver),
``monitoring`` (Prometheus metrics), ``i18n`` + ``texts`` (languages, gettext catalogs, the bot's
conversation texts), ``telegram`` (one Telegram retry policy), ``redis_client`` (one Redis client
factory). No torch and no numpy anywhere here: the bot imports it.
"""
