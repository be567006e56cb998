# syntax=docker/dockerfile:1
# The trainer on a GPU base: TensorFlow's own CUDA image (CUDA, cuDNN and the TensorFlow version the project
# pins, on Python 3.11). Build from the repository root:
#   docker build -f deploy/docker/trainer.Dockerfile -t quickdraw-trainer:0.1.0 .
# Run on a GPU node with the data and the model volume mounted, e.g.
#   docker run --gpus all -v /data/quickdraw:/data -v /models:/models quickdraw-trainer:0.1.0 \
#     train --data /data --arch qdnet --out /models/quickdraw
# Multi-worker training: the same image on every worker with its own TF_CONFIG (README: Distributed training).
ARG TF_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${TF_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY doodle/ doodle/
COPY quickdraw/ quickdraw/
COPY service/ service/
COPY trainer/ trainer/
COPY loadtest/ loadtest/
# tensorflow==2.21.* is already in the base image, so pip keeps its CUDA build and adds the rest.
RUN pip install . \
 && groupadd --gid 10001 quickdraw \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin quickdraw
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["quickdraw"]
CMD ["train", "--help"]
