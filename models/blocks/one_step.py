"""One-step denoising: the scheduler's x0 prediction at a pseudo timestep.

OSCAR treats the hyper-decoded latent as a point on the diffusion trajectory at a timestep t chosen per rate,
runs the UNet once, and keeps the scheduler's estimate of the clean latent x0. The estimate depends on what
the UNet predicts (``scheduler.config.prediction_type``): SD-2.1 (768) predicts v, SD-1.x predicts epsilon.
"""

from __future__ import annotations

import torch


def predict_x0(
    alphas_cumprod: torch.Tensor, prediction_type: str, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """Clean-latent estimate from one UNet output at ``timestep`` (scalar or per-sample tensor).

    With ``a = alpha_bar_t``: epsilon: ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``; v: ``x0 = sqrt(a) x_t -
    sqrt(1 - a) v``; sample: the output is x0 itself.
    """
    a = alphas_cumprod.to(sample.device, torch.float32)[timestep.to(sample.device).long()]
    a = a.reshape(-1, *([1] * (sample.dim() - 1))) if a.dim() else a
    sqrt_a, sqrt_1ma = a.sqrt(), (1.0 - a).sqrt()
    out, x_t = model_output.float(), sample.float()
    if prediction_type == "epsilon":
        x0 = (x_t - sqrt_1ma * out) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * x_t - sqrt_1ma * out
    elif prediction_type == "sample":
        x0 = out
    else:
        raise ValueError(f"prediction_type {prediction_type!r}: expected epsilon, v_prediction or sample")
    return x0.to(sample.dtype)


def signal_rate(alphas_cumprod: torch.Tensor, timestep: int) -> float:
    """``sqrt(alpha_bar_t)``: the weight of the clean latent in ``x_t``."""
    return float(alphas_cumprod[timestep].sqrt())
