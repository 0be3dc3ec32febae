#!/usr/bin/env bash
# Evaluate an exported model with test.py (real files at every level; metrics, CSV/JSON, RD plots).
#
#   bash scripts/test.sh [OPTIONS.json] [--set key=value ...]
#   bash scripts/test.sh --set model_dir=runs/oscar/final --set 'datasets=["datasets/kodak"]'
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPT="$ROOT/options/test.json"
if [[ $# -gt 0 && "$1" != -* ]]; then
  OPT="$1"
  shift
fi
exec python "$ROOT/test.py" --opt "$OPT" "$@"
