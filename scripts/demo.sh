#!/usr/bin/env bash
# The main job on a built-in default: the whole OSCAR pipeline on a tiny random-weight model, on CPU, in minutes.
# Set-up runs first (it does nothing when .venv is up to date). Outputs go to runs/demo/.
#
#   bash scripts/demo.sh [--stage1-steps N] [--stage2-steps N] [--device auto|cpu|cuda]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
VENV="${VENV:-$ROOT/.venv}"
exec "$VENV/bin/python" -m scripts.demo "$@"
