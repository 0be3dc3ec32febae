"""What a training script does around the loop: its command line, logging set-up, start and end.

:func:`add_training_arguments` (``--resume``, ``--stop-at``), :func:`configure_logging`, :func:`start_or_resume`
(restore a checkpoint, record the options, start the trackers), :func:`log_training_summary` (with
:func:`epochs_for`) and :func:`finish_run` (end the trackers; exit status 130 after an interruption).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

from utils.training.accelerator import init_trackers
from utils.training.checkpoints import CheckpointManager, TrainState
from utils.training.loop import LoopResult
from utils.training.run_dir import RunDir, write_run_options

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C


def _positive_step(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a step >= 1, got {value}")
    return value


def add_training_arguments(parser: Any) -> None:
    """``--resume`` and ``--stop-at``, shared by both training stages."""
    parser.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="continue from the newest checkpoint of this run (a new run when there is none) or from a checkpoint folder",
    )
    parser.add_argument(
        "--stop-at",
        type=_positive_step,
        metavar="STEP",
        help="save a checkpoint and stop once STEP optimizer steps are done (e.g. to fit a job time limit); "
        "--resume latest continues exactly as if the run had not stopped",
    )



def configure_logging(script: str) -> None:
    """Our messages at INFO; libraries (accelerate's per-file checkpoint chatter) at WARNING."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    for name in (script, "utils"):
        logging.getLogger(name).setLevel(logging.INFO)


def start_or_resume(
    accelerator: Any, run: RunDir, options: Any, checkpoints: CheckpointManager, resume_from: Path | None
) -> TrainState:
    """Restore ``resume_from`` (if any), write the resolved options and start the trackers; the state to start from."""
    state = TrainState()
    if resume_from is not None:
        state = checkpoints.load(resume_from)
        log.info("resuming from %s (step %d, epoch %d)", resume_from, state.step, state.epoch)
    write_run_options(accelerator, options, run)
    init_trackers(accelerator, run.root.name, options, resume_step=state.step)
    return state


def log_training_summary(
    accelerator: Any,
    *,
    num_examples: int,
    batch_size: int,
    max_steps: int,
    trainable_parameters: int,
    start_step: int = 0,
    **extra: Any,
) -> None:
    """The "***** Running training *****" block of diffusers' examples, on the main process."""
    if not accelerator.is_main_process:
        return
    total_batch = batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps
    lines = [
        "***** Running training *****",
        f"  Num examples = {num_examples}",
        f"  Instantaneous batch size per device = {batch_size}",
        f"  Num processes = {accelerator.num_processes} "
        f"({accelerator.device}, mixed precision {accelerator.mixed_precision})",
        f"  Gradient accumulation steps = {accelerator.gradient_accumulation_steps}",
        f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch}",
        f"  Total optimization steps = {max_steps}" + (f" (resuming at step {start_step})" if start_step else ""),
        f"  Trainable parameters = {trainable_parameters:,}",
    ]
    lines += [f"  {key} = {value}" for key, value in extra.items()]
    log.info("\n".join(lines))


def epochs_for(max_steps: int, dataset_len: int, global_batch: int, accumulation: int) -> int:
    """Roughly how many epochs ``max_steps`` optimizer steps take (for the summary)."""
    per_epoch = max(1, math.ceil(max(1, dataset_len // global_batch) / accumulation))
    return math.ceil(max_steps / per_epoch)


def finish_run(accelerator: Any, result: LoopResult) -> None:
    """End the trackers; an interrupted run exits with status 130 after saying how to continue."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if result.status == "interrupted":
        if accelerator.is_main_process:
            print(
                f"interrupted at step {result.state.step}; checkpoint {result.checkpoint}; continue with --resume latest",
                file=sys.stderr,
            )
        raise SystemExit(EXIT_INTERRUPTED)
    if result.status == "stopped" and accelerator.is_main_process:
        log.info("stopped at step %d; checkpoint %s", result.state.step, result.checkpoint)
