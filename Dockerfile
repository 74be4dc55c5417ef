# syntax=docker/dockerfile:1
#
# idemproxy container image.
#
#   docker build -t idemproxy .
#   docker run --rm -p 8080:8080 -e UPSTREAM_URL=http://api.internal:8000 idemproxy
#
# The policy is /etc/idemproxy/policy.yaml ($IDEMPROXY_CONFIG); the image ships
# deploy/policy.yaml there. Mount your own file over it (read-only) to change the policy.
# Ports: 8080 the proxy, 9901 the admin listener (/healthz, /readyz, /metrics). The shipped policy
# keeps the admin listener on the container's loopback; to reach it from outside, set
# IDEMPROXY_ADMIN_LISTEN=0.0.0.0:9901 and IDEMPROXY_ADMIN_TOKEN (idemproxy refuses a non-loopback
# admin listener without a token).

# --- builder: the idemproxy wheel plus a wheel of every dependency ---------------------------
# Both stages must use the very same base: the builder resolves dependencies for its own Python
# (markers such as python_full_version < "3.11.3" pull async-timeout in or leave it out), and the
# runtime installs exactly those wheels without an index.
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is made of (see .dockerignore): a change to tests or docs does not
# invalidate this layer.
COPY pyproject.toml README.md constraints.txt ./
COPY idemproxy ./idemproxy
# aiohttp, uvloop, hiredis (redis[hiredis]) and msgspec come as prebuilt manylinux wheels, so
# neither stage needs a compiler. constraints.txt pins every dependency to the version CI tested.
# The otel extra comes along: `tracing.endpoint` (OpenTelemetry over OTLP/HTTP) works in the image.
RUN pip wheel --constraint constraints.txt --wheel-dir /wheels '.[otel]'

# --- runtime ----------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

LABEL org.opencontainers.image.title="idemproxy" \
      org.opencontainers.image.description="An idempotency-key reverse proxy" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    IDEMPROXY_CONFIG=/etc/idemproxy/policy.yaml

# Install every wheel the builder made: idemproxy and exactly the dependencies (with the otel
# extra's) the builder resolved (--no-index: nothing is fetched here; naming wheel files pins
# the versions, hadolint DL3013). The wheels are bind-mounted, so they never land in a layer.
# The import check fails the build if uvloop, hiredis or the OpenTelemetry SDK (idemproxy.otel
# imports it) did not come along.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index /wheels/*.whl \
    && python -c "import idemproxy, uvloop, hiredis, idemproxy.otel" \
    && groupadd --system --gid 10001 idemproxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin idemproxy

# Owned by root and read-only for the proxy's user: the process cannot rewrite its own policy.
COPY --chown=root:root --chmod=0644 deploy/policy.yaml /etc/idemproxy/policy.yaml

# Numeric, so that Kubernetes' runAsNonRoot can verify it without looking up a name.
USER 10001:10001

EXPOSE 8080 9901

# The image has no curl: ask the admin listener with Python's standard library. urlopen raises
# (exit 1) on a refused connection, a timeout or a non-2xx answer. It runs inside the container,
# so 127.0.0.1 reaches the admin listener on its default 127.0.0.1:9901 and on 0.0.0.0:9901.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]

# SIGTERM (docker stop, Kubernetes) drains in-flight requests for up to shutdown_timeout, then
# exits 0. The exec form makes idemproxy PID 1, so it receives the signal itself.
ENTRYPOINT ["idemproxy"]
CMD ["run"]
