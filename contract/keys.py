"""Names the bot and the workers must agree on without importing each other.

Celery queue and task names, the Redis key layout and Telegram's limits. Plain constants and one
small class: no third-party imports, so every process (and ``diagnosis``) can read them.
"""

from __future__ import annotations

# Celery names shared by the bot (send_task by name) and the workers.
INFERENCE_QUEUE = "inference"
DELIVERY_QUEUE = "delivery"
DIAGNOSE_TASK = "diagnose"
DELIVER_TASK = "deliver"
CALLBACK_TASK = "callback"  # HTTP API: POST the finished analysis to the client's callback_url (delivery queue)

# Telegram Bot API limits.
TELEGRAM_DOWNLOAD_LIMIT = 20 * 1024 * 1024  # bots may download at most 20 MB per file
TELEGRAM_DOWNLOAD_LIMIT_MB = TELEGRAM_DOWNLOAD_LIMIT // (1024 * 1024)  # the same limit, for texts
TELEGRAM_TEXT_LIMIT = 4096  # characters per message
TELEGRAM_CAPTION_LIMIT = 1024  # characters per photo caption
TELEGRAM_ALBUM_LIMIT = 10  # photos per album (sendMediaGroup takes 2-10)


class Keys:
    """Redis key layout. ``request`` ids are random (``secrets.token_urlsafe``), never derived from users.

    Per chat: ``mode:<chat_id>`` (/mode: screening or clinician replies).
    Per user: ``lang:<uid>`` (language choice), ``rate:<uid>`` (timestamps of recent images),
    ``rate-notice:<uid>``, ``requests:<uid>`` (ids of the user's requests in flight, so /forget can
    delete their blobs). Per request: ``blob:<id>`` (image bytes), ``overlay:<id>`` (hash: finding label →
    overlay JPEG),
    ``sent:<id>:<part>`` (delivery marks), ``attempts:<id>``, ``lock:<id>``, ``done:<id>``.
    Intake (``bot.intake``): the stream ``intake`` of received updates, ``intake-seen:<update_id>``
    (stored once), ``update:<update_id>`` (a handler's notes while the update is in progress).
    Telegram's send limits (``contract.pacing``): ``pace:overall``, ``pace:chat:<chat_id>``,
    ``pace:wanted:<chat_id>`` (the bot waits for the chat's next slot).
    Delayed tasks (``worker.scheduler``): the sorted set ``scheduled``.
    Bursts (``contract.bursts``): ``turns:<chat_id>`` (sorted set: the chat's unanswered requests by
    the message id of their image), the chat's open acknowledgement ``ack-burst:<chat_id>`` (its id),
    ``ack:<burst>`` (hash: chat, message id, images covered), ``ack-open:<burst>`` (set: its
    unanswered requests) and ``ack-of:<id>`` (a request's burst).
    HTTP API (``api/``): ``api:<id>`` (hash: the request's owner, mode, language, times),
    ``api-result:<id>`` (the answer, JSON, written once), ``api-callback:<id>`` (callback delivered),
    ``api-idem:<client>:<digest>`` (Idempotency-Key → id), ``api-rate:<client>``, ``api-quota:<client>:<day>``,
    the sorted set ``api-pending`` (accepted, not yet answered) and ``api-watchdog`` (its lock).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix

    def language(self, user_id: int) -> str:
        return f"{self.prefix}lang:{user_id}"

    def mode(self, chat_id: int) -> str:
        return f"{self.prefix}mode:{chat_id}"

    def rate(self, user_id: int) -> str:
        return f"{self.prefix}rate:{user_id}"

    def rate_notice(self, user_id: int) -> str:
        return f"{self.prefix}rate-notice:{user_id}"

    def user_requests(self, user_id: int) -> str:
        return f"{self.prefix}requests:{user_id}"

    def blob(self, request_id: str) -> str:
        return f"{self.prefix}blob:{request_id}"

    def overlay(self, request_id: str) -> str:
        return f"{self.prefix}overlay:{request_id}"

    def sent(self, request_id: str, part: str) -> str:
        return f"{self.prefix}sent:{request_id}:{part}"

    def attempts(self, request_id: str) -> str:
        return f"{self.prefix}attempts:{request_id}"

    def lock(self, request_id: str) -> str:
        return f"{self.prefix}lock:{request_id}"

    def done(self, request_id: str) -> str:
        return f"{self.prefix}done:{request_id}"

    def intake_stream(self) -> str:
        return f"{self.prefix}intake"

    def intake_seen(self, update_id: int) -> str:
        return f"{self.prefix}intake-seen:{update_id}"

    def update_notes(self, update_id: int) -> str:
        return f"{self.prefix}update:{update_id}"

    def pace_overall(self) -> str:
        return f"{self.prefix}pace:overall"

    def pace_chat(self, chat_id: int) -> str:
        return f"{self.prefix}pace:chat:{chat_id}"

    def turns(self, chat_id: int) -> str:
        return f"{self.prefix}turns:{chat_id}"

    def ack_burst(self, chat_id: int) -> str:
        return f"{self.prefix}ack-burst:{chat_id}"

    def ack(self, burst: str) -> str:
        return f"{self.prefix}ack:{burst}"

    def ack_open(self, burst: str) -> str:
        return f"{self.prefix}ack-open:{burst}"

    def ack_of(self, request_id: str) -> str:
        return f"{self.prefix}ack-of:{request_id}"

    def pace_wanted(self, chat_id: int) -> str:
        return f"{self.prefix}pace:wanted:{chat_id}"

    def scheduled(self) -> str:
        return f"{self.prefix}scheduled"

    def api_request(self, request_id: str) -> str:
        return f"{self.prefix}api:{request_id}"

    def api_result(self, request_id: str) -> str:
        return f"{self.prefix}api-result:{request_id}"

    def api_callback(self, request_id: str) -> str:
        return f"{self.prefix}api-callback:{request_id}"

    def api_idempotency(self, client: str, digest: str) -> str:
        return f"{self.prefix}api-idem:{client}:{digest}"

    def api_rate(self, client: str) -> str:
        return f"{self.prefix}api-rate:{client}"

    def api_quota(self, client: str, day: str) -> str:
        return f"{self.prefix}api-quota:{client}:{day}"

    def api_pending(self) -> str:
        return f"{self.prefix}api-pending"

    def api_watchdog(self) -> str:
        return f"{self.prefix}api-watchdog"

    def request_keys(self, request_id: str) -> list[str]:
        """The request's image and what was made from it, deleted once the user has the answer
        (``worker.deliver.cleanup``). Not the lock, nor the done and sent marks: they outlive the
        answer so that a redelivered task does not answer twice."""
        return [self.blob(request_id), self.overlay(request_id), self.attempts(request_id)]
