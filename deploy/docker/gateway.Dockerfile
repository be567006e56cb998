# syntax=docker/dockerfile:1
# The gRPC gateway: `quickdraw serve` (also `quickdraw loadtest`, for the in-cluster load test). Build from the
# repository root (the .dockerignore there lets in only what the image needs):
#   docker build -f deploy/docker/gateway.Dockerfile -t quickdraw-gateway:0.1.0 .
#
# Slim: python:3.11-slim, the project installed into a virtualenv in a build stage and only that virtualenv
# copied into the runtime stage (no pip cache, no build tools, no sources beyond the installed package).
# Non-root: uid/gid 10001, no shell. The root filesystem can be mounted read-only (deploy/k8s mounts an
# emptyDir on /tmp, where HOME points).
# The shipped model (models/quickdraw, ~2 MB) comes along at /models/quickdraw: the embedded backend serves it;
# the tfserving backend reads only its labels. Mounting a model volume on /models (docker-compose.yml, the
# gpu overlay) replaces it; deploy/k8s/overlays/cpu copies it into TF Serving's model volume.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY doodle/ doodle/
COPY quickdraw/ quickdraw/
COPY service/ service/
COPY trainer/ trainer/
COPY loadtest/ loadtest/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install . \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 quickdraw \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin quickdraw
COPY --from=build /opt/venv /opt/venv
COPY models/quickdraw/ /models/quickdraw/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    QUICKDRAW_MODEL_DIR=/models/quickdraw
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051 8080
ENTRYPOINT ["quickdraw"]
CMD ["serve"]
