# syntax=docker/dockerfile:1
# Celery worker image (torch + the inference core). One image, two builds:
#   CPU (default):  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu   (small, CPU-only wheels)
#   GPU:            TORCH_INDEX_URL=https://pypi.org/simple                 (PyPI's Linux wheels bundle CUDA)
# Models are not baked in: mount a models folder and point MODELS_DIR at it (see docker-compose.yml).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PTB_TIMEDELTA=true \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /app
RUN useradd --create-home --uid 10001 app
# The PDF report's fonts for Hindi, Persian and Arabic (Noto Sans Devanagari, Noto Sans Arabic).
RUN apt-get update && apt-get install -y --no-install-recommends fonts-noto-core && rm -rf /var/lib/apt/lists/*

# torch first, from the chosen index; the project install then finds it satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.14.1" "torchvision==0.29.1"

COPY pyproject.toml README.md ./
COPY contract ./contract
COPY diagnosis ./diagnosis
COPY bot ./bot
COPY worker ./worker
RUN pip install ".[worker]"

USER app
ENV MODELS_DIR=/models
# The node name is set by the compose command (-n <role>@%h); ping this container's node only.
HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 \
    CMD celery -A worker inspect ping --timeout 10 -d "${WORKER_NODE:-celery}@$(hostname)" || exit 1
CMD ["celery", "-A", "worker", "worker", "-Q", "inference,delivery", "--concurrency", "1", "-n", "celery@%h"]
