"""Checkpoints that resume bit-exactly: accelerate's state, our module files and a small JSON training state.

:class:`CheckpointManager` writes ``accelerator.save_state`` into ``checkpoint-<step>.tmp``, renames it when
complete and prunes the oldest only afterwards, so a crash at any moment leaves the previous checkpoints usable.
Trainable modules are written as safetensors by hooks (:func:`register_checkpoint_modules`,
:class:`ModuleCheckpoint`) instead of accelerate's default files, plus a :class:`TrainState` (step, epoch, samples
consumed in the epoch). Optimizer, LR-schedule and RNG states are accelerate's own files (pickles, which accelerate
reads back with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.atomic import TMP_SUFFIX, replace_directory
from utils.training.module_weights import (
    load_module,
    load_trainable,
    save_module,
    save_trainable,
)
from utils.training.run_dir import (
    CHECKPOINT_PREFIX,
    STATE_FILE,
    TrainingError,
    list_checkpoints,
)

log = logging.getLogger(__name__)

STATE_FORMAT = 1


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
