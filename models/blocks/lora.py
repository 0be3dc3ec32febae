"""LoRA adapters on the SD UNet, grouped as the reference groups them.

Every UNet weight whose name contains one of :data:`LORA_TARGET_PATTERNS` (biases and norms excluded) gets a
LoRA adapter. Modules are split into three adapters, as in the authors' release, so that the released
checkpoint loads unchanged: ``default_encoder`` (``conv_in`` and ``down_blocks``), ``default_decoder``
(``up_blocks`` and ``conv_out``) and ``default_others`` (the mid block). Because "conv" is a pattern, every
convolution except the time embedding's linears is adapted.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

LORA_TARGET_PATTERNS = (
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
    "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj",
)  # fmt: skip
ADAPTER_GROUPS = ("encoder", "decoder", "others")


def adapter_name(group: str) -> str:
    return f"default_{group}"


def lora_target_groups(unet: nn.Module) -> dict[str, list[str]]:
    """Module names to adapt, per group, in parameter-registration order (call before adding adapters)."""
    groups: dict[str, list[str]] = {g: [] for g in ADAPTER_GROUPS}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name or "lora_" in name:
            continue
        if not any(pattern in name for pattern in LORA_TARGET_PATTERNS):
            continue
        module = name.removesuffix(".weight")
        if "down_blocks" in name or "conv_in" in name:
            groups["encoder"].append(module)
        elif "up_blocks" in name or "conv_out" in name:
            groups["decoder"].append(module)
        else:
            groups["others"].append(module)
    return groups


def add_oscar_lora(unet: nn.Module, rank: int, alpha: float) -> dict[str, list[str]]:
    """Add the three LoRA adapters (gaussian init, scaling alpha / rank) and activate all of them."""
    from peft import LoraConfig

    groups = lora_target_groups(unet)
    for group, modules in groups.items():
        if modules:
            config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=modules)
            with warnings.catch_warnings():
                # Several adapters on one model is the point here (one per module group), not a mistake.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                unet.add_adapter(config, adapter_name=adapter_name(group))
    unet.set_adapters([adapter_name(g) for g, modules in groups.items() if modules])
    return groups


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in unet.named_parameters() if "lora_" in name]


def conv_in_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The UNet's first convolution, fine-tuned in full by OSCAR (its base weights, not only its adapter)."""
    return [p for name, p in unet.named_parameters() if name.startswith("conv_in.") and "lora_" not in name]


def trainable_unet_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The UNet weights OSCAR trains: every LoRA tensor plus ``conv_in`` (the release's ``state_dict_unet``)."""
    return {k: v for k, v in unet.state_dict().items() if "lora_" in k or k.startswith("conv_in.")}


@torch.no_grad()
def merge_lora(unet: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights for inference (no extra matmuls per LoRA layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=list(module.lora_A.keys()))
    return unet
