"""OSCAR's option schemas: the model, stage 1 (train_hyper_enc.py) and stage 2 (train_diff.py).

Defaults are the reference's hyper-parameters (../shared/reference/oscar_method.md); the shipped files in
``options/oscar/`` spell them out with comments. Sections every method shares (runtime, data, optimizer,
training loop) come from :mod:`utils.option_sections`; the SD model zoo section from the model-zoo block.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.blocks.model_zoo import ModelZooOptions
from models.oscar.rate_table import DEFAULT_LEVEL_BPPS, DEFAULT_TIMESTEPS, RATE_TABLE, rate_point
from utils.option_sections import DataOptions, OptimizerOptions, RuntimeOptions, TrainLoopOptions
from utils.options import option, required

RATE_LABELS = tuple(p.label_bpp for p in RATE_TABLE)


@dataclass(kw_only=True)
class HyperEncoderOptions:
    channels: int = option(192, min=8, help="N: width of the analysis transform")
    hyper_dim: int = option(320, min=8, help="M: width of the vectors that are quantized")
    codebook_dim: int = option(32, min=2, help="dimension of the cosine-similarity codes")
    ema_decay: float = option(0.8, min=0.0, max=1.0, min_exclusive=True, help="EMA decay of codebook updates")
    commitment_weight: float = option(1.0, min=0.0, help="weight of the VQ commitment term (unused by default)")


@dataclass(kw_only=True)
class ModelOptions:
    levels: list[float] = option(
        default_factory=lambda: list(DEFAULT_LEVEL_BPPS), help="rate points (bpp labels of the rate table), low to high"
    )
    timesteps: list[int] = option(
        default_factory=lambda: list(DEFAULT_TIMESTEPS), help="pseudo diffusion timestep of each level"
    )
    hyper_encoder: HyperEncoderOptions = option(default_factory=HyperEncoderOptions)
    lora_rank: int = option(16, min=1, help="LoRA rank of the UNet adapters")
    lora_alpha: float = option(8.0, min=0.0, min_exclusive=True, help="LoRA alpha (scaling = alpha / rank)")
    latent_norms: str = option(
        "transmit",
        choices=("transmit", "none", "oracle"),
        help="per-channel latent norms at decoding: transmit (quantized, counted in the rate), none (use the "
        "hyper-decoded latent as it is), oracle (the reference's leak: norms of the original latent; evaluation only)",
    )
    norm_bits: int = option(6, min=2, max=10, help="bits per transmitted latent-norm value")
    vae_tiling: str = option("auto", choices=("auto", "on", "off"), help="tiled VAE encode/decode")
    tiling_min_pixels: int = option(1536 * 1536, min=1, help="with vae_tiling=auto, tile images at least this large")

    def check(self) -> tuple[str, str] | None:
        for i, bpp in enumerate(self.levels):
            try:
                rate_point(bpp)
            except ValueError as err:
                return f"levels[{i}]", str(err)
        if len(set(self.levels)) != len(self.levels):
            return "levels", "each rate point may appear once"
        if len(self.levels) > 16:
            return "levels", f"at most 16 levels fit the bitstream header, got {len(self.levels)}"
        if len(self.timesteps) != len(self.levels):
            return "timesteps", f"expected one timestep per level ({len(self.levels)}), got {len(self.timesteps)}"
        for i, t in enumerate(self.timesteps):
            if not 0 <= t < 1000:
                return f"timesteps[{i}]", f"expected a timestep in [0, 999], got {t}"
        return None


@dataclass(kw_only=True)
class Stage1Options:
    """train_hyper_enc.py: one hyper-encoder for one bit-rate, on a frozen VAE."""

    name: str = option("hyper_enc", help="run name; outputs go to <output_root>/<name>")
    output_root: str = option("runs")
    bpp: float = option(0.0313, choices=RATE_LABELS, help="the rate point this hyper-encoder is trained for")
    model_zoo: ModelZooOptions = option(default_factory=ModelZooOptions)
    runtime: RuntimeOptions = option(default_factory=RuntimeOptions)
    hyper_encoder: HyperEncoderOptions = option(default_factory=HyperEncoderOptions)
    data: DataOptions = required()
    optimizer: OptimizerOptions = option(default_factory=OptimizerOptions)
    train: TrainLoopOptions = option(default_factory=TrainLoopOptions)
    vq_commitment_weight: float = option(0.0, min=0.0, help="weight of the VQ commitment loss in the objective")
    sample_posterior: bool = option(True, help="the reference samples the VAE posterior in stage 1")


@dataclass(kw_only=True)
class LossOptions:
    l1: float = option(1.0, min=0.0)
    dists: float = option(1.0, min=0.0)
    edge: float = option(1.0, min=0.0, help="DISTS on Sobel gradient magnitudes")
    latent_cosine: float = option(2.0, min=0.0)
    gan: float = option(5e-3, min=0.0, help="generator loss weight (0 disables the discriminator)")
    discriminator: float = option(1e-2, min=0.0, help="discriminator loss weight")
    latent_form: str = option(
        "per_position",
        choices=("per_position", "reference"),
        help="latent cosine: one per position over channels (the paper's description), or reference: one per "
        "channel over space (the reference code)",
    )
    latent_input: str = option(
        "rescaled",
        choices=("rescaled", "reference"),
        help="the latent compared with z: the UNet's input (after the norm rescaling), or reference: the "
        "hyper-decoded latent before it",
    )
    edge_form: str = option(
        "rgb",
        choices=("rgb", "gray", "reference"),
        help="edge map: Sobel per RGB channel, replicated borders (rgb), of luma (gray), or reference: torchvision "
        "grayscale, zero padding, sqrt(g^2 + 1e-6)",
    )


@dataclass(kw_only=True)
class GanOptions:
    """The latent discriminator; each "reference" value reproduces the reference code (see discriminator.py)."""

    mode: str = option(
        "live",
        choices=("live", "reference"),
        help="live: the generator term reaches the generator and the discriminator's LoRA trains; reference: "
        "features without gradients, only the head trains and the generator gets no adversarial gradient",
    )
    head: str = option("same_grid", choices=("same_grid", "reference"), help="head padding 2/1 (same_grid) or 1/1")
    lora_targets: str = option(
        "generator", choices=("generator", "reference"), help="LoRA targets: the generator's, or the reference's list"
    )
    prompt: str = option(
        "generator",
        choices=("generator", "reference"),
        help="cross-attention context: the generator's prompt (detached), or reference: a learned prompt of its own",
    )


@dataclass(kw_only=True)
class Stage2Options:
    """train_diff.py: one LoRA UNet (with prompt embedding, conv_in, hyper-encoders) for all levels."""

    name: str = option("oscar", help="run name; outputs go to <output_root>/<name>")
    output_root: str = option("runs")
    model_zoo: ModelZooOptions = option(default_factory=ModelZooOptions)
    runtime: RuntimeOptions = option(default_factory=RuntimeOptions)
    model: ModelOptions = option(default_factory=ModelOptions)
    hyper_encoder_checkpoints: list[str] = required(help="stage-1 hyper-encoder folders, one per level, same order")
    data: DataOptions = required()
    optimizer: OptimizerOptions = option(
        default_factory=lambda: OptimizerOptions(lr_scheduler="constant_with_warmup", lr_warmup_steps=10)
    )
    train: TrainLoopOptions = option(
        default_factory=lambda: TrainLoopOptions(max_steps=150_000, checkpoint_every=7500, validate_every=7500)
    )
    loss: LossOptions = option(default_factory=LossOptions)
    gan: GanOptions = option(default_factory=GanOptions)
    disc_timestep_range: list[int] = option(default_factory=lambda: [20, 980], help="noise level range of the GAN")
    sample_posterior: bool = option(
        False, help="encode training crops with a VAE posterior sample (the reference) instead of its mean"
    )
    conv_in_training: str = option(
        "full",
        choices=("full", "reference"),
        help="full: the UNet's conv_in is fine-tuned in full (plus its LoRA); reference: only its LoRA trains (the "
        "reference code leaves conv_in's base weights frozen)",
    )

    def check(self) -> tuple[str, str] | None:
        if len(self.hyper_encoder_checkpoints) != len(self.model.levels):
            return (
                "hyper_encoder_checkpoints",
                f"expected one folder per level ({len(self.model.levels)}), got {len(self.hyper_encoder_checkpoints)}",
            )
        lo_hi = self.disc_timestep_range
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1000:
            return "disc_timestep_range", f"expected [low, high] with 0 <= low < high <= 1000, got {lo_hi}"
        return None
