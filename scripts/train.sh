#!/usr/bin/env bash
# Stage 2 of OSCAR: one LoRA UNet for all bit-rates, with train_diff.py.
#
#   bash scripts/train.sh [OPTIONS.json] [--set key=value ...] [--resume latest] [--stop-at STEP]
#
# Environment:
#   NUM_GPUS=N          N > 1: `accelerate launch --multi_gpu --num_processes N` (one node)
#   ACCELERATE=1        use `accelerate launch` (with your `accelerate config`, e.g. multi-node) even for one process
#   MAIN_PROCESS_PORT   passed as --main_process_port when set (several multi-GPU jobs on one machine)
# Otherwise it runs plain `python`. Relative paths in the option file are relative to the current folder.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPT="$ROOT/options/oscar/train_diff.json"
if [[ $# -gt 0 && "$1" != -* ]]; then
  OPT="$1"
  shift
fi

source "$ROOT/scripts/launcher.sh"
exec "${LAUNCH[@]}" "$ROOT/train_diff.py" --opt "$OPT" "$@"
