# mergeflow worker image: a Prefect process worker with mergeflow installed.
#   docker build -f infra/worker.Dockerfile -t mergeflow-worker .                (GPU: CUDA base)
#   docker build -f infra/worker.Dockerfile --build-arg BASE=ubuntu:24.04 -t mergeflow-worker:cpu .
# The same image serves the cpu and gpu pools; the gpu pool's containers get GPUs from the
# NVIDIA container toolkit (compose: deploy.resources; Kubernetes: nvidia.com/gpu).
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}

ARG MERGEFLOW_CODE_VERSION=unknown
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    AWS_EC2_METADATA_DISABLED=true \
    MERGEFLOW_HOME=/opt/mergeflow \
    MERGEFLOW_CACHE_DIR=/var/cache/mergeflow \
    MERGEFLOW_CODE_VERSION=${MERGEFLOW_CODE_VERSION} \
    PATH=/opt/venv/bin:${PATH}

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/mergeflow
# dependencies first (a layer that changes only with the pins), torch from PyPI's CUDA wheels
COPY requirements.txt constraints.txt pyproject.toml ./
RUN pip install --upgrade pip \
 && pip install torch==2.14.1 torchvision==0.29.1 \
 && grep -v -e '^torch' -e '^fusion-bench' -e '^omegaconf' -e '^pytest' -e '^hypothesis' \
        -e '^ruff' -e '^moto' requirements.txt > /tmp/runtime-requirements.txt \
 && pip install -r /tmp/runtime-requirements.txt psycopg2-binary

COPY mergeflow ./mergeflow
COPY flows ./flows
COPY tasks ./tasks
COPY infra/setup_prefect.py ./infra/setup_prefect.py
COPY prefect.yaml README.md ./
RUN pip install --no-deps -e . \
 && useradd --create-home --uid 10001 mergeflow \
 && mkdir -p /var/cache/mergeflow && chown mergeflow /var/cache/mergeflow
USER mergeflow

# the pool comes from the command: `prefect worker start --pool cpu` or `--pool gpu`
CMD ["prefect", "worker", "start", "--pool", "cpu"]
