"""Timestep fitting: the estimators recover the timestep of latents noised by the forward process."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from utils.model_zoo import SD21_SCHEDULER
from utils.timestep_fit import latent_pair_stats, timestep_for_signal_rate, timestep_for_snr


@pytest.mark.parametrize("t", [150, 310, 500, 800])
def test_estimators_recover_forward_process_timestep(t):
    scheduler = DDPMScheduler(**SD21_SCHEDULER)
    g = torch.Generator().manual_seed(t)
    z, eps = torch.randn(1, 4, 64, 64, generator=g), torch.randn(1, 4, 64, 64, generator=g)
    x_t = scheduler.add_noise(z, eps, torch.tensor([t]))
    cosine, snr = latent_pair_stats(z, x_t * 7.3)  # the scale of ẑ must not matter
    a = scheduler.alphas_cumprod
    # sqrt(alpha_bar) flattens at high t, so the same sampling noise moves t further there.
    tolerance = 10 if t <= 500 else 25
    assert abs(timestep_for_signal_rate(a, cosine) - t) <= tolerance
    assert abs(timestep_for_snr(a, snr) - t) <= tolerance


def test_more_distortion_gives_larger_timestep():
    a = DDPMScheduler(**SD21_SCHEDULER).alphas_cumprod
    assert timestep_for_signal_rate(a, 0.95) < timestep_for_signal_rate(a, 0.8) < timestep_for_signal_rate(a, 0.5)
    assert timestep_for_snr(a, 10.0) < timestep_for_snr(a, 1.0) < timestep_for_snr(a, 0.1)
    # Reference values: sqrt(alpha_bar) at t = 500 and 150 is about 0.53 and 0.91.
    assert abs(timestep_for_signal_rate(a, 0.53) - 500) <= 10
    assert abs(timestep_for_signal_rate(a, 0.91) - 150) <= 15
