"""Celery workers: ``celery -A worker worker -Q inference,delivery`` (all-in-one).

``app`` is the Celery application (``celery_app``). The tasks, loaded by the worker via ``include``:
``diagnose`` (``worker.diagnose``, queue ``inference``) and ``deliver`` (``worker.deliver``, queue
``delivery``); per-process resources (settings, Redis, Telegram, the pipeline) in ``worker.resources``.
Importing this package loads neither torch nor the models.
"""

from .celery_app import app

__all__ = ["app"]
