"""How one module's weights are written to and read from a folder of safetensors (a checkpoint's module subfolder).

Full modules go through :func:`save_module` / :func:`load_module` (``save_pretrained`` for diffusers models, whose
config is compared on load); a frozen backbone with adapters (LoRA) goes through :func:`save_trainable` /
:func:`load_trainable`, which keep only :func:`trainable_state_dict`. Loading is strict and in place, so an
optimizer's references stay valid and a mismatch is a :class:`~utils.training.run_dir.TrainingError`, never a
silent partial load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.training.run_dir import TrainingError

PLAIN_WEIGHTS_NAME = "model.safetensors"  # modules that are not diffusers ModelMixins
TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"  # see save_trainable


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
