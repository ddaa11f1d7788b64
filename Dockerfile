# syntax=docker/dockerfile:1
#
# One image for every docflow role:
#   docker run docflow:0.1.0 worker --role web|chunker|embedder|indexer
# The Kafka broker, MinIO, Milvus and Prometheus are separate containers
# (docker-compose.yml): there is no Java in this image.
#
# Build arguments:
#   DOCFLOW_EXTRAS  pip extras of the project, comma-separated (default: local = the
#                   all-MiniLM-L6-v2 backend on ONNX Runtime: no PyTorch, about 100 MB).
#                   An empty value gives a slimmer image for the openai/hashing backends;
#                   local,ocr adds the offline OCR engine (RapidOCR, about 200 MB) for
#                   DOCFLOW_OCR=local.

# An exact release, so a rebuild gets the same Python and Debian (bump it on purpose).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# --------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ARG DOCFLOW_EXTRAS=local

# pip compiles the installed modules to bytecode here, so workers start faster and
# never need to write .pyc files into the (root-owned) venv at run time.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3013
RUN pip install --no-cache-dir --upgrade pip setuptools wheel

WORKDIR /src

# Dependencies in their own layer: it is rebuilt only when the package metadata changes.
# setup.cfg reads the version from pipeline/__init__.py and the long description from
# README.md, so those come along; the rest of the source is not needed yet.
COPY pyproject.toml setup.cfg README.md ./
COPY pipeline/__init__.py pipeline/__init__.py
# hadolint ignore=DL3013
RUN if [ -n "${DOCFLOW_EXTRAS}" ]; then spec=".[${DOCFLOW_EXTRAS}]"; else spec="."; fi; \
    pip install --no-cache-dir "${spec}"

# The project itself (the packages setup.cfg installs), without touching the dependencies.
COPY pipeline/ pipeline/
COPY agents/ agents/
COPY tables/ tables/
COPY web/ web/
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
    && docflow --help > /dev/null

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="docflow" \
      org.opencontainers.image.description="Streaming document ingestion on Kafka and Faust: web, chunker, embedder and indexer roles" \
      org.opencontainers.image.licenses="Apache-2.0"

# Every native dependency (rocksdict, pypdfium2, onnxruntime, numpy, lxml, aiokafka, grpcio)
# ships manylinux wheels with its libraries bundled: the slim base is all they need.
RUN groupadd --system --gid 10001 docflow \
    && useradd --system --uid 10001 --gid docflow --home-dir /home/docflow --create-home \
        --shell /usr/sbin/nologin docflow \
    && mkdir -p /var/lib/docflow \
    && chown docflow:docflow /var/lib/docflow

COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/docflow-entrypoint

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DOCFLOW_HOME=/var/lib/docflow \
    DOCFLOW_WEB_HOST=0.0.0.0 \
    DOCFLOW_WEB_PORT=6066 \
    HF_HOME=/var/lib/docflow/huggingface \
    HF_HUB_OFFLINE=1

WORKDIR /app
# Numeric, so runtimes that check runAsNonRoot can verify it: the docflow user above.
USER 10001:10001

# RocksDB tables (the web role's status table) and, on file:// storage, the objects.
VOLUME ["/var/lib/docflow"]

# /health and /metrics on every role; the API on the web role.
EXPOSE 6066

# /health answers 200 only when the worker is live and ready (broker reachable, table
# recovered); urllib raises on any other status. No curl in the slim image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('DOCFLOW_WEB_PORT', '6066'), timeout=4)"]

ENTRYPOINT ["docflow-entrypoint"]
CMD ["worker", "--role", "web"]
