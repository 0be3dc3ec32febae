"""Device and precision selection shared by every entry point (CUDA when present, CPU otherwise)."""

from __future__ import annotations

import warnings

import torch

from utils.errors import OptionsError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks the first CUDA device when one is present and the CPU otherwise."""
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionsError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionsError(f"device {name!r}: CUDA is not available on this machine; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionsError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Map fp32/fp16/bf16 to a dtype; fp16 on CPU falls back to fp32 (many CPU kernels lack fp16)."""
    if precision not in PRECISIONS:
        raise OptionsError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype == torch.float16 and device.type == "cpu":
        warnings.warn("fp16 is not supported well on CPU; running in fp32 instead", stacklevel=2)
        return torch.float32
    return dtype


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
