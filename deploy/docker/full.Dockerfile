# syntax=docker/dockerfile:1
# The full image: the project with its `tf` extra (TensorFlow, tensorflow-serving-api, TensorBoard, matplotlib)
# for the embedded backend (`quickdraw serve --backend embedded`: the model in-process, no TF Serving) and the
# trainer (`quickdraw train`, `evaluate`, `predict`). Build from the repository root:
#   docker build -f deploy/docker/full.Dockerfile -t quickdraw-full:0.1.0 .
# On GPU nodes add TensorFlow's CUDA libraries from PyPI (pip's nvidia-* wheels; the node needs only the driver):
#   docker build -f deploy/docker/full.Dockerfile --build-arg EXTRAS=tf,gpu -t quickdraw-full:0.1.0-gpu .
#   docker run --gpus all -v /data/quickdraw:/data -v /models:/models quickdraw-full:0.1.0-gpu \
#     train --data /data --arch qdnet --out /models/quickdraw
# Multi-worker training: the same image on every worker with its own TF_CONFIG (README: Distributed training).
#
# About 2.2 GB on top of PYTHON_IMAGE, 1.84 GB of it TensorFlow (deploy/README.md: Images); the gateway that
# Kubernetes runs in front of TF Serving is the slim gateway.Dockerfile. Same layout as that image: a
# virtualenv built in one stage and copied alone, non-root uid/gid 10001, the shipped model at /models/quickdraw.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=tf
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
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install ./clients/python ".[${EXTRAS}]" \
 && /opt/venv/bin/pip uninstall --yes pip \
 && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 quickdraw \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/quickdraw --shell /usr/sbin/nologin quickdraw
COPY --from=build /opt/venv /opt/venv
COPY models/quickdraw/ /models/quickdraw/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLCONFIGDIR=/tmp/matplotlib \
    QUICKDRAW_BACKEND=embedded \
    QUICKDRAW_MODEL_DIR=/models/quickdraw
WORKDIR /home/quickdraw
USER 10001:10001
EXPOSE 50051 8080
ENTRYPOINT ["quickdraw"]
CMD ["serve"]
