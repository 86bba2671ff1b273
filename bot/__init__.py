"""Telegram front end: receives images, stores them briefly in Redis and enqueues the analysis.

Never imports torch or the worker package: ``bot/dispatch.py`` sends Celery tasks by name.
"""
