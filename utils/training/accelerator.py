"""The accelerate set-up of a training run: one seeded Accelerator and its trackers.

One :class:`~accelerate.Accelerator` owns devices, mixed precision, gradient accumulation, trackers and checkpoints;
multi-GPU and multi-node runs go through ``accelerate launch`` only, never through a device chosen here.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from utils.errors import OptionsError
from utils.training.run_dir import _flatten


def make_accelerator(
    train: Any, run_dir: str | os.PathLike[str], seed: int, *, device: str = "auto", find_unused_parameters: bool = False
) -> Any:
    """An Accelerator for ``train`` (a :class:`utils.option_sections.TrainLoopOptions`), seeded with ``seed``.

    Project folder ``run_dir``, tracker output in ``run_dir/logs``; ``mixed_precision`` and
    ``gradient_accumulation_steps`` from the options; ``log_with`` tensorboard, wandb (only when installed: a clear
    error otherwise) or none. Accelerate picks the device (CUDA when present, else CPU); ``device="cpu"`` forces the
    CPU. Several GPUs or nodes: start the script with ``accelerate launch``, never by choosing a device here.

    Accelerate keeps process-wide singletons; they are reset first (the process group, if any, is kept), so ``main``
    can run several times in one process (tests, notebooks) with different precision or accumulation settings.

    ``find_unused_parameters``: for models of which a step uses only a part (stage 2 trains one level's
    hyper-encoder per step); DDP then tolerates parameters without gradients.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, set_seed

    if device not in ("auto", "cpu", "cuda"):
        raise OptionsError(
            f"runtime.device={device!r}: training takes auto, cpu or cuda; choose GPUs with CUDA_VISIBLE_DEVICES "
            f"or `accelerate launch --gpu_ids`, not with a device index"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionsError("runtime.device='cuda': CUDA is not available on this machine; use auto or cpu")
    log_with = train.log_with
    if log_with == "wandb" and importlib.util.find_spec("wandb") is None:
        raise OptionsError("train.log_with='wandb': the wandb package is not installed (pip install wandb), "
                           "or use tensorboard or none")
    if log_with == "tensorboard" and importlib.util.find_spec("tensorboard") is None and (
        importlib.util.find_spec("tensorboardX") is None
    ):
        raise OptionsError("train.log_with='tensorboard': tensorboard is not installed (pip install tensorboard), "
                           "or use none")
    run_dir = Path(run_dir)
    # Under torchrun / accelerate launch without CUDA, accelerate only sets up multi-process CPU training (gloo)
    # when told cpu=True; otherwise every process would believe it is the only one.
    force_cpu = device == "cpu" or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_with=None if log_with == "none" else log_with,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        cpu=force_cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else None,
    )
    set_seed(seed)
    return accelerator


def init_trackers(accelerator: Any, project_name: str, options: Any, resume_step: int = 0) -> None:
    """Start the trackers with the options as flat hyper-parameters; on resume, drop events logged after the checkpoint.

    A run resumed from step ``s`` re-does the steps after ``s`` that the interrupted run may already have logged;
    tensorboard's ``purge_step`` discards those, so each curve stays single-valued.
    """
    if not accelerator.trackers and accelerator.log_with:
        from utils.options import options_to_dict

        config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                  for k, v in _flatten(options_to_dict(options)).items()}
        init_kwargs = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step else {}
        accelerator.init_trackers(project_name, config=config, init_kwargs=init_kwargs)
