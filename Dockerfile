# One orch8 node per container: the supervisor and its worker processes.
#   docker build -t orch8:0.1.0 .
#   docker run --env-file deploy/orch8.env -p 127.0.0.1:8080:8080 orch8:0.1.0
# Handlers of your own: build FROM this image, pip install your package into
# /opt/orch8, and set ORCH8_HANDLERS.

FROM python:3.12-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY orch8 orch8
COPY supervisor supervisor
COPY migrations migrations
RUN python -m venv /opt/orch8 && /opt/orch8/bin/pip install --no-cache-dir .

FROM python:3.12-slim-bookworm
# tini is PID 1: it reaps processes orphaned by handlers (the supervisor reaps only its
# own workers) and passes SIGTERM on to the supervisor alone, which drains.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 orch8 \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/orch8 --create-home orch8
COPY --from=build /opt/orch8 /opt/orch8
# A non-loopback address needs ORCH8_API_TOKEN (the node refuses to start without it).
ENV PATH=/opt/orch8/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ORCH8_BIND=0.0.0.0:8080
USER 10001:10001
WORKDIR /var/lib/orch8
EXPOSE 8080
# SIGTERM drains: no new claims, in-flight steps finish, the node deregisters and exits.
# Give the container longer than ORCH8_DRAIN_TIMEOUT_SECS to stop (docker stop -t 330).
STOPSIGNAL SIGTERM
# Live, not ready: a draining node is healthy, it just takes no new work.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health/live', timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["orch8-supervisor"]
