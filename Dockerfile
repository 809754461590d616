# syntax=docker/dockerfile:1
# palmchat image: the API gateway (`palmchat up`, the default command) and the trainer
# (`palmchat trainer --watch`). Two stages: the builder installs torch (CPU wheel unless
# TORCH_INDEX_URL says otherwise) and palmchat into a virtualenv; the runtime stage copies only
# that virtualenv and the source, and runs as an unprivileged user.
#
#   docker build -t palmchat .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 -t palmchat:cuda .
#   docker build --build-arg EXTRAS=postgres,triton -t palmchat:triton .   # `palmchat triton`

ARG PYTHON_VERSION=3.11

# ------------------------------------------------------------------------------ builder
FROM python:${PYTHON_VERSION}-slim-bookworm AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# optional dependency groups of pyproject.toml; "postgres,triton" for the Triton server image
ARG EXTRAS=postgres
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv \
 && pip install --upgrade pip setuptools wheel \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
# Dependencies change less often than the code: resolve them in their own layer.
COPY pyproject.toml README.md ./
RUN mkdir -p server shared trainer palmchat demo bench \
 && pip install ".[${EXTRAS}]" \
 && pip uninstall -y palmchat
COPY shared ./shared
COPY server ./server
COPY trainer ./trainer
COPY palmchat ./palmchat
COPY demo ./demo
COPY bench ./bench
RUN pip install --no-deps '.' \
 && python -c "import server.api.app, palmchat.app, trainer.metrics"

# ------------------------------------------------------------------------------ runtime
FROM python:${PYTHON_VERSION}-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="palmchat" \
      org.opencontainers.image.description="PaLM chat service with online RLHF"

RUN groupadd --system --gid 10001 palmchat \
 && useradd --system --uid 10001 --gid palmchat --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin palmchat \
 && mkdir -p /data \
 && chown palmchat:palmchat /data

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# The source tree too: the web page's static files (server/web) are served from it.
COPY --from=builder --chown=root:root /app/shared ./shared
COPY --from=builder --chown=root:root /app/server ./server
COPY --from=builder --chown=root:root /app/trainer ./trainer
COPY --from=builder --chown=root:root /app/palmchat ./palmchat
COPY --from=builder --chown=root:root /app/demo ./demo
COPY --from=builder --chown=root:root /app/bench ./bench

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PALMCHAT_DATA_DIR=/data \
    PALMCHAT_HOST=0.0.0.0 \
    PALMCHAT_PORT=8000

USER palmchat:palmchat
VOLUME ["/data"]
EXPOSE 8000 9101

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PALMCHAT_PORT', '8000'), timeout=4)"]

CMD ["palmchat", "up"]
