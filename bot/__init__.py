"""Telegram front end: receives images, stores them briefly in Redis and enqueues the analysis.

Never imports torch, numpy or the worker package: ``bot/dispatch.py`` sends Celery tasks by name.
``app`` wires the handlers: ``access`` (allowlist), ``commands`` (/start, /help, /privacy, /forget,
/language, other messages, errors) and ``images`` (intake); their texts are in ``contract.texts``.
"""
