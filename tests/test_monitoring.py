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
