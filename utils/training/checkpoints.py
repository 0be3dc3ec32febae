"""Checkpoints that resume bit-exactly: accelerate's state, our module files and a small JSON training state.

:class:`CheckpointManager` writes ``accelerator.save_state`` into ``checkpoint-<step>.tmp``, renames it when
complete and prunes the oldest only afterwards, so a crash at any moment leaves the previous checkpoints usable.
Trainable modules are written as safetensors by hooks (:func:`register_checkpoint_modules`,
:class:`ModuleCheckpoint`) instead of accelerate's default files, plus a :class:`TrainState` (step, epoch, samples
consumed in the epoch). Optimizer, LR-schedule and RNG states are accelerate's own files (pickles, which accelerate
reads back with ``weights_only=True``).

Damage is found before anything is loaded: ``training_state.json`` (written last) lists every file of the checkpoint
with its size and SHA-256 (:func:`file_manifest`), and :func:`checkpoint_problem` checks them, opens every safetensors
file and reads every pickle with ``weights_only=True`` (a pickle that holds anything but tensors and plain data is
refused, never executed). Accelerate skips random states it cannot read without a word; :meth:`CheckpointManager.load`
restores them itself, so they are restored or the load fails. Checkpoints written before the manifest existed get
the structural checks only. ``--resume latest`` uses this to fall back to the newest checkpoint that loads
(:func:`utils.training.run_dir.resolve_resume`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
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
MANIFEST_KEY = "files"  # in training_state.json: {relative path: {"bytes": n, "sha256": hex}} of every other file
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")  # accelerate's optimizer, scheduler, sampler, scaler and RNG files
RNG_STATE_FILE = "random_states_{}.pkl"  # accelerate's name, one per process
_RNG_FILE_RE = re.compile(r"^random_states_\d+\.pkl$")
RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")  # what every accelerate RNG file holds


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
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
            raise TrainingError(f"{path}: not a valid training state ({_first_line(err)})") from None
        if min(state.step, state.epoch, state.samples_in_epoch) < 0:
            raise TrainingError(f"{path}: negative counters in the training state")
        return state, raw


def _first_line(err: BaseException) -> str:
    """The first line (or sentence, for torch's long messages) of an error, or its type when it has no message."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0].strip()
    return line.split(". ")[0].rstrip(".") if len(line) > 160 else line


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under ``folder`` except the training state (which records them)."""
    folder = Path(folder)
    manifest = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.relative_to(folder).as_posix() != STATE_FILE:
            manifest[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return manifest


def load_pickle(path: str | os.PathLike[str]) -> Any:
    """A checkpoint pickle read with ``weights_only=True`` (tensors, numbers, strings, containers, numpy arrays).

    Anything else in the file (a class, a function call) is refused with :class:`TrainingError`, as is a file that is
    not a complete torch pickle; the message is one line.
    """
    from accelerate.utils import load  # torch.load with weights_only=True and accelerate's numpy allow-list

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols
            return load(path, map_location="cpu")
    except pickle.UnpicklingError as err:
        found = re.search(r"(unsupported GLOBAL \S+|Unsupported global: GLOBAL \S+|Unsupported operand \S+)", str(err))
        detail = found.group(1).rstrip(".") if found else "not tensors and plain data"
        raise TrainingError(
            f"{path.name}: refused: holds more than tensors and plain data ({detail}); it is never loaded unsafely"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise TrainingError(f"{path.name}: damaged or not a torch file ({_first_line(err)})") from None


def checkpoint_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint ``folder`` cannot be loaded completely (one line, naming the file), or None.

    Checks the training state, the size and SHA-256 of every file it lists, the header and length of every
    safetensors file, and reads every pickle with ``weights_only=True`` (random-state files must hold random
    states). A sound result is remembered for the folder's file sizes and time stamps, so resolving ``--resume``
    and loading read the files once.
    """
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        return f"{STATE_FILE} is missing"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    key = (str(folder.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key in _VERIFIED:
        return None
    try:
        _, info = TrainState.read(state_file)
    except TrainingError as err:
        return f"{STATE_FILE}: {str(err).split(': ', 1)[-1]}"
    if info.get("format") != STATE_FORMAT:
        return f"{STATE_FILE}: unknown training-state format {info.get('format')!r}"
    manifest = info.get(MANIFEST_KEY)
    if manifest is not None:
        if not isinstance(manifest, dict):
            return f"{STATE_FILE}: '{MANIFEST_KEY}' is not an object"
        for name, record in sorted(manifest.items()):
            path = folder / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                return f"{STATE_FILE}: file name {name!r} points outside the checkpoint"
            if not path.is_file():
                return f"{name} is missing"
            try:
                size, digest = int(record["bytes"]), str(record["sha256"])
            except (TypeError, KeyError, ValueError):
                return f"{STATE_FILE}: the record of {name} is not valid"
            actual = path.stat().st_size
            if actual != size:
                return f"{name} has {actual:,} bytes, {size:,} were saved (truncated or overwritten)"
            if _sha256(path) != digest:
                return f"{name} differs from the saved file (SHA-256 mismatch)"
    for path in files:
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
            if problem:
                return f"{name}: {problem}"
        elif path.suffix in PICKLE_SUFFIXES:
            try:
                content = load_pickle(path)
            except TrainingError as err:
                return f"{name}: {str(err).split(': ', 1)[-1]}"
            if _RNG_FILE_RE.match(name) and not (isinstance(content, dict) and set(RNG_KEYS) <= set(content)):
                return f"{name}: not random states (expected the keys {', '.join(RNG_KEYS)})"
    _VERIFIED.add(key)
    return None


_VERIFIED: set[tuple[Any, ...]] = set()  # (folder, (file, size, mtime) of each file) of checkpoints found sound


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file whose header does not parse or whose tensors do not cover the file exactly."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        return f"damaged ({_first_line(err)})"
    return None


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
        rng_digest = _rng_digest()  # before waiting: the state save_state recorded
        acc.wait_for_everyone()  # every process's files are written before the manifest lists them
        if acc.is_main_process:
            record = dict(
                num_processes=acc.num_processes,
                gradient_accumulation_steps=acc.gradient_accumulation_steps,
                rng_digest=rng_digest,
                **info,
                **{MANIFEST_KEY: file_manifest(tmp)},
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
        """Restore models (through the registered hooks), optimizers, schedules and RNG states; return the state.

        The checkpoint is checked first (:func:`checkpoint_problem`); any problem, then or while loading, is one
        :class:`TrainingError` line naming the checkpoint and the file.
        """
        acc = self.accelerator
        path = Path(path)
        problem = checkpoint_problem(path)
        if problem:
            raise TrainingError(f"checkpoint {path} cannot be loaded: {problem}")
        state, info = TrainState.read(path / STATE_FILE)
        saved_processes = info.get("num_processes")
        if saved_processes not in (None, acc.num_processes):
            log.warning(
                "checkpoint %s was written by %s processes, resuming on %s: the data order after resuming differs "
                "from an uninterrupted run", path, saved_processes, acc.num_processes
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch's note on pickle protocols
                acc.load_state(str(path))
        except TrainingError:
            raise
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - accelerate, torch and safetensors raise many kinds; one line each
            raise TrainingError(
                f"checkpoint {path} is incomplete or from another setup: {type(err).__name__}: {_first_line(err)}"
            ) from None
        self._restore_random_states(path)
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

    def _restore_random_states(self, path: Path) -> None:
        """Set Python's, numpy's, torch's and CUDA's RNG states from this process's file, or fail in one line.

        ``accelerate.load_state`` does this too, but passes over any error in silence (a damaged or refused
        file would leave the random draws of a fresh start).
        """
        import numpy as np

        file = path / RNG_STATE_FILE.format(self.accelerator.process_index)
        if not file.is_file():
            raise TrainingError(f"checkpoint {path} cannot be loaded: {file.name} (random states) is missing")
        states = load_pickle(file)
        try:
            random.setstate(states["random_state"])
            np.random.set_state(states["numpy_random_seed"])
            torch.set_rng_state(states["torch_manual_seed"])
            cuda_states = states.get("torch_cuda_manual_seed")
            if cuda_states is not None and torch.cuda.is_available():
                count = min(len(cuda_states), torch.cuda.device_count())
                if count != len(cuda_states):
                    log.warning("%s holds %d CUDA random states, %d devices now", file, len(cuda_states), count)
                for device in range(count):
                    torch.cuda.set_rng_state(cuda_states[device], device)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise TrainingError(
                f"checkpoint {path} cannot be loaded: {file.name}: not valid random states ({_first_line(err)})"
            ) from None
