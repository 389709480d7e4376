# syntax=docker/dockerfile:1
# slidecensus, CUDA image: the GPU workers (classification and training on an NVIDIA GPU).
# Build from the repository root (the context needs pyproject.toml, README.md, slidecensus/):
#   docker build -f deploy/docker/gpu.Dockerfile -t registry.example.com/slidecensus:0.1.0-cuda .
# torch's Linux wheels on PyPI are CUDA builds that carry the CUDA runtime libraries as
# wheels, so a slim Python base suffices; the node provides the NVIDIA driver.
# The base is pinned to a patch release; pin its digest too where builds must be repeatable.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /opt/slidecensus

RUN python -m pip install --no-cache-dir torch==2.13.0

COPY pyproject.toml README.md ./
COPY slidecensus ./slidecensus
RUN python -m pip install --no-cache-dir ".[s3,dashboard]" \
    && python -I -c "import slidecensus.cli, openslide, s3fs, torch, distributed, bokeh; print(openslide.__library_version__, torch.__version__)"

USER 10001:10001
WORKDIR /tmp
CMD ["slidecensus", "--help"]
