# Sourced by the training wrappers: sets LAUNCH to the command that starts a training script.
#   NUM_GPUS=N (N > 1)   accelerate launch --multi_gpu --num_processes N (one node)
#   ACCELERATE=1         accelerate launch (with your `accelerate config`, e.g. multi-node) even for one process
#   MAIN_PROCESS_PORT    passed as --main_process_port when set (several multi-GPU jobs on one machine)
# Otherwise plain python.
NUM_GPUS="${NUM_GPUS:-1}"
if [[ "${ACCELERATE:-0}" == 1 || "$NUM_GPUS" -gt 1 ]]; then
  LAUNCH=(accelerate launch --num_processes "$NUM_GPUS")
  if [[ "$NUM_GPUS" -gt 1 ]]; then LAUNCH+=(--multi_gpu); fi
  if [[ -n "${MAIN_PROCESS_PORT:-}" ]]; then LAUNCH+=(--main_process_port "$MAIN_PROCESS_PORT"); fi
else
  LAUNCH=(python)
fi
