"""The HTTP API's analysis record, shared by ``api/`` (reads it) and the delivery worker (writes it once).

Redis holds, per accepted request (``contract.keys.Keys``): ``api:<id>`` (a hash written by the API:
client, mode, language, created_at) and, once answered, ``api-result:<id>`` (JSON: status,
completed_at, result, overlays, error). ``resource`` joins the two into the document that
``GET /v1/analyses/{id}`` returns and the callback POSTs (schema ``SCHEMA_VERSION``, docs/api.md).
Callbacks are signed with HMAC-SHA256 (``signature_header``). Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from datetime import UTC, datetime
from typing import Any

SCHEMA_VERSION = "1"
SIGNATURE_HEADER = "X-XSO-Signature"  # "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.' + body>"
STATUSES = ("queued", "processing", "succeeded", "failed")

# Write the answer once: only while the request exists (not deleted by its client) and only the
# first time; then mark it done (diagnose skips it), drop it from the watchdog's set, delete the
# image, and let the record, the result and the overlays expire together.
# KEYS: meta, result, done, pending, blob, attempts, overlay. ARGV: json, ttl, mark ttl, request id.
STORE_ANSWER_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[5], KEYS[6], KEYS[7])
  redis.call('ZREM', KEYS[4], ARGV[4])
  return -1
end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then
  return 0
end
redis.call('SET', KEYS[3], '1', 'EX', tonumber(ARGV[3]))
redis.call('ZREM', KEYS[4], ARGV[4])
redis.call('DEL', KEYS[5], KEYS[6])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[7], tonumber(ARGV[2]))
return 1
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def analysis_path(request_id: str) -> str:
    return f"/v1/analyses/{request_id}"


def overlay_path(request_id: str, number: int) -> str:
    return f"{analysis_path(request_id)}/overlays/{number}"


def answer_keys(keys: Any, request_id: str) -> list[str]:
    """The KEYS of ``STORE_ANSWER_LUA`` for one request (``keys``: ``contract.keys.Keys``)."""
    return [keys.api_request(request_id), keys.api_result(request_id), keys.done(request_id), keys.api_pending(),
            keys.blob(request_id), keys.attempts(request_id), keys.overlay(request_id)]


def decode_hash(raw: dict) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}


def resource(request_id: str, meta: dict[str, str], answer: dict[str, Any] | None, processing: bool) -> dict[str, Any]:
    """The analysis document (schema ``SCHEMA_VERSION``): the request, its status, then its answer."""
    status = answer["status"] if answer else ("processing" if processing else "queued")
    return {
        "schema_version": SCHEMA_VERSION,
        "id": request_id,
        "url": analysis_path(request_id),
        "status": status,
        "mode": meta.get("mode"),
        "language": meta.get("language"),
        "created_at": meta.get("created_at"),
        "completed_at": (answer or {}).get("completed_at"),
        "result": (answer or {}).get("result"),
        "overlays": (answer or {}).get("overlays", []),
        "error": (answer or {}).get("error"),
    }


def callback_secret(master: str, client: str) -> str:
    """The signing secret of one API key (by name), derived from API_CALLBACK_SECRET: nothing to store."""
    return hmac.new(master.encode(), b"xso-callback:" + client.encode(), hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    stamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def verify_signature(secret: str, body: bytes, header: str, tolerance_s: int = 300) -> bool:
    """What a client does with a callback (docs/api.md shows the same in a few lines)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        stamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - stamp) > tolerance_s:
        return False
    expected = signature_header(secret, body, stamp).split(",v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":"))


def non_public_address(address: str) -> bool:
    """Loopback, private (RFC 1918, ULA), link-local (169.254/16: cloud metadata), CGNAT, multicast,
    reserved or unspecified: an address a callback must not reach unless the operator allows it."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def callback_target_refused(url: str, allow_private: bool) -> str | None:
    """Why the callback to ``url`` is refused (a sentence for the client), or None when it may go.

    The host is resolved and *every* address it resolves to must be public, unless ``allow_private``
    (API_CALLBACK_ALLOW_PRIVATE: tests, a clinic's LAN). Checked when the request is accepted and
    again before each POST (the name may resolve differently by then)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        return "callback_url has no host."
    if allow_private:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError, UnicodeError):
        return f"callback_url's host {host!r} does not resolve."
    addresses = {info[4][0] for info in infos}
    if not addresses:
        return f"callback_url's host {host!r} does not resolve."
    if any(non_public_address(address) for address in addresses):
        return (f"callback_url's host {host!r} resolves to a loopback, private or link-local address; "
                "callbacks go to public addresses only (the operator can allow others with "
                "API_CALLBACK_ALLOW_PRIVATE).")
    return None
