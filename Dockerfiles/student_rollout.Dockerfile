# syntax=docker/dockerfile:1
# OPD student rollout service on GPU: vLLM's official OpenAI image (CUDA, torch and vLLM
# preinstalled) with the `opd` package on top; serves `opd rollout` (sampling with logprobs and
# weight updates, FastAPI over vLLM's AsyncLLM) on :8002. Weight updates by path must lie
# inside OPD_WEIGHTS_DIR (a volume shared with the trainer).
#   docker build -f Dockerfiles/student_rollout.Dockerfile -t opd-student-rollout .
#   docker run --gpus '"device=2"' -e OPD_MODEL=Qwen/Qwen2.5-1.5B-Instruct \
#     -e OPD_WEIGHTS_DIR=/shared/weights -v opd-shared:/shared -p 8002:8002 opd-student-rollout
# Settings are flags or OPD_* env (OPD_MODEL, OPD_WEIGHTS_DIR, OPD_MAX_MODEL_LEN,
# OPD_GPU_MEMORY_UTILIZATION, OPD_API_KEY, ...); see docs/deploy.md.
FROM vllm/vllm-openai:v0.32.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HF_HOME=/cache/huggingface \
    OPD_HOST=0.0.0.0 \
    OPD_PORT=8002 \
    OPD_BACKEND=vllm

WORKDIR /opt/opd

# Dependencies first (rebuilt only when pyproject.toml changes). The image's own torch, vLLM,
# transformers and triton are pinned as constraints so nothing here replaces them.
COPY pyproject.toml ./
RUN python3 -m pip freeze | grep -iE '^(torch|vllm|transformers|triton|numpy)==' > /tmp/constraints.txt \
    && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && python3 -m pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm -f /tmp/requirements.txt /tmp/constraints.txt

# The project itself (small, changes often: last).
COPY README.md ./
COPY opd ./opd
COPY services ./services
COPY trainer ./trainer
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin opd \
    && mkdir -p /cache/huggingface /shared/weights \
    && chown -R opd:opd /cache /shared

USER 10001:10001
EXPOSE 8002

# /ready answers 200 once the model is loaded (503 before); first start downloads the model.
HEALTHCHECK --interval=15s --timeout=10s --start-period=20m --retries=5 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('OPD_PORT', '8002') + '/ready', timeout=8)"]

ENTRYPOINT ["opd", "rollout"]
CMD []
