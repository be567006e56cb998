# The gateway image: slim, non-root. Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t quickdraw-gateway .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY doodle/ doodle/
COPY quickdraw/ quickdraw/
COPY service/ service/
COPY trainer/ trainer/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim
COPY --from=build /opt/venv /opt/venv
# The shipped model: the embedded backend serves it; the tfserving backend reads only its labels.
COPY models/ /models/
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin quickdraw
USER 10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    QUICKDRAW_MODEL_DIR=/models/quickdraw
EXPOSE 50051 8080
ENTRYPOINT ["quickdraw", "serve"]
