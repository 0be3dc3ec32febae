"""Loading the OSCAR authors' released checkpoint (``oscar.pkl``) unchanged, without running its pickle code.

The release is a ``torch.save`` dict (layout: docs/release_checkpoint.md): eight hyper-encoder state dicts,
the learned prompt embedding, the LoRA tensors and fine-tuned ``conv_in`` of the UNet (three adapters), the
adapter module lists and the LoRA rank. It is read with ``weights_only=True`` (tensors and plain containers
only: no arbitrary code runs), checked key by key, and copied into an :class:`OSCARModel` built with the
release's options (eight levels, N=192, M=320, rank 16).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from models.blocks.lora import ADAPTER_GROUPS
from models.blocks.codec_method import ModelLoadError
from models.oscar.export import load_unet_trainable
from models.oscar.model import OSCARModel
from models.blocks.state_dicts import state_dict_mismatch
from models.blocks.model_zoo import SDComponents
from models.oscar.options import ModelOptions

RELEASE_KEYS = {
    "hyper_encoders": dict,
    "embeddings": torch.Tensor,
    "unet_lora_encoder_modules": list,
    "unet_lora_decoder_modules": list,
    "unet_lora_others_modules": list,
    "rank_unet": int,
    "state_dict_unet": dict,
}


def release_options() -> ModelOptions:
    """Model options of the released multi-rate model (the defaults are the release's)."""
    return ModelOptions()


def read_release_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check the release dict; a wrong, truncated or unsafe file raises :class:`ModelLoadError`."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: release checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory sits at the very end
        raise ModelLoadError(f"{path}: not a readable torch checkpoint (no zip directory: truncated or another format)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"{path}: refused: not a plain tensor checkpoint (it holds objects other than tensors and plain "
            f"containers, which could run code when loaded)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{path}: not a readable torch checkpoint (truncated or corrupt? {first[:200]})") from None
    if not isinstance(ckpt, dict):
        raise ModelLoadError(f"{path}: expected a dict at the top level, got {type(ckpt).__name__}")
    for key, kind in RELEASE_KEYS.items():
        if key not in ckpt:
            raise ModelLoadError(f"{path}: key {key!r} missing; is this OSCAR's released oscar.pkl?")
        if not isinstance(ckpt[key], kind):
            raise ModelLoadError(f"{path}: {key!r} is a {type(ckpt[key]).__name__}, expected {kind.__name__}")
    return ckpt


def load_release_checkpoint(
    path: str | os.PathLike[str], sd: SDComponents, options: ModelOptions | None = None
) -> OSCARModel:
    """Build an :class:`OSCARModel` on ``sd`` and load ``oscar.pkl`` into it.

    ``options`` default to the release's; other values (e.g. ``latent_norms="oracle"`` to reproduce the
    reference's decoding) may be given, as long as the layout still matches.
    """
    ckpt = read_release_checkpoint(path)
    options = options if options is not None else release_options()
    if ckpt["rank_unet"] != options.lora_rank:
        options.lora_rank = int(ckpt["rank_unet"])
    model = OSCARModel(sd, options)
    copy_release_into(model, ckpt, str(path))
    return model


def copy_release_into(model: OSCARModel, ckpt: dict[str, Any], source: str) -> None:
    """Copy the release tensors into ``model``, refusing any missing, extra or mis-shaped entry."""
    # Adapter module lists: the release names them; they must be the groups this model adapted.
    for group in ADAPTER_GROUPS:
        listed = list(ckpt[f"unet_lora_{group}_modules"])
        if listed != model.lora_groups.get(group, []):
            raise ModelLoadError(
                f"{source}: unet_lora_{group}_modules ({len(listed)} modules) differs from this UNet's "
                f"{len(model.lora_groups.get(group, []))} {group} modules; is the model zoo SD-2.1?"
            )
    own = model.hyper_encoders.state_dict()
    # `initted` is a (1,) float in files of older vector-quantize-pytorch versions and a 0-d bool in newer ones.
    converted = {
        key: value.reshape(own[key].shape).to(own[key].dtype) if key.endswith("_codebook.initted") and key in own else value
        for key, value in ckpt["hyper_encoders"].items()
    }
    problem = state_dict_mismatch(own, converted)
    if problem:
        raise ModelLoadError(f"{source}: hyper_encoders do not match the release layout ({problem})")
    model.hyper_encoders.load_state_dict(converted)
    load_unet_trainable(model.unet, ckpt["state_dict_unet"], f"{source}: state_dict_unet")
    embeddings = ckpt["embeddings"]
    if tuple(embeddings.shape) != tuple(model.prompt_embedding.shape):
        raise ModelLoadError(f"{source}: embeddings shape {tuple(embeddings.shape)}, expected {tuple(model.prompt_embedding.shape)}")
    model.prompt_embedding.data.copy_(embeddings.detach())
    model.invalidate_fingerprint()
