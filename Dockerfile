# One image for every peftlab service of docker-compose.yml: Ray head, Ray workers, the
# MLflow server and the dashboard.
#
# CPU (the default):
#   docker build -t peftlab:latest .
# GPU workers: torch's CUDA build from the PyTorch index that matches the hosts' driver,
# e.g. https://download.pytorch.org/whl/cu128. CUDA's runtime libraries come inside those
# wheels, so the slim Python base works on a GPU host (the NVIDIA Container Toolkit
# provides the driver). A CUDA base image also works if it has Python 3.11 as `python`,
# e.g. one built FROM nvidia/cuda:<version>-cudnn-runtime-ubuntu22.04 with python3.11 added:
#   docker build -t peftlab:gpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker build -t peftlab:gpu --build-arg BASE_IMAGE=my-cuda-python3.11 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# then set PEFTLAB_IMAGE=peftlab:gpu in .env.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from its own index: the project's torch range is then already satisfied and
# `pip install .` never replaces it with another build (a multi-GB CUDA one on a CPU image).
RUN python -m pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/peftlab
COPY pyproject.toml README.md ./
COPY platform platform
COPY workers workers
COPY dashboard dashboard
COPY sql sql
RUN python -m pip install .

# Services run unprivileged. /peftlab (PEFTLAB_HOME: Ray storage, adapters, Hugging Face
# cache) and /mlflow (MLflow's artifacts) are owned by that user in the image, so the empty
# named volumes mounted there start with the same owner.
RUN useradd --create-home --uid 1000 peftlab \
    && mkdir -p /peftlab /mlflow \
    && chown peftlab:peftlab /peftlab /mlflow
USER peftlab
WORKDIR /home/peftlab
ENV PEFTLAB_HOME=/peftlab \
    HF_HOME=/peftlab/huggingface
