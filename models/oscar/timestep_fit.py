"""Mapping each bit-rate to a pseudo diffusion timestep, from measurements instead of by hand.

OSCAR decodes the hyper-decoded latent ẑ as if it were the noisy latent of the forward process,

    x_t = sqrt(ᾱ_t) z + sqrt(1 - ᾱ_t) ε,        ε ~ N(0, I),

at a timestep t that depends on the rate. Two estimators of t from pairs (z, ẑ), both blind to the scale of ẑ
(stage 1 trains with a cosine loss, so that scale is arbitrary):

* ``cosine``: for unit-variance latents and independent noise, cos(x_t, z) ≈ sqrt(ᾱ_t). Take the mean
  cosine c between flattened ẑ and z over images and pick t with sqrt(ᾱ_t) closest to c. This is the
  derivation described for the reference.
* ``snr``: regress ẑ = a z + n per image (a = <ẑ, z> / <z, z>); the signal-to-noise ratio
  SNR = a² <z, z> / <n, n> equals ᾱ_t / (1 - ᾱ_t) in the model above. Pick t whose log-SNR is closest to
  the log of the mean SNR over images.

For every level both are reported, with the MSE between ẑ (rescaled to z's channel RMS) and z.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from models.oscar.hyper_encoder import HyperEncoder
from models.oscar.latent_norms import channel_rms, rescale_to_rms
from models.oscar.rate_table import RatePoint
from models.blocks.padding import pad_to_multiple

METHODS = ("cosine", "snr")


@dataclass
class LevelFit:
    """Distortion of one level's hyper-decoded latent and the timesteps it maps to."""

    level: int
    bpp: float
    images: int
    cosine: float
    snr: float
    mse: float
    timestep_cosine: int
    timestep_snr: int

    def timestep(self, method: str) -> int:
        return self.timestep_cosine if method == "cosine" else self.timestep_snr

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_for_signal_rate(alphas_cumprod: torch.Tensor, signal_rate: float) -> int:
    """The t whose sqrt(ᾱ_t) is closest to ``signal_rate`` (clamped into the schedule's range)."""
    return int(torch.argmin((alphas_cumprod.double().sqrt() - signal_rate).abs()))


def timestep_for_snr(alphas_cumprod: torch.Tensor, snr: float) -> int:
    """The t whose ᾱ_t / (1 - ᾱ_t) is closest to ``snr`` in the log domain."""
    a = alphas_cumprod.double()
    log_snr = torch.log(a) - torch.log1p(-a)
    return int(torch.argmin((log_snr - torch.log(torch.tensor(max(snr, 1e-12), dtype=torch.float64))).abs()))


def latent_pair_stats(z: torch.Tensor, z_hat: torch.Tensor) -> tuple[float, float]:
    """(cosine, SNR) between one latent and its hyper-decoded version (both blind to the scale of ẑ)."""
    z, z_hat = z.double().flatten(), z_hat.double().flatten()
    cosine = float(torch.dot(z, z_hat) / (z.norm() * z_hat.norm()).clamp_min(1e-12))
    a = torch.dot(z_hat, z) / torch.dot(z, z).clamp_min(1e-12)
    noise = z_hat - a * z
    snr = float(a * a * torch.dot(z, z) / torch.dot(noise, noise).clamp_min(1e-12))
    return cosine, snr


@torch.no_grad()
def measure_levels(
    image_to_latent,
    hyper_encoders: list[HyperEncoder],
    rate_points: list[RatePoint],
    images: Iterable[torch.Tensor],
    alphas_cumprod: torch.Tensor,
) -> list[LevelFit]:
    """Measure every level on ``images`` ((1, 3, H, W) in [-1, 1]); ``image_to_latent`` is the VAE encoder."""
    sums = [[0.0, 0.0, 0.0] for _ in rate_points]
    count = 0
    for image in images:
        count += 1
        for level, (encoder, point) in enumerate(zip(hyper_encoders, rate_points)):
            z = image_to_latent(pad_to_multiple(image, point.pixel_stride)).float()
            z_hat = encoder.decode(encoder.encode(z)).float()
            cosine, snr = latent_pair_stats(z, z_hat)
            mse = float((rescale_to_rms(z_hat, channel_rms(z)) - z).pow(2).mean())
            for i, value in enumerate((cosine, snr, mse)):
                sums[level][i] += value
    if count == 0:
        raise ValueError("no images to measure")
    fits = []
    for level, (point, (cos_sum, snr_sum, mse_sum)) in enumerate(zip(rate_points, sums)):
        cosine, snr, mse = cos_sum / count, snr_sum / count, mse_sum / count
        fits.append(
            LevelFit(
                level=level,
                bpp=point.label_bpp,
                images=count,
                cosine=cosine,
                snr=snr,
                mse=mse,
                timestep_cosine=timestep_for_signal_rate(alphas_cumprod, cosine),
                timestep_snr=timestep_for_snr(alphas_cumprod, snr),
            )
        )
    return fits
