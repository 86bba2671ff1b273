import socket
import urllib.request

from contract.monitoring import REQUESTS, STAGE_SECONDS, observe_result, serve_metrics
from diagnosis.report import DiagnosisResult


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_results_are_counted_and_served_with_queue_depth():
    before = REQUESTS.labels("not_xray")._value.get()
    observe_result(DiagnosisResult(outcome="not_xray", timings_ms={"decode": 3.0, "gate": 12.0, "total": 16.0}))
    assert REQUESTS.labels("not_xray")._value.get() == before + 1
    assert STAGE_SECONDS.labels("gate")._sum.get() >= 0.012
    port = free_port()
    assert serve_metrics(port, "redis://127.0.0.1:6379/15")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'xray_requests_total{outcome="not_xray"}' in body
    assert 'xray_stage_seconds_bucket{le="0.025",stage="gate"}' in body
    assert 'xray_queue_depth{queue="inference"}' in body


def test_no_port_no_server():
    assert serve_metrics(None) is False


def test_queue_age_comes_from_the_stamp_every_publisher_sets():
    """A real Celery publish (the bot's and the API's producer) onto real Redis: the collector reads the
    oldest message's publication time; an empty queue is 0 s old."""
    import json
    import secrets
    import time

    import pytest
    import redis

    from bot.dispatch import make_client
    from contract.monitoring import ENQUEUED_AT_HEADER, QueueDepthCollector, message_age
    from contract.settings import ServiceSettings

    url = "redis://127.0.0.1:6379/15"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    queue = f"test-age-{secrets.token_hex(4)}"
    producer = make_client(ServiceSettings(REDIS_URL=url))
    try:
        collector = QueueDepthCollector(url, queues=(queue,))
        empty = {m.name: m.samples for m in collector.collect()}
        assert [s.value for s in empty["xray_queue_oldest_age_seconds"]] == [0.0]
        before = time.time()
        producer.send_task("diagnose", kwargs={"envelope": {}}, queue=queue)
        time.sleep(0.2)
        producer.send_task("diagnose", kwargs={"envelope": {}}, queue=queue)
        metrics = {m.name: m.samples for m in collector.collect()}
        assert [s.value for s in metrics["xray_queue_depth"]] == [2.0]
        [age] = metrics["xray_queue_oldest_age_seconds"]
        assert age.labels == {"queue": queue} and 0.2 <= age.value < 5  # the first message, not the second
        oldest = client.lindex(queue, -1)
        assert before <= float(json.loads(oldest)["headers"][ENQUEUED_AT_HEADER]) <= time.time()
        assert 119 < message_age(oldest, before + 120) <= 120
        assert message_age(b'{"headers": {}}', time.time()) is None and message_age(b"junk", 0) is None
    finally:
        producer.close()
        client.delete(queue)


def test_bot_and_worker_read_queue_depth_from_the_broker(caplog):
    """With CELERY_BROKER_URL apart from REDIS_URL, the queues are on the broker: the depth is read
    there (a REDIS_URL nobody listens on is never asked)."""
    import logging

    import pytest
    import redis

    from contract.monitoring import queue_collector
    from contract.settings import ServiceSettings

    broker = "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(broker).ping()
    except redis.ConnectionError:
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    settings = ServiceSettings(REDIS_URL="redis://127.0.0.1:9/0", CELERY_BROKER_URL=broker)
    with caplog.at_level(logging.WARNING, logger="contract.monitoring"):
        samples = [s for m in queue_collector(settings).collect() if m.name == "xray_queue_depth" for s in m.samples]
    assert any(s.labels == {"queue": "inference"} for s in samples)
    assert "queue depth unavailable" not in caplog.text
