"""Training infrastructure shared by both OSCAR training stages (train_hyper_enc.py and train_diff.py).

Both stages are accelerate scripts in the style of diffusers' training examples: one :class:`~accelerate.Accelerator`
owns devices, mixed precision, gradient accumulation, trackers and checkpoints; multi-GPU and multi-node runs go
through ``accelerate launch`` only. This module holds everything that is not stage-specific, so that a stage script
reduces to "build the frozen and trainable parts, define one training step, call :func:`run_training_loop`":

* the run folder (:class:`RunDir`): ``<output_root>/<name>/`` with ``options.json``, ``checkpoints/checkpoint-<step>/``,
  ``logs/`` (tensorboard), ``validation/`` and ``final/``;
* :func:`make_accelerator` (+ :func:`init_trackers`), :func:`build_optimizer`, :func:`build_lr_scheduler`,
  :func:`optimizer_step` (clipping, then optimizer and schedule);
* checkpoints that resume bit-exactly (:class:`CheckpointManager`): ``accelerator.save_state`` into
  ``checkpoint-<step>.tmp``, renamed when complete, oldest pruned only afterwards. Trainable modules are written as
  safetensors by hooks (:func:`register_checkpoint_modules`) instead of accelerate's default files, plus a small
  JSON :class:`TrainState` (step, epoch, samples consumed in the epoch). Optimizer, LR-schedule and RNG states are
  accelerate's own files (pickles, which accelerate reads back with ``weights_only=True``);
* the data position (:class:`ResumableBatches`): the epoch and the place in it are restored through
  :class:`utils.data.EpochShuffleSampler`, so a resumed run sees exactly the batches the uninterrupted one would;
* randomness that does not depend on the global RNG (:func:`derived_generator`): draws seeded by (seed, epoch,
  position, process), identical whether or not the run was resumed;
* Ctrl-C / SIGTERM handling (:class:`GracefulInterrupt`): the loop finishes the current step, saves a checkpoint
  and stops; a second Ctrl-C aborts at once.

A stage script's training step only does forward, ``accelerator.backward`` and :func:`optimizer_step`;
:func:`run_training_loop` wraps it in ``accelerator.accumulate``, counts optimizer steps, logs, validates,
checkpoints and stops. See train_hyper_enc.py for a complete, short example.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.atomic import TMP_SUFFIX, replace_directory
from utils.data import DatasetError
from utils.errors import OptionsError, UserError

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
STATE_FORMAT = 1
PLAIN_WEIGHTS_NAME = "model.safetensors"  # modules that are not diffusers ModelMixins
TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"  # see save_trainable
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class TrainingError(UserError):
    """A run cannot start or continue: a bad --resume target, an occupied run folder, a mismatching checkpoint."""


# --------------------------------------------------------------------------------------------- run folder


@dataclass(frozen=True)
class RunDir:
    """The layout of one training run: every output of a run lives under ``root = <output_root>/<name>``."""

    root: Path

    @classmethod
    def of(cls, output_root: str | os.PathLike[str], name: str) -> RunDir:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise OptionsError(f"name {name!r}: expected a plain folder name (no slashes)")
        return cls(Path(output_root) / name)

    @property
    def options(self) -> Path:
        """The resolved options of the run (rewritten on resume)."""
        return self.root / "options.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        """Tracker output (tensorboard event files)."""
        return self.root / "logs"

    @property
    def validation(self) -> Path:
        """One ``step-<n>.json`` (and possibly images) per validation."""
        return self.root / "validation"

    @property
    def final(self) -> Path:
        """The trained weights at the end (the stage's ``save_pretrained`` folder)."""
        return self.root / "final"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(checkpoints_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints (``checkpoint-<step>`` folders with a training state) as (step, path), oldest first.

    Interrupted saves (``.tmp`` folders) and foreign folders are ignored.
    """
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(run: RunDir, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from, checked before anything is built or written.

    ``None``: a new run, refused when the run folder already holds checkpoints or final weights (so a typo in a name
    cannot silently overwrite a finished run). ``"latest"``: the newest complete checkpoint of this run, or a new run
    when there is none yet (so one command line serves for the first start and for every restart of a preempted
    job). Anything else: the path of a checkpoint folder, possibly of another run.
    """
    if resume is None:
        existing = list_checkpoints(run.checkpoints)
        if existing or (run.final.is_dir() and any(run.final.iterdir())):
            what = f"checkpoints (last step {existing[-1][0]})" if existing else "final weights"
            raise TrainingError(
                f"run folder {run.root} already holds {what}: pass --resume latest to continue it, "
                f"or choose another run name (--set name=...)"
            )
        return None
    if resume == "latest":
        existing = list_checkpoints(run.checkpoints)
        return existing[-1][1] if existing else None
    path = Path(resume)
    if not path.is_dir():
        raise TrainingError(f"--resume {resume}: no such checkpoint folder")
    if not (path / STATE_FILE).is_file():
        raise TrainingError(f"--resume {resume}: not a complete checkpoint ({STATE_FILE} is missing)")
    return path


def write_run_options(accelerator: Any, options: Any, run: RunDir) -> None:
    """Write the resolved options to ``run.options`` (main process); on resume, log the keys that changed."""
    from utils.options import options_to_dict, save_options

    if accelerator.is_main_process:
        if run.options.is_file():
            try:
                before = _flatten(json.loads(run.options.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError):
                before = {}
            after = _flatten(options_to_dict(options))
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            if before and changed:
                log.warning("options changed since the last start of this run: %s", ", ".join(changed))
        save_options(options, run.options)
    accelerator.wait_for_everyone()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------------------------- accelerator


def make_accelerator(
    train: Any, run_dir: str | os.PathLike[str], seed: int, *, device: str = "auto", find_unused_parameters: bool = False
) -> Any:
    """An Accelerator for ``train`` (a :class:`models.oscar.options.TrainLoopOptions`), seeded with ``seed``.

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


# --------------------------------------------------------------------------------------------- optimisation


def build_optimizer(parameters: Iterable[nn.Parameter] | Iterable[dict[str, Any]], options: Any) -> torch.optim.AdamW:
    """AdamW from an :class:`models.oscar.options.OptimizerOptions` (learning rate, betas, weight decay, eps)."""
    params = list(parameters)
    if not params:
        raise ValueError("no parameters to optimize")
    return torch.optim.AdamW(
        params,
        lr=options.learning_rate,
        betas=(options.betas[0], options.betas[1]),
        weight_decay=options.weight_decay,
        eps=options.eps,
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, options: Any, max_steps: int, num_processes: int = 1
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' ``get_scheduler(options.lr_scheduler)`` with ``options.lr_warmup_steps`` warm-up steps.

    Pass the scheduler through ``accelerator.prepare``: accelerate then steps it ``num_processes`` times per
    optimizer step (and not at all on accumulation micro-steps), so warm-up and length are counted in
    ``num_processes`` units here, as in diffusers' training examples.
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        options.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=options.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
    )


def optimizer_step(
    accelerator: Any,
    optimizer: Any,
    lr_scheduler: Any,
    parameters: Iterable[nn.Parameter],
    max_grad_norm: float,
) -> torch.Tensor | None:
    """Clip (on the step that applies the accumulated gradient; ``max_grad_norm=0`` = off), step, zero the gradients.

    Returns the gradient norm before clipping when it was computed. Call it on every micro-batch inside
    ``accelerator.accumulate``: the prepared optimizer and scheduler only act when gradients are synchronised.
    """
    grad_norm = None
    if accelerator.sync_gradients and max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# --------------------------------------------------------------------------------------------- models


def count_parameters(*modules: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                total += p.numel()
    return total


def enable_gradient_checkpointing(*modules: nn.Module) -> list[str]:
    """Turn on gradient checkpointing where a module supports it (diffusers models); return the enabled class names.

    Memory-efficient attention needs no switch: diffusers uses PyTorch's scaled_dot_product_attention (flash /
    memory-efficient kernels) by default on torch 2. Modules without support are reported once and left as they are.
    """
    enabled = []
    for module in modules:
        if getattr(module, "_supports_gradient_checkpointing", False) and hasattr(
            module, "enable_gradient_checkpointing"
        ):
            module.enable_gradient_checkpointing()
            enabled.append(type(module).__name__)
        else:
            log.warning("%s does not support gradient checkpointing; it trains without it", type(module).__name__)
    return enabled


def _public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}


def save_module(module: nn.Module, directory: str | os.PathLike[str]) -> None:
    """All weights and buffers as safetensors: ``save_pretrained`` for diffusers models (config.json too)."""
    from diffusers.models.modeling_utils import ModelMixin
    from safetensors.torch import save_model

    directory = Path(directory)
    if isinstance(module, ModelMixin):
        module.save_pretrained(directory, safe_serialization=True)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        save_model(module, str(directory / PLAIN_WEIGHTS_NAME))


def load_module(module: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Load :func:`save_module`'s output into ``module`` in place (strict), after checking a diffusers config matches.

    In place, so the optimizer's references to the parameters stay valid; a config mismatch (e.g. another width than
    the options give) is a :class:`TrainingError` naming the differing keys.
    """
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file, load_model

    directory = Path(directory)
    if isinstance(module, ModelMixin):
        config_path = directory / CONFIG_NAME
        weights = directory / SAFETENSORS_WEIGHTS_NAME
        if not config_path.is_file() or not weights.is_file():
            raise TrainingError(f"checkpoint {directory}: {CONFIG_NAME} or {SAFETENSORS_WEIGHTS_NAME} is missing")
        saved = _public_config(json.loads(config_path.read_text(encoding="utf-8")))
        current = _public_config(dict(module.config))
        differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        if differing:
            detail = ", ".join(f"{k}={saved.get(k)!r} (now {current.get(k)!r})" for k in differing)
            raise TrainingError(f"checkpoint {directory} was written for another {type(module).__name__}: {detail}")
        _load_strict(module, load_file(str(weights)), directory)
    else:
        weights = directory / PLAIN_WEIGHTS_NAME
        if not weights.is_file():
            raise TrainingError(f"checkpoint {directory}: {PLAIN_WEIGHTS_NAME} is missing")
        try:
            load_model(module, str(weights), strict=True)
        except RuntimeError as err:
            raise TrainingError(f"checkpoint {directory} does not fit {type(module).__name__}: {err}") from None


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all persistent buffers (buffers such as EMA codebooks change during training)."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in module.named_buffers()}
    return {k: v for k, v in module.state_dict().items() if k in trainable or k in buffers}


def save_trainable(module: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Only :func:`trainable_state_dict` (e.g. LoRA weights of a frozen UNet), as ``trainable.safetensors``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in trainable_state_dict(module).items()}
    save_file(state, str(directory / TRAINABLE_WEIGHTS_NAME))


def load_trainable(module: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Inverse of :func:`save_trainable`: exactly the trainable keys must be present."""
    from safetensors.torch import load_file

    weights = Path(directory) / TRAINABLE_WEIGHTS_NAME
    if not weights.is_file():
        raise TrainingError(f"checkpoint {directory}: {TRAINABLE_WEIGHTS_NAME} is missing")
    state = load_file(str(weights))
    expected = set(trainable_state_dict(module))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise TrainingError(
            f"checkpoint {directory} does not fit {type(module).__name__}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    module.load_state_dict(state, strict=False)


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise TrainingError(f"checkpoint {where} does not fit {type(module).__name__}: {first}") from None


@dataclass(frozen=True)
class ModuleCheckpoint:
    """How one trainable module is written into and read from its checkpoint subfolder."""

    module: nn.Module
    save: Callable[[nn.Module, Path], None] = save_module
    load: Callable[[nn.Module, Path], None] = load_module

    @classmethod
    def trainable_only(cls, module: nn.Module) -> ModuleCheckpoint:
        """Save only trainable tensors and buffers (a LoRA-adapted frozen backbone)."""
        return cls(module, save_trainable, load_trainable)


def register_checkpoint_modules(accelerator: Any, modules: Mapping[str, nn.Module | ModuleCheckpoint]) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` write and read these modules as ``<dir>/<name>/`` safetensors.

    ``modules`` maps a subfolder name to a module (full weights through :func:`save_module`) or to a
    :class:`ModuleCheckpoint` (e.g. :meth:`ModuleCheckpoint.trainable_only`). The modules must be the unwrapped ones
    given to ``accelerator.prepare``; the hooks find them among accelerate's (possibly DDP-wrapped) models and take
    them out of accelerate's own model files. Loading happens in place, so call ``load_state`` after ``prepare``.
    """
    slots = {name: m if isinstance(m, ModuleCheckpoint) else ModuleCheckpoint(m) for name, m in modules.items()}
    for name in slots:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"module name {name!r}: expected a plain folder name")

    def match(model: nn.Module) -> str | None:
        inner = accelerator.unwrap_model(model)
        for name, slot in slots.items():
            if inner is slot.module or model is slot.module:
                return name
        return None

    def save_hook(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
        keep_models, keep_weights = [], []
        for model, state in zip(models, weights):
            name = match(model)
            if name is None:
                keep_models.append(model)
                keep_weights.append(state)
            elif accelerator.is_main_process:
                slots[name].save(slots[name].module, Path(output_dir) / name)
        weights[:] = keep_weights  # accelerate writes only what is left, as model.safetensors, model_1...
        del keep_models

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        keep = []
        for model in models:
            name = match(model)
            if name is None:
                keep.append(model)
            else:
                slots[name].load(slots[name].module, Path(input_dir) / name)
        models[:] = keep

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --------------------------------------------------------------------------------------------- state and checkpoints


@dataclass
class TrainState:
    """Where training stands: optimizer steps done, current epoch, samples of that epoch consumed (all processes).

    ``extra`` is for a stage's own JSON-serialisable counters. Model, optimizer, LR-schedule and RNG states are
    not here: accelerate saves them beside this file.
    """

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, **info: Any) -> str:
        return json.dumps({"format": STATE_FORMAT, **asdict(self), **info}, indent=2) + "\n"

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> tuple[TrainState, dict[str, Any]]:
        """The state and the remaining recorded fields (processes, batch size, RNG digest...)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            state = cls(
                step=int(raw.pop("step")),
                epoch=int(raw.pop("epoch")),
                samples_in_epoch=int(raw.pop("samples_in_epoch")),
                extra=dict(raw.pop("extra", {})),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TrainingError(f"{path}: not a valid training state ({err})") from None
        if min(state.step, state.epoch, state.samples_in_epoch) < 0:
            raise TrainingError(f"{path}: negative counters in the training state")
        return state, raw


def _rng_digest() -> str:
    """A short fingerprint of the CPU torch RNG, to notice when accelerate could not restore the RNG states."""
    return hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]


class CheckpointManager:
    """Atomic, pruned, resumable checkpoints of an accelerate run under ``checkpoints_dir``.

    :meth:`save` writes ``checkpoint-<step>.tmp`` (accelerate state, module hooks, ``training_state.json``), renames
    it to ``checkpoint-<step>`` once every process is done, then deletes the oldest complete checkpoints beyond
    ``total_limit`` and any leftover ``.tmp`` folder. A crash at any moment leaves the previous checkpoints usable.
    Assumes a file system shared by all processes (single node, or a shared folder across nodes).
    """

    def __init__(self, accelerator: Any, checkpoints_dir: str | os.PathLike[str], total_limit: int | None) -> None:
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"total_limit={total_limit}: expected >= 1 or None")
        self.accelerator = accelerator
        self.dir = Path(checkpoints_dir)
        self.total_limit = total_limit
        self.last_saved_step: int | None = None
        self.last_saved: Path | None = None

    def save(self, state: TrainState, **info: Any) -> Path:
        """Save everything needed to continue from ``state``; call on every process, right after an optimizer step."""
        acc = self.accelerator
        final = self.dir / f"{CHECKPOINT_PREFIX}{state.step}"
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            record = dict(
                num_processes=acc.num_processes,
                gradient_accumulation_steps=acc.gradient_accumulation_steps,
                rng_digest=_rng_digest(),
                **info,
            )
            (tmp / STATE_FILE).write_text(state.to_json(**record), encoding="utf-8")
        acc.wait_for_everyone()
        if acc.is_main_process:
            replace_directory(tmp, final)
            self._prune(state.step)
        acc.wait_for_everyone()
        self.last_saved_step, self.last_saved = state.step, final
        return final

    def _prune(self, current_step: int) -> None:
        """Drop leftovers of interrupted saves, checkpoints of an abandoned continuation, the oldest beyond the limit.

        Checkpoints with a step above ``current_step`` exist only when an older checkpoint of this run was resumed
        explicitly: they continue another history, and keeping them would make ``--resume latest`` pick them.
        """
        for child in self.dir.iterdir():
            if child.name.startswith(CHECKPOINT_PREFIX) and child.name.endswith((TMP_SUFFIX, ".old")):
                shutil.rmtree(child, ignore_errors=True)
        complete = list_checkpoints(self.dir)
        for step, path in complete:
            if step > current_step:
                shutil.rmtree(path)
        complete = [(step, path) for step, path in complete if step <= current_step]
        if self.total_limit is not None:
            for _, path in complete[: max(0, len(complete) - self.total_limit)]:
                shutil.rmtree(path)

    def load(self, path: str | os.PathLike[str]) -> TrainState:
        """Restore models (through the registered hooks), optimizers, schedules and RNG states; return the state."""
        acc = self.accelerator
        path = Path(path)
        state, info = TrainState.read(path / STATE_FILE)
        if info.get("format") != STATE_FORMAT:
            raise TrainingError(f"{path / STATE_FILE}: unknown training-state format {info.get('format')!r}")
        saved_processes = info.get("num_processes")
        if saved_processes not in (None, acc.num_processes):
            log.warning(
                "checkpoint %s was written by %s processes, resuming on %s: the data order after resuming differs "
                "from an uninterrupted run", path, saved_processes, acc.num_processes
            )
        try:
            acc.load_state(str(path))
        except (FileNotFoundError, KeyError) as err:
            raise TrainingError(f"checkpoint {path} is incomplete or from another setup: {err}") from None
        later = [step for step, _ in list_checkpoints(self.dir) if step > state.step]
        if later and acc.is_main_process:
            log.warning(
                "resuming %s at step %d: the later checkpoints %s of %s are deleted at the next save",
                path, state.step, later, self.dir,
            )
        if acc.is_main_process and info.get("rng_digest") not in (None, _rng_digest()):
            log.warning("random-number-generator states of %s were not restored; random draws will differ", path)
        self.last_saved_step, self.last_saved = state.step, path
        return state


# --------------------------------------------------------------------------------------------- data position


class ResumableBatches:
    """Endless batches of a (prepared) loader, keeping ``state.epoch`` and ``state.samples_in_epoch`` current.

    Each epoch starts with ``loader.set_epoch(epoch)`` (accelerate forwards it to the dataset, whose crops and, through
    :class:`utils.data.EpochShuffleSampler`, order depend on (seed, epoch)); a resumed epoch starts with
    ``sampler.skip_next(samples_in_epoch)``. The state counts a batch as consumed when it is handed out, so a
    checkpoint taken after an optimizer step records exactly the batches used so far. ``global_batch`` is the batch
    size times the number of processes (each process takes every n-th batch of the same order).
    """

    def __init__(self, loader: Any, state: TrainState, global_batch: int, sampler: Any | None = None) -> None:
        self.loader = loader
        self.state = state
        self.global_batch = global_batch
        self.sampler = sampler if sampler is not None else _find_sampler(loader)
        dataset_len = len(loader.dataset)
        self.per_epoch = dataset_len // global_batch * global_batch
        if self.per_epoch == 0:
            raise DatasetError(f"the dataset has {dataset_len} images, fewer than one global batch of {global_batch}")

    def __iter__(self) -> Iterator[Any]:
        state = self.state
        while True:
            if state.samples_in_epoch >= self.per_epoch:
                state.epoch, state.samples_in_epoch = state.epoch + 1, 0
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(state.epoch)  # accelerate's loader calls dataset.set_epoch itself
            else:
                self.loader.dataset.set_epoch(state.epoch)
            if state.samples_in_epoch:
                self.sampler.skip_next(state.samples_in_epoch)
            for batch in self.loader:
                state.samples_in_epoch += self.global_batch
                yield batch
            state.epoch, state.samples_in_epoch = state.epoch + 1, 0


def _find_sampler(loader: Any) -> Any:
    """The :class:`EpochShuffleSampler` inside a plain or accelerate-prepared loader."""
    candidates = [getattr(loader, "sampler", None)]
    batch_sampler = getattr(loader, "batch_sampler", None)
    while batch_sampler is not None:
        candidates.append(getattr(batch_sampler, "sampler", None))
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)
    for candidate in candidates:
        if hasattr(candidate, "skip_next"):
            return candidate
    raise ValueError("the loader has no resumable sampler (use utils.data.make_dataloader with shuffle=True)")


# --------------------------------------------------------------------------------------------- randomness


def derived_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from integer ``keys`` (e.g. seed, epoch, position, process index), well mixed.

    Random draws made through it depend only on the keys, not on what ran before: resuming needs no RNG state
    and each process draws differently when its index is one of the keys.
    """
    words = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(words[0]) << 31 ^ int(words[1]))
    return gen


# --------------------------------------------------------------------------------------------- interruption


class GracefulInterrupt:
    """Within the ``with`` block the first SIGINT (Ctrl-C) or SIGTERM (batch schedulers) only sets ``requested``.

    The training loop checks the flag between optimizer steps, saves a checkpoint and stops; a second Ctrl-C raises
    ``KeyboardInterrupt`` at once (no checkpoint). Outside the main thread nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort at once)",
            file=sys.stderr,
        )

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------------- the loop


StepFn = Callable[[Any, TrainState], Mapping[str, Any]]
ValidateFn = Callable[[int], Mapping[str, float] | None]


@dataclass
class LoopResult:
    """How :func:`run_training_loop` ended: ``finished`` (max_steps), ``stopped`` (stop_at) or ``interrupted``."""

    state: TrainState
    status: str
    checkpoint: Path | None


class _LogWindow:
    """Means of the step function's values since the last log line, reduced over processes at log time only."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if value is None:
                continue
            v = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            self.sums[key] = self.sums[key] + v if key in self.sums else v
            self.counts[key] = self.counts.get(key, 0) + 1

    def reduce(self, accelerator: Any) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k].to(accelerator.device) / self.counts[k] for k in keys])
        if accelerator.num_processes > 1:
            means = accelerator.reduce(means, reduction="mean")
        self.sums.clear()
        self.counts.clear()
        return dict(zip(keys, means.tolist()))


class _MetricsFile:
    """Logged values as JSON lines ``{"step": n, ...}``; on resume, lines after the resumed step are dropped."""

    def __init__(self, path: str | os.PathLike[str], resume_step: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill
            self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def write(self, step: int, values: Mapping[str, float]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a ``metrics_file`` as dicts, in order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


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


def run_training_loop(
    accelerator: Any,
    *,
    batches: ResumableBatches,
    models: Iterable[nn.Module],
    step_fn: StepFn,
    train: Any,
    checkpoints: CheckpointManager,
    validate: ValidateFn | None = None,
    stop_at: int | None = None,
    description: str = "training",
    metrics_file: str | os.PathLike[str] | None = None,
) -> LoopResult:
    """Run optimizer steps from ``batches.state.step`` to ``train.max_steps`` (a TrainLoopOptions).

    ``step_fn(batch, state)`` does one micro-batch: forward, ``accelerator.backward``, :func:`optimizer_step`; it
    returns values to log (tensors or numbers, averaged over the micro-batches and steps of each log interval).
    The loop wraps it in ``accelerator.accumulate(*models)`` and, after each optimizer step: logs every
    ``train.log_every`` steps, validates every ``train.validate_every`` steps and at the end (``validate(step)`` runs
    on every process; the metrics it returns on the main process are logged), checkpoints every
    ``train.checkpoint_every`` steps and at the end. ``stop_at`` (a step) or a first Ctrl-C / SIGTERM stops early,
    after a checkpoint, with status ``stopped`` / ``interrupted``. ``metrics_file``: every logged dict is also
    appended there as a JSON line (readable without a tracker; lines after a resumed step are dropped first).
    """
    from tqdm.auto import tqdm

    state = batches.state
    models = list(models)
    max_steps = train.max_steps
    window = _LogWindow()
    metrics = _MetricsFile(metrics_file, state.step) if metrics_file and accelerator.is_main_process else None
    last_checkpoint: Path | None = None
    status = "finished"
    progress = tqdm(
        total=max_steps,
        initial=min(state.step, max_steps),
        desc=description,
        unit="step",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )

    def checkpoint() -> Path | None:
        if checkpoints.last_saved_step == state.step:
            return checkpoints.last_saved
        return checkpoints.save(state)

    with GracefulInterrupt() as interrupt:
        batch_iter = iter(batches)
        while state.step < max_steps and (stop_at is None or state.step < stop_at):
            batch = next(batch_iter)
            with accelerator.accumulate(*models):
                values = step_fn(batch, state)
            window.add(values)
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            step = state.step
            if step % train.log_every == 0 or step == max_steps:
                means = window.reduce(accelerator)
                accelerator.log(means, step=step)
                if metrics is not None:
                    metrics.write(step, means)
                progress.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)
            if validate is not None and (step % train.validate_every == 0 or step == max_steps):
                scores = validate(step)
                if scores:
                    accelerator.log(dict(scores), step=step)
                    if metrics is not None:
                        metrics.write(step, scores)
                accelerator.wait_for_everyone()
            if step % train.checkpoint_every == 0:
                last_checkpoint = checkpoint()
            if _any_process(accelerator, interrupt.requested):
                status = "interrupted"
                break
        if status == "finished" and state.step < max_steps:
            status = "stopped"
        if state.step > 0:
            last_checkpoint = checkpoint()  # the end, a stop or an interruption: always resumable from here
    progress.close()
    return LoopResult(state=state, status=status, checkpoint=last_checkpoint)


def _any_process(accelerator: Any, flag: bool) -> bool:
    """True when ``flag`` is set on any process (all processes must stop at the same step to save together)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def epochs_for(max_steps: int, dataset_len: int, global_batch: int, accumulation: int) -> int:
    """Roughly how many epochs ``max_steps`` optimizer steps take (for the summary)."""
    per_epoch = max(1, math.ceil(max(1, dataset_len // global_batch) / accumulation))
    return math.ceil(max_steps / per_epoch)


# --------------------------------------------------------------------------------------------- entry points

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


def configure_logging(script: str) -> None:
    """Our messages at INFO; libraries (accelerate's per-file checkpoint chatter) at WARNING."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    for name in (script, "utils"):
        logging.getLogger(name).setLevel(logging.INFO)
