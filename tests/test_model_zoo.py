"""The local model zoo: random-weight presets load back through the same path as SD-2.1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.errors import ModelZooError
from models.blocks.model_zoo import SD21_UNET, SD21_VAE, build_sd_components, load_sd_components, zoo_info

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_zoo_loads_through_the_sd_path(tiny_zoo):
    parts = load_sd_components(tiny_zoo)
    assert type(parts.unet).__name__ == "UNet2DConditionModel" and type(parts.vae).__name__ == "AutoencoderKL"
    assert type(parts.scheduler).__name__ == "DDPMScheduler"
    assert parts.scheduler.config.prediction_type == "v_prediction"
    assert parts.scheduler.config.beta_schedule == "scaled_linear"
    assert parts.unet.config.cross_attention_dim == 32 and parts.unet.config.down_block_types == SD21_UNET["down_block_types"]
    n_params = sum(p.numel() for m in (parts.unet, parts.vae) for p in m.parameters())
    assert n_params < 5_000_000
    assert not any(p.requires_grad for p in parts.unet.parameters())
    assert zoo_info(tiny_zoo)["random_weights"] is True
    # Same weights as a fresh build with the same seed.
    fresh = build_sd_components("tiny", seed=0)
    for (name, a), (_, b) in zip(fresh.unet.state_dict().items(), parts.unet.state_dict().items()):
        assert torch.equal(a, b), name


def test_sd21_architecture_matches_reference_counts():
    """The sd21 preset is the real architecture: 865.9 M UNet and 83.7 M VAE parameters (built on meta)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD21_UNET), AutoencoderKL(**SD21_VAE)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 865.9
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == 83.7


def test_missing_zoo_says_what_to_download(tmp_path):
    with pytest.raises(ModelZooError) as info:
        load_sd_components(tmp_path / "nothing")
    message = str(info.value)
    assert "stabilityai/stable-diffusion-2-1" in message and "make_model_zoo.py" in message and str(tmp_path) in message


def test_incomplete_zoo_names_the_missing_part(tiny_zoo, tmp_path):
    import shutil

    broken = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelZooError, match="vae/ has no diffusion_pytorch_model weights"):
        load_sd_components(broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelZooError, match="could not be loaded"):
        load_sd_components(broken)


def test_make_model_zoo_cli(tmp_path):
    out = tmp_path / "zoo"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/make_model_zoo.py"), "--preset", "tiny", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "unet" / "config.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    load_sd_components(out)


def test_fit_vae_lowers_reconstruction_error_and_sets_scaling_factor():
    from models.blocks.model_zoo import fit_vae

    parts = build_sd_components("tiny", seed=0)
    x = torch.linspace(-1, 1, 64).repeat(3, 64, 1)[None].repeat(4, 1, 1, 1)  # smooth ramps
    x = x * torch.tensor([1.0, -0.5, 0.2])[None, :, None, None]

    def l1() -> float:
        with torch.no_grad():
            return float((parts.vae.decode(parts.vae.encode(x).latent_dist.mean).sample - x).abs().mean())

    before = l1()
    result = fit_vae(parts.vae, x, steps=40, seed=0)
    assert l1() < before
    assert parts.vae.config.scaling_factor == pytest.approx(result["scaling_factor"]) != 4.0
    assert not any(p.requires_grad for p in parts.vae.parameters())
