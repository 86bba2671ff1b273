"""The HTTP API and its web page: clinics post an image, poll (or get a signed callback), read the result.

No torch here: images are checked with ``diagnosis.intake`` (Pillow, pydicom), stored in Redis with
the blob TTL and analysed by the same ``diagnose`` task the bot enqueues (``bot.dispatch``, by name),
with ``channel="api"`` in the envelope; the delivery worker stores the answer (``worker.api_out``).
``app`` (routes), ``auth`` (API keys in a file, hashed), ``limits`` (rate and daily quota),
``problems`` (RFC 9457 errors), ``store`` (Redis), ``watchdog`` (lost tasks), ``texts`` (the page's
texts), ``__main__`` (``python -m api``: serve; ``python -m api keys create|revoke|list``).
"""
