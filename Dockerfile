# syntax=docker/dockerfile:1
# Stable Cascade inference server: one container = one uvicorn process = one GPU.
#
#   docker build -t cascade-serve .
#   docker run --gpus '"device=0"' -p 8000:8000 \
#       -v /srv/stable-cascade:/weights:ro cascade-serve
#
# Weights are never part of the image: mount a Hugging Face snapshot of Stable Cascade read-only at
# /weights (see docs/deploy.md). CUDA 13.0 user-space libraries need an NVIDIA driver >= 580 on the host.

# The CUDA version of the base image and the torch index below must agree (13.0 <-> cu130);
# tests/deploy/test_dockerfile.py checks that they do. For a driver older than 580 (525 and later),
# build the CUDA 12.6 line instead (docs/deploy.md, "CUDA builds and drivers"):
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t cascade-serve .
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------
# Build stage: a virtual environment with the CUDA build of torch and the project. Nothing from this
# stage but /opt/venv reaches the final image (no pip cache, no build metadata).
FROM ${CUDA_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu's archive replaces package versions on every security update, so exact apt pins would make
# the image unbuildable within weeks; the pinned base image is what fixes the distribution.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY models/ models/
COPY service/ service/
# torch is already satisfied, so this adds only the project and its pure-Python dependencies.
# hadolint ignore=DL3013
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -c "import torch; assert torch.version.cuda, 'torch is not a CUDA build'"

# ---------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}

# tini is PID 1: it forwards SIGTERM to the server (which then drains) and reaps any zombies.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 cascade \
    && useradd --system --uid 10001 --gid cascade --create-home --home-dir /home/cascade cascade \
    && mkdir -p /weights

COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /usr/local/bin/cascade-healthcheck

# Production defaults; every CASCADE_* setting can be overridden at `docker run` / compose / k8s level.
# CASCADE_DEVICE=cuda: the container sees only the GPU it was given, as cuda:0.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    CASCADE_HOST=0.0.0.0 \
    CASCADE_PORT=8000 \
    CASCADE_WEIGHTS_DIR=/weights \
    CASCADE_DEVICE=cuda \
    CASCADE_DRAIN_TIMEOUT_S=30

# Numeric, so that Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/cascade
EXPOSE 8000

# Ready = weights loaded, warm-up done, not draining. Loading big weights takes minutes: the start
# period keeps a loading container from being counted unhealthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/usr/local/bin/cascade-healthcheck", "/health/ready"]

# SIGTERM starts the drain: readiness flips to 503, queued and running jobs get CASCADE_DRAIN_TIMEOUT_S
# to finish, then the process exits. Give the container longer than that to stop
# (docker stop -t / compose stop_grace_period / k8s terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "service"]
