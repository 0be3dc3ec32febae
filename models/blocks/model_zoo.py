"""The local Stable Diffusion model zoo: loading SD-2.1 offline and writing random-weight stand-ins.

OSCAR needs three parts of Stable Diffusion 2.1 in diffusers layout: ``unet/``, ``vae/`` and ``scheduler/``.
Weights are never downloaded at run time: they are read from a local folder (by default
``model_zoo/stable-diffusion-2-1``). :func:`write_model_zoo` writes a folder of the same layout with seeded
random weights, either the real SD-2.1 architecture (``sd21``, for benchmarks) or a tiny model of the same
classes (``tiny``, for tests and the demo); both load back through :func:`load_sd_components`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils.errors import ModelZooError
from utils.options import option

DEFAULT_ZOO = "model_zoo/stable-diffusion-2-1"
SUBFOLDERS = ("unet", "vae", "scheduler")
ZOO_INFO_FILE = "oscar_zoo.json"  # written only by write_model_zoo: marks random-weight folders

# SD-2.1 (768, v-prediction) architecture, diffusers layout (../shared/reference/sd21_configs.md).
SD21_UNET: dict[str, Any] = dict(
    act_fn="silu",
    attention_head_dim=[5, 10, 20, 20],
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=1024,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    sample_size=96,
    upcast_attention=True,
    use_linear_projection=True,
)
SD21_VAE: dict[str, Any] = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)
SD21_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="v_prediction",
    clip_sample=False,
    steps_offset=1,
)

# Tiny stand-in: the same classes and block types as SD-2.1 (so LoRA targets and the /8 latent are the same),
# with a few channels per block. About 1 M parameters in all; builds in well under a second.
TINY_UNET: dict[str, Any] = dict(
    SD21_UNET,
    attention_head_dim=[2, 2, 4, 4],
    block_out_channels=[32, 32, 64, 64],
    cross_attention_dim=32,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)
# SD's scaling factor gives its trained latents about unit variance; the random tiny VAE's raw latents have an RMS
# near 0.2, so its factor is 4 (the same role, so latent-norm side information stays in its usual range).
TINY_VAE: dict[str, Any] = dict(
    SD21_VAE, block_out_channels=[8, 16, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=4.0
)

PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "tiny": (TINY_UNET, TINY_VAE, SD21_SCHEDULER),
    "sd21": (SD21_UNET, SD21_VAE, SD21_SCHEDULER),
}


@dataclass(kw_only=True)
class ModelZooOptions:
    """The ``model_zoo`` section of an option file."""

    path: str = option(DEFAULT_ZOO, help="local diffusers-layout folder with unet/, vae/, scheduler/")


@dataclass
class SDComponents:
    """The frozen Stable Diffusion parts OSCAR builds on."""

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    scheduler: Any  # diffusers.DDPMScheduler
    path: Path


def missing_zoo_message(path: Path, problem: str) -> str:
    return (
        f"model zoo {path}: {problem}. OSCAR needs Stable Diffusion 2.1 in diffusers layout "
        f"({', '.join(s + '/' for s in SUBFOLDERS)}): download the repository stabilityai/stable-diffusion-2-1 "
        f"(the unet, vae and scheduler folders suffice) on a machine with network access and copy it to {path}, "
        f"or set model_zoo.path to where it is; for a quick test with random weights run "
        f"`python scripts/make_model_zoo.py --preset tiny --out {path}`"
    )


def check_zoo(path: str | os.PathLike[str]) -> Path:
    """Raise :class:`ModelZooError` saying what to download and where, unless ``path`` is a usable zoo."""
    path = Path(path)
    if not path.is_dir():
        raise ModelZooError(missing_zoo_message(path, "folder not found"))
    for sub in SUBFOLDERS:
        config = "scheduler_config.json" if sub == "scheduler" else "config.json"
        if not (path / sub / config).is_file():
            raise ModelZooError(missing_zoo_message(path, f"{sub}/{config} not found"))
        if sub != "scheduler" and not any((path / sub).glob("diffusion_pytorch_model*.safetensors")) and not any(
            (path / sub).glob("diffusion_pytorch_model*.bin")
        ):
            raise ModelZooError(missing_zoo_message(path, f"{sub}/ has no diffusion_pytorch_model weights"))
    return path


def load_sd_components(
    path: str | os.PathLike[str] = DEFAULT_ZOO,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_unet: bool = True,
) -> SDComponents:
    """Load UNet, VAE and scheduler from a local diffusers-layout folder, offline; frozen and in eval mode.

    ``with_unet=False`` skips the UNet (3.5 GB for SD-2.1) for jobs that only need the VAE (stage 1).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    path = check_zoo(path)
    # Never reach for the hub: the folder is all there is.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = dict(local_files_only=True, torch_dtype=dtype)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs) if with_unet else None
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
        # SD-2.1 ships a DDIM config; OSCAR only needs the noise schedule, which DDPMScheduler reads from it.
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelZooError(f"model zoo {path}: could not be loaded ({first_line})") from None
    for module in (unet, vae):
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    return SDComponents(unet=unet, vae=vae, scheduler=scheduler, path=path)


def build_sd_components(preset: str, seed: int = 0) -> SDComponents:
    """Build UNet, VAE and scheduler of a preset with seeded random weights (nothing is read or downloaded)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    unet_cfg, vae_cfg, sched_cfg = PRESETS[preset]
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDPMScheduler(**sched_cfg)
    return SDComponents(unet=unet, vae=vae, scheduler=scheduler, path=Path())


def write_model_zoo(
    preset: str, out: str | os.PathLike[str], seed: int = 0, fit_vae_images: torch.Tensor | None = None, fit_vae_steps: int = 0
) -> Path:
    """Write a diffusers-layout zoo folder with random weights for ``preset`` (``tiny`` or ``sd21``).

    With ``fit_vae_images`` and ``fit_vae_steps``, the VAE is first trained briefly on those images
    (:func:`fit_vae`), so that the tiny pipeline reconstructs images at all.
    """
    out = Path(out)
    parts = build_sd_components(preset, seed)
    vae_fit = fit_vae(parts.vae, fit_vae_images, fit_vae_steps, seed) if fit_vae_images is not None and fit_vae_steps else None
    out.mkdir(parents=True, exist_ok=True)
    parts.unet.save_pretrained(out / "unet", safe_serialization=True)
    parts.vae.save_pretrained(out / "vae", safe_serialization=True)
    parts.scheduler.save_pretrained(out / "scheduler")
    info = {"preset": preset, "seed": seed, "random_weights": vae_fit is None, "vae_fitted": vae_fit,
            "note": "written by scripts/make_model_zoo.py: random weights (the VAE briefly fitted when vae_fitted is "
                    "set); not Stable Diffusion's trained weights"}
    (out / ZOO_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def zoo_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker written by :func:`write_model_zoo` (None for a real SD-2.1 download)."""
    info = Path(path) / ZOO_INFO_FILE
    return json.loads(info.read_text()) if info.is_file() else None


def fit_vae(vae: Any, images: torch.Tensor, steps: int, seed: int = 0, lr: float = 2e-3) -> dict[str, float]:
    """Briefly train a random-weight VAE as an autoencoder, as a stand-in for Stable Diffusion's trained one.

    With random weights the VAE decoder cannot reconstruct anything, so a pipeline built on the tiny zoo would
    show noise at every rate. A few hundred steps of L1 reconstruction (with a small KL term that keeps the
    latents bounded) on ``images`` ((N, 3, H, W) in [-1, 1]) give a usable tiny autoencoder. Afterwards the
    scaling factor is set, as SD's was, so that the scaled latents of these images have unit variance.
    Returns the final L1 loss and the new scaling factor. For the demo and tests only: real runs use SD-2.1.
    """
    generator = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    loss_value = float("nan")
    for _ in range(steps):
        batch = images[torch.randint(len(images), (min(8, len(images)),), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.mean).sample
        loss = (recon - batch).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 8]).latent_dist.mean for i in range(0, len(images), 8)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return {"l1": loss_value, "scaling_factor": float(vae.config.scaling_factor)}
