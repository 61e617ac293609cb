# syntax=docker/dockerfile:1
# One file, two images sharing one base:
#   docker build --target api     -t feedloop-api .
#   docker build --target trainer -t feedloop-trainer .
# torch is installed first and pinned, so the project's `torch>=2.4` is already satisfied and no
# other build is pulled in by a range. TORCH_INDEX_URL names the index torch comes from (a mirror,
# or a CPU-only wheel index); empty means pip's configured default.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FEEDLOOP_HOME=/data
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY store ./store
COPY lm ./lm
COPY service ./service
COPY trainer ./trainer
RUN pip install . && rm -rf build *.egg-info

# Checkpoints (and the embedded database, when no DATABASE_URL is given) live under /data;
# a volume mounted there inherits this ownership when it is first created.
RUN useradd --create-home --uid 10001 --user-group feedloop \
    && mkdir -p /data && chown feedloop:feedloop /data
USER feedloop
WORKDIR /data
VOLUME ["/data"]

FROM base AS api
ENV FEEDLOOP_HOST=0.0.0.0 \
    FEEDLOOP_PORT=8000
EXPOSE 8000
# /ready: the database answers and a policy is loaded (the first start may wait for a bootstrap).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('FEEDLOOP_PORT', '8000'), timeout=4)"
CMD ["feedloop", "serve"]

FROM base AS trainer
CMD ["feedloop", "trainer"]
