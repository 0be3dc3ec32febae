"""A fast inference path for a trained OSCAR model: lower precision, merged LoRA, channels_last, SDPA, compile.

:func:`prepare_for_inference` converts an :class:`~models.oscar.OSCARModel` *in place* for encoding and
decoding. Every step is an option, and the defaults are the ones that are safe:

====================  ==========================================================================================
step                  what it does, and why it is safe
====================  ==========================================================================================
LoRA merge            folds the three adapter groups into the UNet weights (:func:`models.blocks.lora.merge_lora`),
                      done in fp32 *before* any cast so that ``W + s·BA`` is rounded once; removes the extra
                      low-rank matmuls of ~260 layers. Equal to the unmerged model within fp32 round-off.
precision             casts the VAE and the UNet to bf16/fp16. The hyper-encoders (analysis, cosine VQ,
                      synthesis) and the prompt embedding stay fp32, so the same latent always gives the same
                      indices and the same hyper-decoded latent.
channels_last         NHWC memory format for the conv-heavy VAE and UNet (faster cuDNN / oneDNN kernels).
SDPA                  sets diffusers' ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``: flash / memory-
                      efficient kernels) on every attention layer, whatever was installed before.
torch.compile         optional (off by default): compiles the UNet and the VAE decoder in place; skipped with a
                      warning where no compiler backend is usable.
VAE tiling            untouched: ``model.config.vae_tiling`` ("auto": tile only large images) still decides.
====================  ==========================================================================================

Numerical contract. The decoder computes exactly the same function as the reference path (hyper-decoder ->
transmitted-RMS rescale -> one UNet pass -> x0 -> VAE decoder -> clamp -> crop); only the arithmetic precision
of the VAE and UNet (and, with merging, the order of two fp32 additions) changes. Nothing is approximated,
skipped or re-tuned, so a file decodes to the reference image up to rounding (tests/test_fast_inference.py
bounds it: > 40 dB PSNR). The bitstream identity is kept: the model's fingerprint is computed from the fp32,
unmerged weights before any conversion and frozen (:meth:`OSCARModel.freeze_fingerprint`), so a prepared model reads
files written by the reference model and vice versa.

Encoder side. With ``fast_encoder=True`` (default) the VAE encoder gets the same precision and layout as the
decoder; a bf16/fp16 latent can move a few near-tie tokens to another codebook entry, so the *indices of an
image* may differ slightly from the fp32 reference encoder (files stay valid and decodable by either). With
``fast_encoder=False`` the VAE encoder is left exactly as it is, and encoding is bit-identical to the
reference model.
"""

from __future__ import annotations

import shutil
import warnings
from typing import Any

import torch
from torch import nn

from models.blocks.lora import merge_lora as merge_lora_weights
from models.oscar.model import OSCARModel
from utils.device import PRECISIONS, resolve_dtype


def inference_precision_default(device: torch.device | str) -> str:
    """``bf16`` on a CUDA device with native bf16 (compute capability >= 8.0), else ``fp32``.

    bf16 rather than fp16 because bf16 has fp32's exponent range: SD's VAE decoder can overflow fp16 on some
    inputs. CPUs stay at fp32: bf16 convolutions are emulated on most CPUs and are then slower, not faster.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "fp32"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(index)
    return "bf16" if major >= 8 else "fp32"


def compile_unavailable_reason(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` cannot be used on ``device`` (None when it can), checked before compiling.

    torch.compile is lazy: a missing backend would only fail at the first encode/decode, deep inside a run.
    """
    device = torch.device(device)
    if not hasattr(torch, "compile") or not hasattr(nn.Module, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        from torch import _dynamo  # (not `import torch._dynamo`: that would make `torch` local here)

        if not _dynamo.is_dynamo_supported():
            return "TorchDynamo is not supported on this Python/platform"
    except ImportError as err:  # pragma: no cover - broken installs only
        return f"TorchDynamo cannot be imported ({err})"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # pragma: no cover
            return "cannot check for Triton"
        if not has_triton():
            return "Triton (the CUDA backend of torch.compile) is not installed"
    elif device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "no C++ compiler found (the CPU backend of torch.compile needs one)"
    return None


def prepare_for_inference(
    model: OSCARModel,
    precision: str | None = None,
    merge_lora: bool = True,
    channels_last: bool = True,
    compile: bool = False,
    *,
    fast_encoder: bool = True,
    sdpa: bool = True,
) -> OSCARModel:
    """Convert ``model`` in place for fast encoding/decoding and return it (see the module docstring).

    Args:
        model: an fp32 OSCAR model on the device it will run on (move it first: on a CPU fp16 becomes fp32).
        precision: ``fp32``, ``bf16`` or ``fp16`` for the VAE and UNet weights; None picks
            :func:`inference_precision_default` for the model's device. fp16 on CPU falls back to fp32 with
            a warning (utils.device.resolve_dtype).
        merge_lora: fold the LoRA adapters into the UNet weights (irreversible here: the model is for inference).
        channels_last: NHWC memory format for the VAE and UNet.
        compile: torch.compile the UNet and the VAE decoder (first calls per input shape are slow).
        fast_encoder: also convert the VAE encoder; False keeps encoding bit-identical to the reference.
        sdpa: install diffusers' ``AttnProcessor2_0`` on every attention layer.

    The model is put in eval mode with gradients off. Call this once, on a model built in fp32: merging in
    bf16/fp16 would round the merged weights twice.
    """
    if getattr(model, "inference_setup", None) is not None:
        raise ValueError(f"model already prepared for inference ({model.inference_setup}); prepare a fresh fp32 model")
    device = model.device
    precision = precision if precision is not None else inference_precision_default(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    dtype = resolve_dtype(precision, device)
    model.eval().requires_grad_(False)
    model.freeze_fingerprint()  # before any weight changes: the identity of the exported fp32 weights

    merged = False
    if merge_lora and _lora_layers(model.unet):
        if model.unet.dtype != torch.float32:
            warnings.warn(
                f"UNet is {model.unet.dtype}; upcasting to fp32 to merge LoRA (merging in low precision rounds twice)",
                stacklevel=2,
            )
            model.unet.float()
        if not all(layer.merged for layer in _lora_layers(model.unet)):
            merge_lora_weights(model.unet)
        merged = True

    encoder_parts = _vae_encoder_parts(model.vae)
    decoder_parts = _vae_decoder_parts(model.vae)
    converted = [model.unet, *decoder_parts] + (encoder_parts if fast_encoder else [])
    for module in converted:
        _cast(module, dtype)
        if channels_last:
            module.to(memory_format=torch.channels_last)

    if sdpa:
        set_sdpa_attention(model.unet)
        set_sdpa_attention(model.vae)

    model.inference_setup = {
        "precision": precision,
        "dtype": str(dtype).removeprefix("torch."),
        "lora_merged": merged,
        "channels_last": channels_last,
        "fast_encoder": fast_encoder,
        "sdpa": sdpa,
        "compiled": [],
        "vae_tiling": model.config.vae_tiling,
    }
    if compile:
        compile_for_inference(model)
    return model


def compile_for_inference(model: OSCARModel) -> list[str]:
    """torch.compile the UNet and the VAE decoder in place (``nn.Module.compile``); returns what was compiled.

    In place rather than ``torch.compile(module)`` so that ``model.unet`` keeps its class, ``config`` and
    ``dtype``. Separate from :func:`prepare_for_inference` so a caller can first run uncompiled passes (the
    benchmark counts FLOPs, which torch.compile would hide). Skipped with a warning where no backend is usable.
    """
    reason = compile_unavailable_reason(model.device)
    if reason is not None:
        warnings.warn(f"torch.compile skipped: {reason}", stacklevel=2)
        return []
    model.unet.compile()
    model.vae.decoder.compile()
    compiled = ["unet", "vae.decoder"]
    setup = getattr(model, "inference_setup", None)
    if setup is not None:
        setup["compiled"] = compiled
    return compiled


def set_sdpa_attention(module: nn.Module) -> None:
    """Install ``AttnProcessor2_0`` (PyTorch SDPA) on every attention layer of a diffusers model.

    diffusers picks it by default on torch 2, but a loaded pipeline or another library may have installed a
    slower processor (the classic one, xformers, sliced attention); this makes the fast path explicit.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    if hasattr(module, "set_attn_processor") and getattr(module, "attn_processors", None):
        module.set_attn_processor(AttnProcessor2_0())


def attention_processors(module: nn.Module) -> set[str]:
    """Class names of the attention processors in use (for checks and benchmark reports)."""
    return {type(p).__name__ for p in getattr(module, "attn_processors", {}).values()}


# ------------------------------------------------------------------------------------------------ helpers


def _lora_layers(unet: nn.Module) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def _vae_encoder_parts(vae: nn.Module) -> list[nn.Module]:
    """The modules of ``vae.encode`` in call order (``quant_conv`` is absent in some VAEs)."""
    return [m for m in (vae.encoder, getattr(vae, "quant_conv", None)) if m is not None]


def _vae_decoder_parts(vae: nn.Module) -> list[nn.Module]:
    """The modules of ``vae.decode`` in call order (``post_quant_conv`` first when present)."""
    return [m for m in (getattr(vae, "post_quant_conv", None), vae.decoder) if m is not None]


def _cast(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point weights, keeping any diffusers ``_keep_in_fp32_modules`` (none in SD's UNet/VAE) fp32.

    ``nn.Module.to`` directly: diffusers' ``ModelMixin.to`` logs a warning on every dtype cast, even with an
    empty keep-list, which would be noise on each benchmark row.
    """
    nn.Module.to(module, dtype=dtype)
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    for name, sub in module.named_modules():
        if keep and any(k in name.split(".") for k in keep):
            nn.Module.to(sub, dtype=torch.float32)
