# agentq: the worker, producer CLI and simulated Router in one slim, non-root image.
#
#   docker build -t agentq .
#   docker run --rm -e REDIS_URL=redis://host:6379/0 -e HANZO_ROUTER_URL=https://router/v1 \
#     -e HANZO_API_KEY=sk-... agentq                # = agentq worker --processes auto
#   docker run --rm -e REDIS_URL=... -v "$PWD/jobs:/jobs:ro" agentq submit /jobs/x.jsonl --wait
#
# Stage 1 installs the project and its dependencies into a virtualenv; stage 2 copies only that
# virtualenv, so no pip cache, source tree or build tool ends up in the final image.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# pyproject.toml names README.md as the package's readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
COPY ops ./ops
RUN python -m venv /opt/agentq \
 && /opt/agentq/bin/pip install --no-cache-dir . \
 && /opt/agentq/bin/agentq --help >/dev/null

FROM python:3.11-slim
ENV PATH=/opt/agentq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AGENTQ_LOG_FORMAT=json \
    AGENTQ_METRICS_PORT=9108 \
    AGENTQ_METRICS_HOST=0.0.0.0
# A fixed, unprivileged uid; /app is its home and working directory (writable, for the
# embedded Redis's data when REDIS_URL is unset, and a .env file if you mount one).
RUN useradd --uid 10001 --user-group --create-home --home-dir /app --shell /usr/sbin/nologin agentq
COPY --from=build /opt/agentq /opt/agentq
WORKDIR /app
USER 10001:10001
# Prometheus /metrics of `agentq worker` (AGENTQ_METRICS_PORT; 0 turns it off; worker process i
# of --processes serves it on AGENTQ_METRICS_PORT + i). It listens on every interface of the
# container (AGENTQ_METRICS_HOST) so Prometheus can reach it; publish the ports only to a
# network you trust (/metrics has no auth and shows model names).
EXPOSE 9108 9109 9110 9111
ENTRYPOINT ["agentq"]
# One worker process per CPU the container may use (its cpuset and --cpus quota).
CMD ["worker", "--processes", "auto"]
