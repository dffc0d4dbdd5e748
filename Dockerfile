# syntax=docker/dockerfile:1
# cifar-serve: the inference API and its training-job runner, one image for `docker compose up`.
#
# Base image: python:3.11-slim, not nvidia/cuda:*-runtime. torch's default Linux x86_64 wheels on PyPI
# (2.14.1 is a CUDA 13.0 build) bring the CUDA runtime, cuBLAS, cuDNN and NCCL as nvidia-* wheels in
# site-packages and load those, never a system CUDA. The one GPU piece a container needs from outside is
# the driver (libcuda.so, nvidia-smi), and the NVIDIA Container Toolkit mounts the host's driver into any
# container that reserves a GPU. A CUDA runtime base would add gigabytes of libraries torch never loads,
# and a second CUDA version to keep in step with torch's. What the host needs: an NVIDIA driver new
# enough for CUDA 13.0 (the R580 branch or newer) and the NVIDIA Container Toolkit.
# Python 3.11: the version CI tests the project on.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# Set to a PyTorch wheel index (docker-compose.cpu.yml sets the CPU-only one) to build a smaller image
# without the CUDA libraries; empty means PyPI's default, CUDA-enabled wheels.
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# The dependencies first, read from pyproject.toml alone, so that editing the source reuses this layer
# instead of downloading torch and the CUDA wheels again; the cache mount keeps the downloads between builds.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > requirements.txt \
    && pip install -r requirements.txt
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps .
# COPY keeps each file's mode from the working copy, and safetensors writes model.safetensors as 0600, so a
# checkpoint that `python -m training` wrote and that was copied into weights/ would reach the image
# readable by root alone, and the service (UID 10001) would start without a model. Readable by everyone
# here, so the runtime stage copies it from this stage whatever the modes in the working copy were.
RUN chmod -R u=rwX,go=rX weights

FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/app \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    APP_SHIPPED_WEIGHTS=/app/weights \
    APP_EXAMPLES_DIR=/app/examples \
    APP_STATE_DIR=/var/lib/cifar-serve/state \
    APP_REGISTRY_DIR=/var/lib/cifar-serve/registry \
    APP_DATA_DIR=/var/lib/cifar-serve/data
# A C/C++ compiler, for training jobs with {"compile": true}: torch.compile's Triton backend builds its GPU
# launcher with cc, and Inductor on the CPU compiles C++. About 200 MB beside torch's gigabytes; pinned to
# the Debian release of the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*
# A fixed UID, so that bind mounts can be chowned to it on the host (chown -R 10001:10001 DIR), with a
# home (HOME above) for the caches matplotlib, Triton and torch write while training. The volume
# mount points exist in the image owned by that user: Docker initialises a new named volume from them,
# so the service can write its state, registry and data without running as root.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /var/lib/cifar-serve/state /var/lib/cifar-serve/registry /var/lib/cifar-serve/data \
    && chown -R app:app /var/lib/cifar-serve
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# The shipped checkpoint (weights/README.md), made readable in the builder; owned by root, so the service
# cannot change it.
COPY --from=builder /src/weights/ weights/
# The example images the web page offers (APP_EXAMPLES_DIR below).
COPY examples/ examples/
# Numeric, so that a runtime (Kubernetes' runAsNonRoot, for one) can tell it is not root without /etc/passwd.
USER 10001:10001
# HTTP, and KServe v2 over gRPC (APP_GRPC_PORT); the control plane (python -m app.control) listens on 8001.
EXPOSE 8000 8081 8001
# python rather than curl: the slim image has no curl, and urlopen fails on anything but a 2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
# The README's start command; 0.0.0.0 so that the published port reaches it from outside the container.
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]
