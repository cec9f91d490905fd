# comfy-relay: the relay alone (no emulator at run time), as a non-root user, logging JSON.
#   docker build -t comfy-relay:0.1.0 .
#   docker run --rm -p 8190:8190 -e COMFYUI_URL=http://comfyui:8188 comfy-relay:0.1.0

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
# The package and its dependencies in a virtualenv the final stage copies whole.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install .

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="comfy-relay" \
      org.opencontainers.image.description="WebSocket event relay in front of ComfyUI" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RELAY_HOST=0.0.0.0 \
    RELAY_PORT=8190 \
    RELAY_LOG_FORMAT=json \
    RELAY_WORKFLOWS_DIR=/app/workflows \
    RELAY_ETA_FILE=/var/lib/comfy-relay/durations.json
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin relay \
    && mkdir -p /var/lib/comfy-relay \
    && chown 10001:10001 /var/lib/comfy-relay
COPY --from=build /opt/venv /opt/venv
COPY workflows /app/workflows
USER 10001:10001
WORKDIR /app
EXPOSE 8190
# Liveness only: the process answers. Kubernetes uses its own probes (deploy/), /readyz included.
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('RELAY_PORT', '8190'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["comfy-relay"]
CMD ["serve"]
