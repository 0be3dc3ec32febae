"""The authors' released checkpoint layout (names and shapes) and checkpoints fabricated in it."""

from __future__ import annotations

import gzip
import json
from collections import OrderedDict
from pathlib import Path

import torch

LAYOUT_FILE = Path(__file__).parent / "data" / "oscar_release_layout.json.gz"


def release_layout() -> dict[str, dict[str, list[int]]]:
    with gzip.open(LAYOUT_FILE, "rt") as f:
        layout = json.load(f)
    layout.pop("_about", None)
    return layout


def release_dict_from_model(model) -> dict:
    """A dict in the release's format made from an OSCARModel's own weights (any size of zoo)."""
    he_state = OrderedDict()
    for key, value in model.hyper_encoders.state_dict().items():
        # Newer vector-quantize-pytorch versions save `initted` as a 0-dim bool: exercise that variant.
        he_state[key] = value.reshape(()).bool() if key.endswith("_codebook.initted") else value.clone()
    from models.blocks.lora import trainable_unet_state

    return {
        "hyper_encoders": he_state,
        "embeddings": torch.nn.Parameter(model.prompt_embedding.detach().clone()),
        "unet_lora_encoder_modules": list(model.lora_groups["encoder"]),
        "unet_lora_decoder_modules": list(model.lora_groups["decoder"]),
        "unet_lora_others_modules": list(model.lora_groups["others"]),
        "rank_unet": model.config.lora_rank,
        "state_dict_unet": {k: v.clone() for k, v in trainable_unet_state(model.unet).items()},
    }


def fabricate_release(path: Path, module_lists: dict[str, list[str]], seed: int = 0) -> dict:
    """Random tensors with exactly the released names and shapes (SD-2.1 sizes), saved with torch.save."""
    g = torch.Generator().manual_seed(seed)
    layout = release_layout()

    def tensor(shape: list[int]) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    he_state = OrderedDict((k, tensor(s)) for k, s in layout["hyper_encoders"].items())
    for key in he_state:
        if key.endswith("_codebook.initted"):
            he_state[key] = torch.ones(1)
        elif key.endswith("_codebook.embed"):
            he_state[key] = torch.nn.functional.normalize(he_state[key], dim=-1)
    ckpt = {
        "hyper_encoders": he_state,
        "embeddings": torch.nn.Parameter(tensor(layout["embeddings"]["embeddings"])),
        "unet_lora_encoder_modules": module_lists["encoder"],
        "unet_lora_decoder_modules": module_lists["decoder"],
        "unet_lora_others_modules": module_lists["others"],
        "rank_unet": 16,
        "state_dict_unet": {k: tensor(s) for k, s in layout["state_dict_unet"].items()},
    }
    torch.save(ckpt, path)
    return ckpt
