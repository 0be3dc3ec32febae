"""Training infrastructure shared by the training scripts (train_hyper_enc.py, train_diff.py), built on accelerate.

The training scripts are accelerate scripts in the style of diffusers' training examples: one
:class:`~accelerate.Accelerator` owns devices, mixed precision, gradient accumulation, trackers and checkpoints;
multi-GPU and multi-node runs go through ``accelerate launch`` only. This package holds everything that is not
specific to a method or a stage, so that a script reduces to "build the frozen and trainable parts, define one
training step, call :func:`run_training_loop`".

A new method's training script brings only its model, its losses, its options schema (with the train-loop and
optimizer fields read here, as in ``models/oscar/options.py``) and its batches (a dataset for
:func:`utils.data.make_dataloader`); everything else comes from here, one concept per module:

* :mod:`~utils.training.run_dir`: the run folder (:class:`RunDir`), ``<output_root>/<name>/`` with ``options.json``,
  ``checkpoints/checkpoint-<step>/``, ``logs/`` (tensorboard), ``validation/`` and ``final/``; the ``--resume``
  decision (:func:`resolve_resume`) and :class:`TrainingError`;
* :mod:`~utils.training.cli`: the script's command line (``--resume``, ``--stop-at``), logging set-up, start
  (:func:`start_or_resume`), summary and end (:func:`finish_run`);
* :mod:`~utils.training.accelerator`: :func:`make_accelerator` and :func:`init_trackers`;
* :mod:`~utils.training.optim`: :func:`build_optimizer`, :func:`build_lr_scheduler`, :func:`optimizer_step`
  (clipping, then optimizer and schedule), :func:`count_parameters`, :func:`enable_gradient_checkpointing`;
* :mod:`~utils.training.module_weights`: one module's weights as safetensors (full, or only the trainable tensors);
* :mod:`~utils.training.checkpoints`: checkpoints that resume bit-exactly (:class:`CheckpointManager`,
  :class:`TrainState`, :func:`register_checkpoint_modules`);
* :mod:`~utils.training.batches`: the data position (:class:`ResumableBatches`) and randomness that does not depend
  on the global RNG (:func:`derived_generator`), so a resumed run sees the batches and draws of an uninterrupted one;
* :mod:`~utils.training.loop`: :func:`run_training_loop`, which wraps the step in ``accelerator.accumulate``, counts
  optimizer steps, logs, validates, checkpoints and stops (also on Ctrl-C / SIGTERM: :class:`GracefulInterrupt`).

See train_hyper_enc.py for a complete, short example. The public names of the modules are re-exported here, so
``from utils.training import X`` works for each of them.
"""

from utils.training.accelerator import init_trackers, make_accelerator
from utils.training.batches import ResumableBatches, derived_generator
from utils.training.checkpoints import (
    STATE_FORMAT,
    CheckpointManager,
    ModuleCheckpoint,
    TrainState,
    register_checkpoint_modules,
)
from utils.training.cli import (
    EXIT_INTERRUPTED,
    add_training_arguments,
    configure_logging,
    epochs_for,
    finish_run,
    log_training_summary,
    start_or_resume,
)
from utils.training.loop import (
    GracefulInterrupt,
    LoopResult,
    StepFn,
    ValidateFn,
    read_metrics,
    run_training_loop,
)
from utils.training.module_weights import (
    PLAIN_WEIGHTS_NAME,
    TRAINABLE_WEIGHTS_NAME,
    load_module,
    load_trainable,
    save_module,
    save_trainable,
    trainable_state_dict,
)
from utils.training.optim import (
    build_lr_scheduler,
    build_optimizer,
    count_parameters,
    enable_gradient_checkpointing,
    optimizer_step,
)
from utils.training.run_dir import (
    CHECKPOINT_PREFIX,
    STATE_FILE,
    RunDir,
    TrainingError,
    list_checkpoints,
    resolve_resume,
    write_run_options,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "EXIT_INTERRUPTED",
    "PLAIN_WEIGHTS_NAME",
    "STATE_FILE",
    "STATE_FORMAT",
    "TRAINABLE_WEIGHTS_NAME",
    "CheckpointManager",
    "GracefulInterrupt",
    "LoopResult",
    "ModuleCheckpoint",
    "ResumableBatches",
    "RunDir",
    "StepFn",
    "TrainState",
    "TrainingError",
    "ValidateFn",
    "add_training_arguments",
    "build_lr_scheduler",
    "build_optimizer",
    "configure_logging",
    "count_parameters",
    "derived_generator",
    "enable_gradient_checkpointing",
    "epochs_for",
    "finish_run",
    "init_trackers",
    "list_checkpoints",
    "load_module",
    "load_trainable",
    "log_training_summary",
    "make_accelerator",
    "optimizer_step",
    "read_metrics",
    "register_checkpoint_modules",
    "resolve_resume",
    "run_training_loop",
    "save_module",
    "save_trainable",
    "start_or_resume",
    "trainable_state_dict",
    "write_run_options",
]
