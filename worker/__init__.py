"""Celery workers: ``celery -A worker worker -Q inference,delivery`` (all-in-one).

``app`` is the Celery application; the tasks live in ``worker.tasks`` (loaded by the worker via
``include``). Importing this package loads neither torch nor the models.
"""

from .celery_app import app

__all__ = ["app"]
