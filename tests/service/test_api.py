"""The HTTP API end to end: real ``python -m api`` (uvicorn) → real Redis → real Celery worker → answer.

One worker (random-weight models forcing the chest route, ``tests/model_factory.py``) and one API
server serve the module; requests go over loopback HTTP with the key the real ``keys create``
command printed. Callbacks go to a loopback receiver. Every refusal must be a problem-details body.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from dicom_factory import make_dicom
from model_factory import make_models_dir

from contract import texts as bot_texts
from contract.analyses import verify_signature
from contract.settings import ServiceSettings
from diagnosis.messages import PHYSICIAN, gettext_for

from .api_harness import ApiProcess, CallbackReceiver, create_key, pack_chest_film, revoke_key, wait_done
from .conftest import worker_env
from .harness import PACK, ROOT, WorkerProcess

pytestmark = pytest.mark.slow

CLI_KEYS = {"file", "is_xray", "xray_probability", "body_part", "body_part_probability", "findings", "mode",
            "verdict", "abnormal_probability", "message", "overlay", "overlays", "heatmap_labels", "timings_ms"}
FINDING_KEYS = {"label", "probability", "positive", "threshold", "sensitivity", "specificity", "ppv", "auc",
                "eligible"}
CHEST = pack_chest_film(PACK).read_bytes() if (PACK / "manifest.csv").is_file() else b""
CALLBACK_SECRET = "test-master-secret"
RATE_LIMIT = 40


@pytest.fixture(scope="module")
def stack(fake_telegram, redis_db, tmp_path_factory, pack):
    """(api, env, keys): the worker and the API, and keys for clinic-a / clinic-b / clinic-q / clinic-r."""
    folder = tmp_path_factory.mktemp("api")
    models = make_models_dir(folder / "models")
    env = {**os.environ, **worker_env(fake_telegram.url, redis_db[0], models),
           "API_KEYS_FILE": str(folder / "keys.json"), "API_CALLBACK_SECRET": CALLBACK_SECRET,
           "API_CALLBACK_ALLOW_HTTP": "true", "API_CALLBACK_ALLOW_PRIVATE": "true",
           "API_RATE_LIMIT": str(RATE_LIMIT), "API_WATCHDOG_S": "1",
           "API_DAILY_QUOTA": "500"}
    keys = {name: create_key(env, name) for name in ("clinic-a", "clinic-b", "clinic-q", "clinic-r", "gone")}
    # An API-only deployment: its worker runs without TELEGRAM_BOT_TOKEN.
    api_only = {name: value for name, value in env.items() if name != "TELEGRAM_BOT_TOKEN"}
    worker = WorkerProcess(api_only, folder / "worker.log").start()
    api = ApiProcess(env, folder / "api.log").start()
    yield api, env, keys, worker
    api.stop()
    worker.stop()


@pytest.fixture
def http():
    with httpx.Client(timeout=30) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(http, api, key, data=CHEST, filename="chest.jpg", headers=None, **fields):
    return http.post(api.url + "/v1/analyses", headers={**bearer(key), **(headers or {})},
                     files={"image": (filename, data, "application/octet-stream")}, data=fields)


def assert_problem(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["type"].endswith(":" + kind) and body["title"] and body["detail"]
    assert "Traceback" not in response.text
    return body


def test_chest_image_analysed_once_with_overlays_callback_and_delete(stack, http, redis_client):
    api, _, keys, _ = stack
    key, secret = keys["clinic-a"]
    with CallbackReceiver() as hook:
        response = post(http, api, key, mode="clinician", language="ru", callback_url=hook.url)
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["status"] in ("queued", "processing") and response.headers["location"] == accepted["url"]
        document = wait_done(http, api.url + accepted["url"], bearer(key))
        assert document["status"] == "succeeded" and document["schema_version"] == "1"
        result = document["result"]
        assert result["outcome"] == "analysed", result
        assert set(result) >= CLI_KEYS and set(result["findings"][0]) >= FINDING_KEYS
        assert result["mode"] == "clinician" and result["body_part"] == "chest"
        assert gettext_for("ru")(PHYSICIAN) in result["message"].splitlines()[-1]
        assert result["overlays"] == [o["url"] for o in document["overlays"]]
        assert result["overlay"] == result["overlays"][0]
        for overlay in document["overlays"]:
            image = http.get(api.url + overlay["url"], headers=bearer(key))
            assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
            assert image.content[:3] == b"\xff\xd8\xff"
        # Another key sees nothing of it.
        assert_problem(http.get(api.url + accepted["url"], headers=bearer(keys["clinic-b"][0])), 404, "not-found")
        # The callback: once, signed with this key's secret, the same document.
        deadline = time.monotonic() + 20
        while not hook.for_id(accepted["id"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        (headers, body), = hook.for_id(accepted["id"])
        assert verify_signature(secret, body, headers["x-xso-signature"])
        assert not verify_signature(secret, body + b" ", headers["x-xso-signature"])
        assert json.loads(body) == document
    assert not redis_client.exists(f"xso:blob:{accepted['id']}")  # the image went once answered
    assert http.delete(api.url + accepted["url"], headers=bearer(key)).status_code == 204
    assert_problem(http.get(api.url + accepted["url"], headers=bearer(key)), 404, "not-found")
    assert not [k for k in redis_client.scan_iter(f"xso:*{accepted['id']}*") if not k.startswith(b"xso:done:")]


def test_callback_is_retried_with_backoff_until_accepted(stack, http):
    api, _, keys, _ = stack
    key, secret = keys["clinic-a"]
    with CallbackReceiver() as hook:
        hook.statuses = [500, 503]
        accepted = post(http, api, key, callback_url=hook.url).json()
        deadline = time.monotonic() + 40
        while len(hook.for_id(accepted["id"])) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)
        calls = hook.for_id(accepted["id"])
    assert len(calls) == 3  # two refusals, one success, nothing after it
    assert all(verify_signature(secret, body, headers["x-xso-signature"]) for headers, body in calls)


def test_idempotency_key_returns_the_first_analysis(stack, http, redis_client):
    api, _, keys, _ = stack
    key = keys["clinic-a"][0]
    first = post(http, api, key, headers={"Idempotency-Key": "order-17"})
    again = post(http, api, key, headers={"Idempotency-Key": "order-17"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other = post(http, api, keys["clinic-b"][0], headers={"Idempotency-Key": "order-17"})  # keys are per client
    assert other.json()["id"] != first.json()["id"]
    wait_done(http, api.url + first.json()["url"], bearer(key))


def test_idempotency_key_reused_with_a_different_request_is_refused(stack, http):
    api, _, keys, _ = stack
    key = keys["clinic-a"][0]
    first = post(http, api, key, headers={"Idempotency-Key": "order-18"})
    assert first.status_code == 202
    for changed in ({"mode": "clinician"}, {"language": "ru"}, {"data": CHEST + b"\0"}):
        body = assert_problem(post(http, api, key, headers={"Idempotency-Key": "order-18"}, **changed), 422,
                              "idempotency-key-reused")
        assert "different request" in body["detail"]
    again = post(http, api, key, headers={"Idempotency-Key": "order-18"})  # the same request still replays
    assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
    wait_done(http, api.url + first.json()["url"], bearer(key))


def test_callbacks_to_loopback_private_or_link_local_addresses_are_refused(stack, http, tmp_path):
    """Without API_CALLBACK_ALLOW_PRIVATE (the default) callback_url must resolve to public addresses."""
    _, env, keys, _ = stack
    strict = ApiProcess({**env, "API_CALLBACK_ALLOW_PRIVATE": "false"}, tmp_path / "api-strict.log").start()
    try:
        key = keys["clinic-b"][0]
        for url in ("http://127.0.0.1:9/hook", "http://localhost:8080/hook", "http://10.0.0.7/hook",
                    "http://192.168.1.20/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]/hook",
                    "http://[::ffff:127.0.0.1]/hook", "http://[fe80::1]/hook", "http://0.0.0.0/hook"):
            body = assert_problem(post(http, strict, key, callback_url=url), 422, "callback-not-public")
            assert "public addresses" in body["detail"] and "API_CALLBACK_ALLOW_PRIVATE" in body["detail"], url
        assert_problem(post(http, strict, key, callback_url="http://no-such-host.invalid/hook"), 422,
                       "callback-not-public")
        assert "Traceback" not in strict.log()
    finally:
        strict.stop()


def test_bad_input_gets_its_status_and_a_problem_body(stack, http, redis_client):
    api, env, keys, worker = stack
    key = keys["clinic-b"][0]
    too_large = assert_problem(post(http, api, key, data=b"\0" * (25 * 1024 * 1024)), 413, "too-large")
    # Refused before the form is read: the client's Accept-Language picks the wording, not English always.
    in_russian = assert_problem(post(http, api, key, data=b"\0" * (25 * 1024 * 1024),
                                     headers={"Accept-Language": "de;q=0.9, ru-RU, en;q=0.5"}), 413, "too-large")
    limit_mb = ServiceSettings.model_fields["API_MAX_UPLOAD_BYTES"].default // 2**20
    assert too_large["detail"] == bot_texts.too_large("en", limit_mb)
    assert in_russian["detail"] == bot_texts.too_large("ru", limit_mb) != too_large["detail"]
    pdf = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<<>>\n%%EOF\n" * 20
    assert_problem(post(http, api, key, data=pdf, filename="report.pdf"), 415, "not-an-image")
    body = assert_problem(post(http, api, key, data=CHEST[: len(CHEST) // 3]), 422, "unusable-image")
    assert body["code"] == "corrupt"
    body = assert_problem(post(http, api, key, data=make_dicom(None), language="kk"), 422, "unusable-image")
    assert body["code"] == "no_pixels" and "DICOM" in body["detail"] and "DOE" not in body["detail"]
    assert_problem(http.post(api.url + "/v1/analyses", files={"image": ("x.jpg", CHEST)}), 401, "unauthorized")
    assert_problem(post(http, api, "xso_wrong"), 401, "unauthorized")
    assert_problem(post(http, api, key, mode="surgeon"), 422, "invalid-field")
    assert_problem(post(http, api, key, callback_url="ftp://example.org/x"), 422, "invalid-callback")
    assert_problem(http.post(api.url + "/v1/analyses", headers=bearer(key), content=CHEST), 415, "not-multipart")
    assert_problem(http.get(api.url + "/v1/analyses/nope", headers=bearer(key)), 404, "not-found")
    # Revoked: refused at the next request (the server re-reads the keys file).
    gone = keys["gone"][0]
    revoke_key(env, "gone")
    assert_problem(post(http, api, gone), 401, "unauthorized")
    # Daily quota used up (the counter as the server keeps it) and the rate limit: 429 with Retry-After.
    day = time.strftime("%Y-%m-%d", time.gmtime())
    redis_client.set(f"xso:api-quota:clinic-q:{day}", 500, ex=3600)
    refused = assert_problem(post(http, api, keys["clinic-q"][0]), 429, "quota-exceeded")
    assert 0 < int(post(http, api, keys["clinic-q"][0]).headers["retry-after"]) <= 86401 and refused["detail"]
    now_ms = int(time.time() * 1000)
    redis_client.zadd("xso:api-rate:clinic-r", {f"{now_ms}-{i}": now_ms for i in range(RATE_LIMIT)})
    limited = post(http, api, keys["clinic-r"][0])
    assert_problem(limited, 429, "rate-limited")
    assert 1 <= int(limited.headers["retry-after"]) <= 61
    # Nothing crashed; no key and no image in any log.
    assert http.get(api.url + "/healthz").status_code == 200
    logs = api.log() + worker.log()
    assert "Traceback" not in api.log()
    for name, (secret_key, _) in keys.items():
        assert secret_key not in logs, name
    assert CALLBACK_SECRET not in logs
    assert CHEST[200:232].hex() not in logs and repr(CHEST[200:232])[2:-1] not in logs


def test_the_worker_serves_the_api_without_a_bot_token(stack, http):
    api, _, keys, worker = stack
    assert "TELEGRAM_BOT_TOKEN" not in worker.env
    key = keys["clinic-b"][0]
    done = wait_done(http, api.url + post(http, api, key).json()["url"], bearer(key))
    assert done["status"] == "succeeded" and done["result"]["verdict"]
    assert "this worker serves HTTP API requests only" in worker.log()
    assert "Traceback" not in worker.log() and "ValidationError" not in worker.log()


def test_operations_endpoints_and_the_committed_openapi_document(stack, http):
    api, *_ = stack
    assert http.get(api.url + "/healthz").json() == {"status": "ok"}
    assert http.get(api.url + "/readyz").status_code == 200
    metrics = http.get(api.url + "/metrics").text
    assert 'xray_api_requests_total{route="/v1/analyses/{analysis_id}"' in metrics
    assert 'xray_queue_depth{queue="inference"}' in metrics
    assert http.get(api.url + "/docs").status_code == 200
    served = http.get(api.url + "/openapi.json").json()
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text(encoding="utf-8"))
    assert served == committed, "docs/openapi.json is stale: python -m api openapi > docs/openapi.json"
    page = http.get(api.url + "/")
    assert page.status_code == 200 and "capture=" in page.text and "script-src 'self'" in page.headers[
        "content-security-policy"]
    texts = http.get(api.url + "/v1/texts/kk").json()
    assert texts["physician"] == gettext_for("kk")(PHYSICIAN) and texts["title"] != "X-ray second opinion"
