# syntax=docker/dockerfile:1
# OPD trainer on GPU: the official PyTorch CUDA runtime image with the `opd` package on top.
# One GPU: `opd train CONFIG.yaml key=value ...`; several: torchrun + FSDP2:
#   torchrun --standalone --nproc-per-node 4 -m trainer examples/opd_gsm8k/opd_gsm8k.yaml ...
# Prometheus metrics on :8003/metrics (rank 0). See docs/deploy.md.
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HOME=/cache/huggingface \
    # only read by the HEALTHCHECK below; the trainer's own port is logging.metrics_port
    OPD_TRAINER_METRICS_PORT=8003

WORKDIR /opt/opd

# Dependencies first (rebuilt only when pyproject.toml changes); the image's torch is kept.
COPY pyproject.toml ./
RUN python -m pip freeze | grep -iE '^(torch|triton|numpy)==' > /tmp/constraints.txt \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && python -m pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm -f /tmp/requirements.txt /tmp/constraints.txt

COPY README.md ./
COPY opd ./opd
COPY services ./services
COPY trainer ./trainer
COPY examples ./examples
RUN python -m pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin opd \
    && mkdir -p /cache/huggingface /shared/weights /shared/runs \
    && chown -R opd:opd /cache /shared /opt/opd

USER 10001:10001
EXPOSE 8003

# The metrics endpoint is up once the run has started (model loaded, services ready).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OPD_TRAINER_METRICS_PORT', '8003') + '/metrics', timeout=8)"]

CMD ["opd", "train", "examples/opd_gsm8k/opd_gsm8k.yaml"]
