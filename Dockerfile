# syntax=docker/dockerfile:1
# sinch-gateway image: `docker build -t sinch-gateway .`
#
# Stage 1 installs the package and its runtime dependencies into a virtualenv
# (wheels only: aiohttp, aiokafka and orjson ship manylinux wheels, so no
# compiler is needed). Stage 2 copies that virtualenv onto a clean slim base:
# no pip cache, no sources, no build tools, no dev extra.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ONLY_BINARY=:all:
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# A wheel of the project itself (pure Python, built from source), then an
# install of that wheel with its pinned-by-pyproject runtime dependencies and
# the `fast` extra (uvloop, the event loop `gateway run` then uses).
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --no-binary sinch-gateway \
        --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir "$(echo /wheels/*.whl)[fast]"

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="sinch-gateway" \
      org.opencontainers.image.description="Kafka to Sinch Conversation API gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /tmp
# Admin server: /metrics, /healthz, /readyz and the webhook (GATEWAY_HTTP_PORT).
EXPOSE 8080
# Configuration comes from GATEWAY_* variables (and GATEWAY_CONFIG, a TOML file).
# slim has no curl: the probe is the standard library; any non-2xx raises, exit 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('GATEWAY_HTTP_PORT') or '8080'), timeout=3)"]
ENTRYPOINT ["gateway"]
CMD ["run"]
