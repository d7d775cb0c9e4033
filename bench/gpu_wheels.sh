#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh's `opd train` step needs on a GPU machine that has PyTorch,
# Triton, transformers, tokenizers, safetensors, httpx and prometheus-client but no registry
# access: the services' web stack (fastapi, uvicorn, pydantic), the trainer's config and
# grading packages. Run here (with PyPI), then carry `.whl/` to the machine; gpu_check.sh
# installs whatever it finds there into /tmp/site first. Pure-Python wheels, plus
# pydantic-core for CPython 3.12 on manylinux x86_64 (PYTHON_VERSION / PLATFORMS to change).
# About 5 MB in all.
#
# Usage: bash bench/gpu_wheels.sh            (into .whl/, which git ignores)
set -eu
cd "$(dirname "$0")/.."
DEST="${DEST:-.whl}"
PY="${PYTHON:-python3}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PLATFORMS="${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}"
mkdir -p "$DEST"
platform_args=()
for p in $PLATFORMS; do platform_args+=(--platform "$p"); done
# One version of each, no dependencies resolved by pip (the machine's own packages stay):
# fastapi -> starlette, annotated-doc; pydantic -> pydantic-core, annotated-types,
# typing-inspection; pydantic-settings -> python-dotenv; datasets -> dill, multiprocess;
# math-verify -> latex2sympy2_extended -> antlr4-python3-runtime. Versions are the ones the
# project's .venv runs (so pydantic and pydantic-core match), where it exists.
NAMES="fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection
pydantic-settings python-dotenv tenacity datasets dill multiprocess math-verify
latex2sympy2_extended antlr4-python3-runtime"
VENV_PY=.venv/bin/python
[ -x "$VENV_PY" ] || VENV_PY="$PY"
# shellcheck disable=SC2086
mapfile -t SPECS < <("$VENV_PY" - $NAMES <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PYEOF
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp "${platform_args[@]}" -d "$DEST" "${SPECS[@]}"
du -sh "$DEST"
ls "$DEST"
