"""Per-channel latent norms as side information.

The reference rescales the hyper-decoded latent so that each channel's L2 norm over space equals that of the
ORIGINAL latent, which a decoder does not have. Here the encoder transmits those norms: each channel's RMS
(the norm divided by sqrt(number of positions), so it does not depend on the image size) is quantized
uniformly in the log2 domain on ``[2^LOG2_MIN, 2^LOG2_MAX]`` with ``bits`` bits. With the default 6 bits this
costs 4 x 6 = 24 bits per image, and the relative error of a value inside the range is at most
``2^(range / (2^bits - 1) / 2) - 1`` = 3.4 %.
"""

from __future__ import annotations

import torch

LOG2_MIN = -4.0  # RMS 1/16
LOG2_MAX = 2.0  # RMS 4; SD-2.1 latents (scaled by 0.18215) have channel RMS near 1
EPS = 1e-6


def channel_rms(latent: torch.Tensor) -> torch.Tensor:
    """RMS over space of each channel: ``(B, C, H, W) -> (B, C)``, computed in fp32."""
    return latent.float().pow(2).mean(dim=(-2, -1)).sqrt()


def quantize_rms(rms: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in ``[0, 2^bits)`` for RMS values (clamped to the representable range)."""
    levels = 2**bits - 1
    log_rms = torch.log2(rms.float().clamp_min(EPS)).clamp(LOG2_MIN, LOG2_MAX)
    return torch.round((log_rms - LOG2_MIN) / (LOG2_MAX - LOG2_MIN) * levels).long()


def dequantize_rms(codes: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2**bits - 1
    if codes.min() < 0 or codes.max() > levels:
        raise ValueError(f"latent-norm codes must lie in [0, {levels}] for {bits} bits, got {codes.tolist()}")
    return torch.exp2(LOG2_MIN + codes.float() / levels * (LOG2_MAX - LOG2_MIN))


def rescale_to_rms(latent: torch.Tensor, target_rms: torch.Tensor) -> torch.Tensor:
    """Scale each channel of ``latent`` (B, C, H, W) so that its RMS equals ``target_rms`` (B, C)."""
    gain = target_rms.to(torch.float32) / channel_rms(latent).clamp_min(EPS)
    return latent * gain[..., None, None].to(latent.dtype)
