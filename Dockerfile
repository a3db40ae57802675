# dmr serve in a container, with llama-server built from llama.cpp's sources the way
# `dmr install-runner --from-source` builds it.
#
#   docker build -t dmr .                                 # CPU (the default)
#   docker build -t dmr:cuda --build-arg VARIANT=cuda .   # NVIDIA (run with --gpus all)
#   docker build -t dmr:vulkan --build-arg VARIANT=vulkan .  # Vulkan (AMD/Intel; pass /dev/dri)
#   docker run -d -p 12434:12434 -v dmr-models:/models dmr
#
# API keys: -e DMR_API_KEYS=key1,key2 (the healthcheck sends the first one). With a keys
# file (DMR_API_KEYS_FILE) instead, also set DMR_API_KEY for the healthcheck.

ARG VARIANT=cpu
# Debian 13: llama.cpp's Vulkan backend needs newer Vulkan headers than Debian 12's 1.3.239
# (it uses VK_EXT_layer_settings).
ARG DEBIAN_IMAGE=debian:trixie-slim
ARG CUDA_VERSION=12.6.3
ARG CUDA_BUILD_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04

# -- build bases: Python, CMake, a C++ compiler, and the variant's GPU SDK ---------------

FROM ${DEBIAN_IMAGE} AS build-base-cpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM build-base-cpu AS build-base-vulkan
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvulkan-dev glslc spirv-headers \
 && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_BUILD_IMAGE} AS build-base-cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# No GPU driver at build time: the toolkit's stub libcuda lets the freshly built
# llama-server start for `install-runner`'s `--version` check.
RUN ln -s libcuda.so /usr/local/cuda/lib64/stubs/libcuda.so.1
ENV LD_LIBRARY_PATH=/usr/local/cuda/lib64/stubs:${LD_LIBRARY_PATH}

# -- build: dmr into a venv, llama-server into the runner directory ----------------------

# hadolint ignore=DL3006
FROM build-base-${VARIANT} AS build
ARG VARIANT
# CMake reads this file first (CMAKE_TOOLCHAIN_FILE). install-runner builds with
# GGML_NATIVE=ON, right on the machine that runs it but wrong in an image: it would tune the
# binary for the build host's CPU (and, for CUDA, ask for a GPU the build cannot see). OFF
# gives ggml's portable baseline: AVX2 on x86-64, its default list of CUDA architectures.
ARG LLAMA_CMAKE_OVERRIDES="set(GGML_NATIVE OFF CACHE BOOL portable FORCE)"
ENV DMR_RUNNER_DIR=/opt/dmr/runners \
    DMR_BUILD_CACHE=/tmp/dmr-build \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dmr_cli ./dmr_cli
# Every dependency but llama-cpp-python: the image serves with the llama-server built
# below, so the embedded engine (a second llama.cpp build) would never run.
RUN python3 -m venv /opt/dmr/venv \
 && python3 -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if not d.startswith("llama-cpp-python")))' > /tmp/requirements.txt \
 && /opt/dmr/venv/bin/pip install -r /tmp/requirements.txt \
 && /opt/dmr/venv/bin/pip install --no-deps .
RUN printf '%s\n' "${LLAMA_CMAKE_OVERRIDES}" > /tmp/dmr-overrides.cmake \
 && CMAKE_TOOLCHAIN_FILE=/tmp/dmr-overrides.cmake \
    /opt/dmr/venv/bin/dmr install-runner --from-source --gpu "${VARIANT}" \
 && rm -rf "${DMR_BUILD_CACHE}" /tmp/dmr-overrides.cmake

# -- runtime bases: Python and the libraries llama-server loads ---------------------------

FROM ${DEBIAN_IMAGE} AS runtime-cpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM runtime-cpu AS runtime-vulkan
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvulkan1 mesa-vulkan-drivers \
 && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_RUNTIME_IMAGE} AS runtime-cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# -- the image ----------------------------------------------------------------------------

# hadolint ignore=DL3006
FROM runtime-${VARIANT}
ARG VARIANT
COPY --from=build /opt/dmr /opt/dmr
# A fixed numeric user (Kubernetes' runAsNonRoot can only verify a number); 10001 is free
# in every base (Ubuntu's images already use 1000). llama-server also goes on PATH, where
# dmr looks when the detected accelerator has no variant installed (a Vulkan image on a
# host without a Vulkan device then runs it on the CPU). The last line fails the build when
# llama-server needs a library this image lacks (the CUDA driver comes with the GPU).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN groupadd --gid 10001 dmr \
 && useradd --uid 10001 --gid dmr --create-home --shell /usr/sbin/nologin dmr \
 && mkdir -p /models \
 && chown dmr:dmr /models \
 && ln -s /opt/dmr/runners/"${VARIANT}"/bin/llama-server /usr/local/bin/llama-server \
 && test -x /usr/local/bin/llama-server \
 && ! ldd /usr/local/bin/llama-server | grep -v 'libcuda\.so' | grep 'not found'
ENV PATH=/opt/dmr/venv/bin:${PATH} \
    DMR_RUNNER_DIR=/opt/dmr/runners \
    MODELS_PATH=/models \
    MODEL_RUNNER_PORT=12434 \
    PYTHONUNBUFFERED=1
# The store: a named volume or a bind mount keeps pulled models across containers.
VOLUME ["/models"]
USER 10001:10001
WORKDIR /home/dmr
EXPOSE 12434
# GET / answers once the daemon serves (after start-up); a key goes along when one is set.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import http.client, os, sys; key = os.environ.get('DMR_API_KEY') or os.environ.get('DMR_API_KEYS', '').split(',')[0].strip(); conn = http.client.HTTPConnection('127.0.0.1', int(os.environ.get('MODEL_RUNNER_PORT') or 12434), timeout=4); conn.request('GET', '/', headers={'Authorization': 'Bearer ' + key} if key else {}); sys.exit(conn.getresponse().status != 200)"]
# tini reaps what the daemon's runners leave behind and passes signals on.
ENTRYPOINT ["tini", "--", "dmr"]
CMD ["serve", "--host", "0.0.0.0"]
