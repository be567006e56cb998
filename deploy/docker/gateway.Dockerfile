# syntax=docker/dockerfile:1
# The slim gRPC gateway: `quickdraw serve --backend tfserving` (the Kubernetes gateway Deployment and
# docker-compose run it), `quickdraw classify`, and `quickdraw loadtest` (the in-cluster load-test Job).
# Build from the repository root (the .dockerignore there lets in only what the image needs):
#   docker build -f deploy/docker/gateway.Dockerfile -t quickdraw-gateway:0.1.0 .
#
# Slim: the base install of pyproject.toml, no extras, so no TensorFlow (the embedded backend and the trainer
# are in deploy/docker/full.Dockerfile). It adds about 127 MB to its base (deploy/README.md: Images;
# `make image-test` asserts < 200 MB). The project goes into a virtualenv in a build stage and only that
# virtualenv is copied into the runtime stage (no pip, no pip cache, no build tools, no sources).
# Non-root: uid/gid 10001, no shell. The root filesystem can be mounted read-only (deploy/k8s mounts an
# emptyDir on /tmp, where HOME points).
# The shipped model (models/quickdraw, ~2 MB) comes along at /models/quickdraw: the gateway reads only its labels
# (the model runs in TF Serving). Mounting a model volume on /models (docker-compose.yml, the gpu overlay)
# replaces it; deploy/k8s/overlays/cpu copies it into TF Serving's model volume.
# Any Debian-based Python 3.11 image with python3-venv works as PYTHON_IMAGE (`make images` builds one with
# debootstrap).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
# The client distribution the project depends on (quickdraw-client: the generated quickdraw.v1 code, the client).
COPY clients/python/ clients/python/
COPY doodle/ doodle/
COPY quickdraw/ quickdraw/
COPY service/ service/
COPY trainer/ trainer/
COPY loadtest/ loadtest/
# The base install only: no extras. The pip cache is a build cache mount, never a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install ./clients/python . \
 && /opt/venv/bin/pip uninstall --yes pip \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 quickdraw \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin quickdraw
COPY --from=build /opt/venv /opt/venv
COPY models/quickdraw/ /models/quickdraw/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    QUICKDRAW_BACKEND=tfserving \
    QUICKDRAW_MODEL_DIR=/models/quickdraw
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051 8080
ENTRYPOINT ["quickdraw"]
CMD ["serve"]
