# syntax=docker/dockerfile:1
# slidecensus, CPU image: the Dask scheduler, CPU workers and the job that runs the census.
# Build from the repository root (the context needs pyproject.toml, README.md, slidecensus/):
#   docker build -f deploy/docker/cpu.Dockerfile -t registry.example.com/slidecensus:0.1.0 .
# The base is pinned to a patch release; pin its digest too where builds must be repeatable
# (docker buildx imagetools inspect python:3.11.11-slim-bookworm).
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/slidecensus

# torch first, from the CPU wheel index: an unpinned torch from PyPI pulls the CUDA libraries
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY slidecensus ./slidecensus
# OpenSlide comes with the openslide-bin wheel (a dependency); s3fs for s3:// outputs;
# bokeh for the Dask dashboard
RUN python -m pip install --no-cache-dir ".[s3,dashboard]" \
    && python -I -c "import slidecensus.cli, openslide, s3fs, torch, distributed, bokeh; print(openslide.__library_version__, torch.__version__)"

# pods run as this numeric user (runAsNonRoot needs a number); HOME and scratch live in /tmp
USER 10001:10001
WORKDIR /tmp
CMD ["slidecensus", "--help"]
