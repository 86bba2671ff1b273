# syntax=docker/dockerfile:1
# Slim image for the Telegram bot (no torch): python -m bot.
# Target "api" runs the HTTP API (python -m api) from the same slim image.
# Target "flower" adds Flower to the same slim image (it only needs the Celery app, not the models).
FROM python:3.11-slim AS bot

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --create-home --uid 10001 app

COPY pyproject.toml README.md ./
COPY contract ./contract
COPY diagnosis ./diagnosis
COPY bot ./bot
COPY worker ./worker
COPY api ./api
RUN pip install ".[bot,api]" \
    && python -c "import sys, bot.app, api.app; assert 'torch' not in sys.modules"

USER app
ENV HEARTBEAT_FILE=/tmp/xray-bot-heartbeat
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 CMD ["python", "-m", "bot.healthcheck"]
CMD ["python", "-m", "bot"]


FROM bot AS flower
USER root
RUN pip install "flower>=2.0"
USER app
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5555/healthcheck', timeout=5)"]
CMD ["celery", "-A", "worker", "flower", "--port=5555"]


FROM bot AS api
USER root
RUN mkdir -p /data && chown app:app /data  # the keys file's volume
USER app
ENV API_HOST=0.0.0.0 API_PORT=8000 API_KEYS_FILE=/data/api-keys.json
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=5)"]
EXPOSE 8000
CMD ["python", "-m", "api"]
