"""Celery configuration: JSON only, late acks, prefetch 1, time limits, visibility timeout.

``settings`` is the process's one settings object (``contract.settings.load_settings``: no bot token
needed, so Flower and ``celery inspect`` start without it). Importing this module loads neither
torch nor the models; the worker imports the tasks (``worker.diagnose``, ``worker.deliver``).
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from contract.keys import CALLBACK_TASK, DELIVER_TASK, DELIVERY_QUEUE, DIAGNOSE_TASK, INFERENCE_QUEUE
from contract.monitoring import stamp_enqueue_time
from contract.settings import load_settings

settings = load_settings()
stamp_enqueue_time()  # xray_queue_oldest_age_seconds

app = Celery("xray_second_opinion", broker=settings.broker_url,
             include=["worker.diagnose", "worker.deliver", "worker.callback"])
app.conf.update(
    # Serialisation: JSON only; pickle is refused (a message with another content type is rejected).
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    event_serializer="json",
    task_ignore_result=True,  # nobody waits for results: deliver answers the user
    # Routing by queue: inference (GPU/CPU workers) and delivery (network-bound, light).
    task_queues=tuple(Queue(name, Exchange(name, type="direct"), routing_key=name)
                      for name in (INFERENCE_QUEUE, DELIVERY_QUEUE)),
    task_default_queue=INFERENCE_QUEUE,
    task_default_exchange=INFERENCE_QUEUE,
    task_default_routing_key=INFERENCE_QUEUE,
    task_routes={DIAGNOSE_TASK: {"queue": INFERENCE_QUEUE}, DELIVER_TASK: {"queue": DELIVERY_QUEUE},
                 CALLBACK_TASK: {"queue": DELIVERY_QUEUE}},
    # A killed worker's task comes back (tasks are idempotent), one task reserved at a time.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # One task process by default: one copy of the models using all TORCH_THREADS. Raise it with
    # -c for delivery-only workers (network-bound, no models).
    worker_concurrency=1,
    worker_cancel_long_running_tasks_on_connection_loss=True,
    # Limits (enforced by the prefork pool; solo ignores them). Unacked messages come back after the
    # visibility timeout: just above the longest a message may legitimately stay unacknowledged
    # (a hard limit plus a short countdown; long countdowns are parked by worker.scheduler), not
    # Redis' default of one hour.
    task_soft_time_limit=settings.DIAGNOSE_SOFT_TIME_LIMIT_S,
    task_time_limit=settings.DIAGNOSE_TIME_LIMIT_S,
    # kombu scans for expired unacknowledged messages every interval × throttle seconds (default
    # 10 × 10): scan every 5 s so a dead worker's task returns soon after the visibility timeout.
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": 5,
        "unacked_restore_throttle": 1,
    },
    # A prefork child loads the models before it takes a task (worker_process_init, see
    # worker.resources), so that loading never counts against a task's time limit; give it time.
    worker_proc_alive_timeout=600,
    broker_connection_retry_on_startup=True,
    # Monitoring (Flower): task events.
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=True,
    worker_redirect_stdouts=False,
)
