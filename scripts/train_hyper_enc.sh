#!/usr/bin/env bash
# Stage 1 of OSCAR: train hyper-encoders (one run per bit-rate) with train_hyper_enc.py.
#
#   bash scripts/train_hyper_enc.sh [OPTIONS.json] [--set key=value ...] [--resume latest]
#
# Environment:
#   ALL_LEVELS=1        one run per level of the default multi-rate model (0.0019 ... 0.1250 bpp), one after the
#                       other, each with --set bpp=<bpp> --set name=${NAME_PREFIX:-hyper_enc}_<bpp>
#   LEVELS="a b"        with ALL_LEVELS=1, these bpp labels instead of the default eight
#   NUM_GPUS=N          N > 1: `accelerate launch --multi_gpu --num_processes N` (one node)
#   ACCELERATE=1        use `accelerate launch` (with your `accelerate config`) even for one process
#   MAIN_PROCESS_PORT   passed as --main_process_port when set (run several multi-GPU jobs on one machine)
# Otherwise it runs plain `python`. Extra arguments go to every run; --resume latest makes a re-run of the whole
# sweep continue interrupted levels (and only re-save finished ones).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPT="$ROOT/options/oscar/train_hyper_enc.json"
if [[ $# -gt 0 && "$1" != -* ]]; then
  OPT="$1"
  shift
fi

source "$ROOT/scripts/launcher.sh"

if [[ "${ALL_LEVELS:-0}" == 1 ]]; then
  if [[ -z "${LEVELS:-}" ]]; then
    LEVELS="$(python -c 'from models.rate_table import DEFAULT_LEVEL_BPPS as L; print(" ".join(f"{b:.4f}" for b in L))')"
  fi
  for bpp in $LEVELS; do
    echo "=== hyper-encoder for $bpp bpp ===" >&2
    # The per-level keys come last so that they win over any --set in the extra arguments.
    "${LAUNCH[@]}" "$ROOT/train_hyper_enc.py" --opt "$OPT" "$@" \
      --set "bpp=$bpp" --set "name=${NAME_PREFIX:-hyper_enc}_$bpp"
  done
else
  exec "${LAUNCH[@]}" "$ROOT/train_hyper_enc.py" --opt "$OPT" "$@"
fi
