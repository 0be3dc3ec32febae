"""OSCAR's export folder: what ``save_pretrained`` writes and ``from_pretrained`` reads.

Layout (export version 2): ``codec_config.json`` (method, version, model options, SD zoo path, fingerprint),
``hyper_encoders/level_<i>/`` (config.json + safetensors each), ``unet_lora.safetensors`` (LoRA + conv_in),
``prompt_embedding.safetensors`` and ``index_priors.safetensors`` (per-level codebook usage: the entropy coder's
prior). Version 1 differs only in its config file (``oscar_config.json`` with ``"format": "oscar-export"``).
Everything is safetensors + JSON; no pickles.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.blocks.codec_method import ModelLoadError, check_export_version, read_export_config, write_export_config
from models.blocks.lora import trainable_unet_state
from models.blocks.model_zoo import load_sd_components
from models.blocks.state_dicts import state_dict_mismatch
from models.oscar.hyper_encoder import HyperEncoder
from models.oscar.options import ModelOptions
from utils.atomic import atomic_directory
from utils.options import build_options, options_to_dict

if TYPE_CHECKING:  # the model module imports this one
    from models.oscar.model import OSCARModel

METHOD_NAME = "oscar"
EXPORT_VERSION = 2  # 1: oscar_config.json with "format": "oscar-export"; 2: codec_config.json with "method"
LEGACY_CONFIGS = {"oscar_config.json": ("oscar-export", METHOD_NAME, 1)}
UNET_FILE = "unet_lora.safetensors"
PROMPT_FILE = "prompt_embedding.safetensors"
PRIORS_FILE = "index_priors.safetensors"


def save_export(model: OSCARModel, out_dir: str | os.PathLike[str], zoo_path: str | None = None) -> Path:
    """Write ``model``'s export; an existing export is replaced only once the new one is complete."""
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        for i, encoder in enumerate(model.hyper_encoders):
            encoder.save_pretrained(tmp / "hyper_encoders" / f"level_{i}", safe_serialization=True)
        unet_state = {k: v.detach().cpu().contiguous() for k, v in trainable_unet_state(model.unet).items()}
        save_file(unet_state, tmp / UNET_FILE)
        save_file({"prompt_embedding": model.prompt_embedding.detach().cpu().contiguous()}, tmp / PROMPT_FILE)
        save_file({f"level_{i}": c.cpu().contiguous() for i, c in enumerate(model.index_counts)}, tmp / PRIORS_FILE)
        fields = {
            "model": options_to_dict(model.config),
            "model_zoo": str(zoo_path if zoo_path is not None else model.zoo_path),
            "fingerprint": f"{model.fingerprint():016x}",
        }
        write_export_config(tmp, METHOD_NAME, EXPORT_VERSION, fields)
    return out


def load_export(
    cls: type[OSCARModel],
    model_dir: str | os.PathLike[str],
    zoo_path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> OSCARModel:
    """An fp32 ``cls`` on the CPU with the export's weights (the caller moves it)."""
    model_dir = Path(model_dir)
    config = read_export_config(model_dir, LEGACY_CONFIGS)
    check_export_version(config, METHOD_NAME, EXPORT_VERSION)
    for key in ("model", "model_zoo"):
        if key not in config:
            raise ModelLoadError(f"{config['config_path']}: key {key!r} missing")
    raw_model = dict(config["model"])
    raw_model.update(overrides or {})
    options = build_options(ModelOptions, raw_model, f"{config['config_path']}: model")
    zoo = Path(zoo_path) if zoo_path is not None else Path(config["model_zoo"])
    if not zoo.is_absolute() and not zoo.exists() and (model_dir / zoo).exists():
        zoo = model_dir / zoo
    sd = load_sd_components(zoo, device="cpu", dtype=torch.float32)
    model = cls(sd, options)
    try:
        for i, encoder in enumerate(model.hyper_encoders):
            loaded = HyperEncoder.from_pretrained(model_dir / "hyper_encoders" / f"level_{i}")
            encoder.load_state_dict(loaded.state_dict())
        load_unet_trainable(model.unet, load_file(model_dir / UNET_FILE), str(model_dir / UNET_FILE))
        model.prompt_embedding.data.copy_(load_file(model_dir / PROMPT_FILE)["prompt_embedding"])
        if (model_dir / PRIORS_FILE).is_file():
            priors = load_file(model_dir / PRIORS_FILE)
            model.index_counts = [priors[f"level_{i}"].to(torch.int64) for i in range(model.num_levels)]
    except (OSError, KeyError, RuntimeError, ValueError, SafetensorError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{model_dir}: exported model cannot be loaded ({message})") from None
    # The identity is taken from the stored fp32 weights, before any cast: the same export loaded in another
    # precision reads the same files.
    stored = config.get("fingerprint")
    if stored and model.fingerprint() != int(stored, 16) and not overrides:
        warnings.warn(
            f"{model_dir}: fingerprint {model.fingerprint():016x} differs from the exported {stored} (another "
            f"model zoo than at export?); files written with the exported model will be refused",
            stacklevel=3,
        )
    return model


def load_unet_trainable(unet: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load LoRA + conv_in tensors into a UNet that has OSCAR's adapters; every expected key must be present."""
    problem = state_dict_mismatch(trainable_unet_state(unet), state)
    if problem:
        raise ModelLoadError(f"{source}: UNet weights do not match this model ({problem})")
    unet.load_state_dict(state, strict=False)


def zoo_digest(path: Path) -> str:
    """Cheap identity of the SD weight files: size plus the first and last MiB of each (not a full hash)."""
    digest = hashlib.sha256()
    for sub in ("unet", "vae"):
        for weight_file in sorted((Path(path) / sub).glob("diffusion_pytorch_model*")):
            size = weight_file.stat().st_size
            digest.update(f"{sub}/{weight_file.name}:{size}".encode())
            with open(weight_file, "rb") as f:
                digest.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    digest.update(f.read())
    return digest.hexdigest()
