"""Timestep fitting: the estimators recover the timestep of latents noised by the forward process."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from models.blocks.model_zoo import SD21_SCHEDULER
from models.oscar.timestep_fit import latent_pair_stats, timestep_for_signal_rate, timestep_for_snr


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


def test_fit_after_stage1_gives_smaller_timestep_for_more_bits(tmp_path, tiny_zoo):
    """Train two stage-1 hyper-encoders briefly on the tiny zoo; the higher rate maps to the smaller timestep."""
    import json

    import train_hyper_enc
    from scripts import fit_timesteps
    from utils.data import write_synthetic_images

    write_synthetic_images(tmp_path / "train", count=8, size=96, seed=0)
    write_synthetic_images(tmp_path / "val", count=3, size=(128, 96), seed=1)
    hyper = {"channels": 16, "hyper_dim": 32, "codebook_dim": 8, "ema_decay": 0.8, "commitment_weight": 1.0}
    finals = []
    for bpp in (0.0019, 0.125):
        sets = {
            "name": f"he_{bpp}", "output_root": str(tmp_path / "runs"), "bpp": bpp, "model_zoo.path": str(tiny_zoo),
            "runtime.device": "cpu", "hyper_encoder": hyper, "optimizer.learning_rate": 1e-3,
            "data": {"train_roots": [str(tmp_path / "train")], "patch_size": 64, "batch_size": 4, "num_workers": 0},
            "train": {"max_steps": 150, "checkpoint_every": 150, "validate_every": 150, "log_every": 50, "log_with": "none"},
        }
        argv = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
        finals.append(str(train_hyper_enc.main(argv) / "final"))
    stage2 = {
        "model_zoo.path": str(tiny_zoo), "runtime.device": "cpu", "model.levels": [0.0019, 0.125],
        "model.timesteps": [0, 0], "model.hyper_encoder": hyper, "hyper_encoder_checkpoints": finals,
        "data.train_roots": [str(tmp_path / "train")],
    }
    argv = [a for k, v in stage2.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    out = tmp_path / "fitted.json"
    fits = fit_timesteps.main(["--images", str(tmp_path / "val"), "--out-opt", str(out)] + argv)
    low, high = fits
    assert high.cosine > low.cosine and high.timestep_cosine < low.timestep_cosine
    assert high.timestep_snr < low.timestep_snr
    written = json.loads(out.read_text())
    assert written["model"]["timesteps"] == [low.timestep_cosine, high.timestep_cosine]
    assert (tmp_path / "fitted_timesteps.json").is_file()
