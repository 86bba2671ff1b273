"""A fake Telegram Bot API server on loopback, for offline tests of the bot and the workers.

Standard library only (``http.server`` in a thread). It speaks the parts of the Bot API the service
uses: getMe, deleteWebhook, getUpdates (long poll honouring ``timeout``), getFile and file download
under ``/file/bot<token>/<path>``, sendMessage, sendPhoto (multipart), sendMediaGroup (multipart,
``attach://`` files; answers a list of messages), sendDocument (multipart), sendChatAction,
editMessageText, deleteMessage, setMyCommands, answerCallbackQuery; any other method answers
``{"ok": true, "result": true}``. Every call is recorded (``calls``) for assertions; tests inject
updates (``inject_*``) and faults (``fail_next``: 429 with retry_after, 5xx; ``chaos``: a random
share of the calls of some methods fails). Like Telegram, it refuses to edit or delete a message
that was deleted ("message to edit not found"), forgets updates once a later ``getUpdates`` offset
has confirmed them, and, after ``enforce_limits()``, answers 429 (counted in ``limit_refusals``) to
messages beyond Telegram's send limits: about 30 per second overall, one per second per chat, 20
per minute per group.

Point the service at it with ``TELEGRAM_API_URL=fake.url`` (the bot appends ``/bot`` and
``/file/bot`` itself).
"""

from __future__ import annotations

import collections
import email.parser
import email.policy
import itertools
import json
import math
import random
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BOT_ID = 7000001
BOT_USERNAME = "xray_test_bot"


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    status: int = 200
    at: float = field(default_factory=time.monotonic)
    result: Any = None  # what the fake answered (e.g. the sent Message), for successful calls

    @property
    def chat_id(self) -> int | None:
        value = self.params.get("chat_id")
        return int(value) if value is not None else None


@dataclass
class _Fault:
    method: str
    status: int
    retry_after: int | None
    times: int


@dataclass
class _Limits:
    """All chats: at most ``overall[0]`` messages within any ``overall[1]`` seconds. One private chat
    or one group: a token bucket (GCRA), ``(messages per second, burst)``."""

    overall: tuple[int, float]
    private_chat: tuple[float, int]
    group: tuple[float, int]
    sent_at: list[float] = field(default_factory=list)  # accepted messages, for the overall window
    tat: dict[int, float] = field(default_factory=dict)  # chat → theoretical arrival time of its next message


LIMITED_METHODS = frozenset({"sendMessage", "sendPhoto", "sendMediaGroup", "sendDocument", "editMessageText"})


@dataclass
class _Chaos:
    methods: frozenset[str]
    rate: float
    statuses: tuple[int, ...]
    retry_after: tuple[int, ...]
    rng: random.Random
    injected: int = 0


class FakeTelegram:
    """Start with ``start()`` (or as a context manager); ``url`` is the TELEGRAM_API_URL to use."""

    def __init__(self, token: str = "123456:TEST-TOKEN"):
        self.token = token
        self.calls: list[Call] = []
        self._updates: list[dict[str, Any]] = []
        self._files: dict[str, tuple[str, bytes]] = {}  # file_id → (file_path, bytes)
        self._faults: list[_Fault] = []
        self._chaos: _Chaos | None = None
        self._deleted: set[tuple[int, int]] = set()  # (chat_id, message_id) of deleted bot messages
        self._cond = threading.Condition()
        self._update_ids = itertools.count(1)
        self._user_message_ids = itertools.count(1)
        self._bot_message_ids = itertools.count(100_000)
        self._file_ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.confirmed_offset = 0
        self._limits: _Limits | None = None
        self.limit_refusals = 0
        self.limit_refused_by: collections.Counter = collections.Counter()  # "overall" / "chat"
        self._on_call: dict[str, Callable[[], None]] = {}

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> FakeTelegram:
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-telegram", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            with self._cond:
                self._cond.notify_all()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeTelegram:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def reset(self) -> None:
        """Forget calls, pending updates and faults (files stay: ids are unique)."""
        with self._cond:
            self.calls.clear()
            self._faults.clear()
            self._updates.clear()
            self._chaos = None
            self._on_call.clear()
            self._limits = None
            self.limit_refusals = 0
            self.limit_refused_by.clear()

    # ----------------------------------------------------------------- injection
    def add_file(self, data: bytes, path_hint: str = "documents/file.bin") -> tuple[str, str]:
        """Store bytes for getFile/download; returns (file_id, file_unique_id)."""
        number = next(self._file_ids)
        file_id = f"FILE{number:06d}"
        folder, _, name = path_hint.rpartition("/")
        path = f"{folder or 'documents'}/file_{number}_{name or 'file'}"
        with self._cond:
            self._files[file_id] = (path, bytes(data))
        return file_id, f"U{number:06d}"

    def inject_update(self, update: dict[str, Any]) -> int:
        with self._cond:
            update = {"update_id": next(self._update_ids), **update}
            self._updates.append(update)
            self._cond.notify_all()
        return update["update_id"]

    @staticmethod
    def user(user_id: int, language_code: str | None = "en", first_name: str = "Test") -> dict[str, Any]:
        user = {"id": user_id, "is_bot": False, "first_name": first_name}
        if language_code:
            user["language_code"] = language_code
        return user

    def _message(self, user_id: int, chat_id: int | None, language_code: str | None, **fields: Any) -> dict[str, Any]:
        chat_id = user_id if chat_id is None else chat_id
        chat = {"id": chat_id, "type": "private" if chat_id > 0 else "group"}
        if chat_id > 0:
            chat["first_name"] = "Test"
        else:
            chat["title"] = "Test group"
        return {
            "message_id": next(self._user_message_ids),
            "date": int(time.time()),
            "chat": chat,
            "from": self.user(user_id, language_code),
            **fields,
        }

    def inject_message(
        self, user_id: int, *, chat_id: int | None = None, language_code: str | None = "en", **fields: Any
    ) -> dict[str, Any]:
        """Any message (``text=``, ``sticker=``, ``video=``…); returns the message dict."""
        message = self._message(user_id, chat_id, language_code, **fields)
        self.inject_update({"message": message})
        return message

    def inject_text(self, user_id: int, text: str, **kwargs: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"text": text}
        if text.startswith("/"):
            command = text.split()[0]
            fields["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        return self.inject_message(user_id, **fields, **kwargs)

    def inject_photo(
        self,
        user_id: int,
        data: bytes,
        *,
        thumbnail: bytes = b"not an image: thumbnails must not be analysed",
        media_group_id: str | None = None,
        forwarded: bool = False,
        caption: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """A photo message with two sizes: ``photo[0]`` a bogus thumbnail, ``photo[-1]`` ``data``."""
        thumb_id, thumb_uid = self.add_file(thumbnail, "photos/thumb.jpg")
        big_id, big_uid = self.add_file(data, "photos/photo.jpg")
        fields: dict[str, Any] = {
            "photo": [
                {"file_id": thumb_id, "file_unique_id": thumb_uid, "width": 90, "height": 90,
                 "file_size": len(thumbnail)},
                {"file_id": big_id, "file_unique_id": big_uid, "width": 1280, "height": 1280,
                 "file_size": len(data)},
            ]
        }
        if media_group_id:
            fields["media_group_id"] = media_group_id
        if caption:
            fields["caption"] = caption
        if forwarded:
            fields["forward_origin"] = {"type": "hidden_user", "sender_user_name": "Dr. Somebody", "date": 1}
        return self.inject_message(user_id, **fields, **kwargs)

    def inject_document(
        self,
        user_id: int,
        data: bytes,
        *,
        file_name: str | None,
        mime_type: str | None,
        file_size: int | None = None,
        media_group_id: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        file_id, unique_id = self.add_file(data, f"documents/{file_name or 'file'}")
        document: dict[str, Any] = {"file_id": file_id, "file_unique_id": unique_id,
                                    "file_size": len(data) if file_size is None else file_size}
        if file_name is not None:
            document["file_name"] = file_name
        if mime_type is not None:
            document["mime_type"] = mime_type
        fields: dict[str, Any] = {"document": document}
        if media_group_id:
            fields["media_group_id"] = media_group_id
        return self.inject_message(user_id, **fields, **kwargs)

    def inject_callback(self, user_id: int, data: str, message: dict[str, Any], language_code: str = "en") -> None:
        self.inject_update({
            "callback_query": {
                "id": f"CB{next(self._update_ids)}",
                "from": self.user(user_id, language_code),
                "message": message,
                "chat_instance": "chat-instance",
                "data": data,
            }
        })

    def fail_next(self, method: str, status: int = 429, *, retry_after: int | None = None, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` answer ``status`` (429 carries ``retry_after``)."""
        with self._cond:
            self._faults.append(_Fault(method, status, retry_after, times))

    def on_call(self, method: str, action: Callable[[], None] | None) -> None:
        """Run ``action`` when a call of ``method`` arrives, before it is answered (a fault elsewhere at
        exactly that moment, e.g. Redis killed while a reply is being sent); None removes it."""
        with self._cond:
            if action is None:
                self._on_call.pop(method, None)
            else:
                self._on_call[method] = action

    def chaos(self, rate: float, methods: tuple[str, ...] = ("sendMessage", "sendPhoto", "sendMediaGroup",
                                                            "editMessageText"), *,
              statuses: tuple[int, ...] = (429, 500, 502, 503), retry_after: tuple[int, ...] = (1, 2, 3),
              seed: int = 0) -> None:
        """From now on a share ``rate`` of the calls of ``methods`` fails with a random status of
        ``statuses`` (429 carries a random ``retry_after``); ``chaos(0)`` stops it."""
        with self._cond:
            self._chaos = _Chaos(frozenset(methods), rate, statuses, retry_after, random.Random(seed)) if rate else None

    def enforce_limits(self, overall: tuple[int, float] = (30, 1.0), private_chat: tuple[float, int] = (1.0, 3),
                       group: tuple[float, int] = (20 / 60, 3)) -> None:
        """From now on refuse, like Telegram, messages over the send limits: 429 with ``retry_after``
        (counted in ``limit_refusals`` and, by limit, ``limit_refused_by``). Defaults: no more than
        30 messages within any second overall; per private chat one per second, per group 20 per
        minute, each with a burst of 3 tolerated (Telegram does not publish exact figures)."""
        with self._cond:
            self._limits = _Limits(overall, private_chat, group)
            self.limit_refusals = 0
            self.limit_refused_by.clear()

    def _over_limit(self, method: str, params: dict[str, Any], now: float) -> float | None:
        """Seconds until this message would conform, or None when it does and was counted (lock held)."""
        limits = self._limits
        if limits is None or method not in LIMITED_METHODS or params.get("chat_id") is None:
            return None
        chat_id = int(params["chat_id"])
        waits = {}
        count, window = limits.overall
        limits.sent_at = [at for at in limits.sent_at if now - at < window]
        if len(limits.sent_at) >= count:
            waits["overall"] = limits.sent_at[-count] + window - now
        per_s, burst = limits.group if chat_id < 0 else limits.private_chat
        earliest = limits.tat.get(chat_id, now) - (burst - 1) / per_s
        if earliest > now:
            waits["chat"] = earliest - now
        if waits:
            self.limit_refused_by.update(waits.keys())
            return max(waits.values())
        limits.sent_at.append(now)
        limits.tat[chat_id] = max(limits.tat.get(chat_id, now), now) + 1.0 / per_s
        return None

    @property
    def chaos_injected(self) -> int:
        with self._cond:
            return self._chaos.injected if self._chaos else 0

    # ----------------------------------------------------------------- assertions
    def calls_of(self, method: str, chat_id: int | None = None, *, ok_only: bool = True) -> list[Call]:
        with self._cond:
            return [
                call for call in self.calls
                if call.method == method
                and (chat_id is None or call.chat_id == chat_id)
                and (not ok_only or call.status == 200)
            ]

    def calls_since(self, index: int) -> tuple[list[Call], int]:
        """Calls recorded from position ``index`` on, and the position to continue from (load drivers)."""
        with self._cond:
            return self.calls[index:], len(self.calls)

    def texts_to(self, chat_id: int) -> list[str]:
        """Texts of every accepted sendMessage to ``chat_id``, in order."""
        return [str(call.params.get("text", "")) for call in self.calls_of("sendMessage", chat_id)]

    def wait_for(self, predicate, timeout: float = 30.0, interval: float = 0.05) -> Any:
        """Poll ``predicate()`` until it is truthy; return its value or raise ``AssertionError``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s; calls: {self.summary()}")
            time.sleep(interval)

    def summary(self) -> list[tuple[str, Any, int]]:
        with self._cond:
            return [(c.method, c.params.get("chat_id"), c.status) for c in self.calls if c.method != "getUpdates"]

    # ----------------------------------------------------------------- API
    def _take_fault(self, method: str) -> _Fault | None:
        for fault in self._faults:
            if fault.method == method and fault.times > 0:
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
                return fault
        chaos = self._chaos
        if chaos is not None and method in chaos.methods and chaos.rng.random() < chaos.rate:
            chaos.injected += 1
            status = chaos.rng.choice(chaos.statuses)
            return _Fault(method, status, chaos.rng.choice(chaos.retry_after) if status == 429 else None, 1)
        return None

    def handle(self, method: str, params: dict[str, Any], files: dict[str, bytes]) -> tuple[int, dict[str, Any]]:
        with self._cond:
            fault = self._take_fault(method) if method != "getUpdates" else None
            call = Call(method, params, files)
            self.calls.append(call)
            if fault is None:
                wait = self._over_limit(method, params, call.at)
                if wait is not None:
                    self.limit_refusals += 1
                    fault = _Fault(method, 429, max(1, math.ceil(wait)), 1)
            if fault is not None:
                call.status = fault.status
                body: dict[str, Any] = {"ok": False, "error_code": fault.status}
                if fault.status == 429:
                    body["description"] = f"Too Many Requests: retry after {fault.retry_after or 1}"
                    body["parameters"] = {"retry_after": fault.retry_after or 1}
                else:
                    body["description"] = HTTPStatus(fault.status).phrase
                return fault.status, body
        if method == "getUpdates":
            return 200, {"ok": True, "result": self._get_updates(params)}
        action = self._on_call.get(method)
        if action is not None:
            action()
        handler = getattr(self, f"_api_{method}", None)
        result = handler(params, files) if handler else True
        if isinstance(result, tuple):  # (status, error body)
            with self._cond:
                call.status = result[0]
            return result
        call.result = result
        return 200, {"ok": True, "result": result}

    def _get_updates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        limit = int(params.get("limit") or 100)
        deadline = time.monotonic() + min(timeout, 30.0)
        with self._cond:
            if offset:
                self.confirmed_offset = max(self.confirmed_offset, offset)
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
            while True:
                pending = [u for u in self._updates if u["update_id"] >= offset][:limit]
                remaining = deadline - time.monotonic()
                if pending or remaining <= 0 or self._server is None:
                    return pending
                self._cond.wait(remaining)

    def _api_getMe(self, params, files):
        return {"id": BOT_ID, "is_bot": True, "first_name": "X-ray second opinion", "username": BOT_USERNAME,
                "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}

    def _api_getFile(self, params, files):
        file_id = str(params.get("file_id"))
        with self._cond:
            stored = self._files.get(file_id)
        if stored is None:
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: invalid file_id"}
        path, data = stored
        return {"file_id": file_id, "file_unique_id": "U" + file_id, "file_size": len(data), "file_path": path}

    def download(self, path: str) -> bytes | None:
        with self._cond:
            self.calls.append(Call("download", {"path": path}))
            for stored_path, data in self._files.values():
                if stored_path == path:
                    return data
        return None

    def _bot_message(self, params: dict[str, Any], **fields: Any) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        message = {
            "message_id": next(self._bot_message_ids),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"},
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "X-ray second opinion", "username": BOT_USERNAME},
            **fields,
        }
        if params.get("reply_markup"):
            message["reply_markup"] = params["reply_markup"]
        return message

    def _api_sendMessage(self, params, files):
        return self._bot_message(params, text=str(params.get("text", "")))

    def _api_sendPhoto(self, params, files):
        data = files.get("photo", b"")
        fields: dict[str, Any] = {"photo": [{"file_id": "SENT", "file_unique_id": "SENT", "width": 224,
                                             "height": 224, "file_size": len(data)}]}
        if params.get("caption"):
            fields["caption"] = params["caption"]
        return self._bot_message(params, **fields)

    def _api_sendDocument(self, params, files):
        data = files.get("document", b"")
        fields: dict[str, Any] = {"document": {"file_id": "SENT", "file_unique_id": "SENT", "file_size": len(data)}}
        if params.get("caption"):
            fields["caption"] = params["caption"]
        return self._bot_message(params, **fields)

    def _api_sendMediaGroup(self, params, files):
        """An album: ``media`` is a JSON list of InputMediaPhoto, each ``attach://<name>`` of a file part."""
        media = params.get("media")
        if not isinstance(media, list) or not 2 <= len(media) <= 10:
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: wrong number of media"}
        messages, group = [], f"G{next(self._bot_message_ids)}"
        for item in media:
            name = str(item.get("media", "")).removeprefix("attach://")
            if item.get("type") != "photo" or name not in files:
                return 400, {"ok": False, "error_code": 400, "description": "Bad Request: wrong file in media"}
            fields: dict[str, Any] = {"media_group_id": group, "photo": [{
                "file_id": "SENT", "file_unique_id": "SENT", "width": 224, "height": 224,
                "file_size": len(files[name])}]}
            if item.get("caption"):
                fields["caption"] = item["caption"]
            messages.append(self._bot_message(params, **fields))
        return messages

    def album_photos(self, chat_id: int) -> list[tuple[bytes, str]]:
        """(JPEG, caption) of every photo of every accepted album to ``chat_id``, in order."""
        return [(call.files[str(item["media"]).removeprefix("attach://")], str(item.get("caption", "")))
                for call in self.calls_of("sendMediaGroup", chat_id) for item in call.params["media"]]

    def _gone(self, params, what: str):
        key = (int(params["chat_id"]), int(params["message_id"]))
        with self._cond:
            if key in self._deleted:
                return 400, {"ok": False, "error_code": 400, "description": f"Bad Request: message to {what} not found"}
        return None

    def _api_deleteMessage(self, params, files):
        gone = self._gone(params, "delete")
        if gone:
            return gone
        with self._cond:
            self._deleted.add((int(params["chat_id"]), int(params["message_id"])))
        return True

    def _api_editMessageText(self, params, files):
        gone = self._gone(params, "edit")
        if gone:
            return gone
        message = self._bot_message(params, text=str(params.get("text", "")))
        message["message_id"] = int(params["message_id"])
        message["edit_date"] = int(time.time())
        return message


def _decode_value(value: str) -> Any:
    text = value.strip()
    if text[:1] in "{[" or text in ("true", "false", "null"):
        try:
            return json.loads(text)
        except ValueError:
            return value
    if text.lstrip("-").isdigit():
        return int(text)
    return value


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Clients hanging up (a stopped bot's long poll) are normal here: no tracebacks."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    owner: FakeTelegram
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> tuple[str, str] | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)  # httpx sends ":" as %3A
        token = self.owner.token
        if path.startswith(f"/file/bot{token}/"):
            return "file", path[len(f"/file/bot{token}/"):]
        if path.startswith(f"/bot{token}/"):
            return "api", path[len(f"/bot{token}/"):]
        return None

    def do_GET(self) -> None:
        route = self._route()
        if route and route[0] == "file":
            data = self.owner.download(route[1])
            if data is not None:
                self._send(200, data, "application/octet-stream")
                return
        if route and route[0] == "api":
            self._answer(route[1], dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query)), {})
            return
        self._send(404, b'{"ok":false,"error_code":404,"description":"Not Found"}')

    def do_POST(self) -> None:
        route = self._route()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if not route or route[0] != "api":
            self._send(404, b'{"ok":false,"error_code":404,"description":"Not Found"}')
            return
        params, files = self._parse_body(body)
        self._answer(route[1], params, files)

    def _parse_body(self, body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
        content_type = self.headers.get("Content-Type", "")
        params: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        if content_type.startswith("multipart/form-data"):
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + content_type.encode() + b"\r\nMIME-Version: 1.0\r\n\r\n" + body
            )
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True) or b""
                if part.get_filename() is not None:
                    files[name] = payload
                else:
                    params[name] = _decode_value(payload.decode("utf-8"))
        elif content_type.startswith("application/json"):
            params = json.loads(body or b"{}")
        else:
            pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True)
            params = {key: _decode_value(value) for key, value in pairs}
        return params, files

    def _answer(self, method: str, params: dict[str, Any], files: dict[str, bytes]) -> None:
        status, payload = self.owner.handle(method, params, files)
        self._send(status, json.dumps(payload).encode())
