"""The option schemas of the entry points: one dataclass tree per JSON option file.

Defaults are the reference's hyper-parameters (../shared/reference/oscar_method.md); the shipped files in
``options/`` spell them out with comments. Each section is shared where the entry points share a concept
(``model_zoo``, ``runtime``, ``model``).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.oscar.rate_table import DEFAULT_LEVEL_BPPS, DEFAULT_TIMESTEPS, RATE_TABLE, rate_point
from models.blocks.model_zoo import DEFAULT_ZOO
from utils.options import option, required

PRECISION_CHOICES = ("fp32", "fp16", "bf16")
RATE_LABELS = tuple(p.label_bpp for p in RATE_TABLE)


@dataclass(kw_only=True)
class ModelZooOptions:
    path: str = option(DEFAULT_ZOO, help="local diffusers-layout folder with unet/, vae/, scheduler/")


@dataclass(kw_only=True)
class RuntimeOptions:
    device: str = option("auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    precision: str = option("fp32", choices=PRECISION_CHOICES, help="weights and activations of frozen parts")
    seed: int = option(0, min=0, help="seed of every random number generator")


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
class DataOptions:
    train_roots: list[str] = required(help="folders of training images (searched recursively)")
    val_root: str | None = option(None, help="folder of validation images (whole images), or null")
    max_val_images: int = option(8, min=1, help="validate on at most this many images")
    patch_size: int = option(256, min=64, help="training crop size in pixels (multiple of 64)")
    batch_size: int = option(64, min=1, help="images per step and process")
    num_workers: int = option(4, min=0, help="data-loading worker processes")
    small_images: str = option("pad", choices=("pad", "skip"), help="images smaller than patch_size + 8")

    def check(self) -> tuple[str, str] | None:
        if not self.train_roots:
            return "train_roots", "expected at least one folder"
        if self.patch_size % 64:
            return "patch_size", f"expected a multiple of 64, got {self.patch_size}"
        return None


@dataclass(kw_only=True)
class OptimizerOptions:
    learning_rate: float = option(5e-5, min=0.0, min_exclusive=True)
    betas: list[float] = option(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = option(1e-2, min=0.0)
    eps: float = option(1e-8, min=0.0, min_exclusive=True)
    max_grad_norm: float = option(1.0, min=0.0, help="gradient-norm clip (0 = off)")
    lr_scheduler: str = option("constant", choices=("constant", "constant_with_warmup", "cosine", "linear"))
    lr_warmup_steps: int = option(0, min=0)

    def check(self) -> tuple[str, str] | None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            return "betas", f"expected two numbers in [0, 1), got {self.betas}"
        return None


@dataclass(kw_only=True)
class TrainLoopOptions:
    max_steps: int = option(10_000, min=1)
    checkpoint_every: int = option(1000, min=1)
    checkpoints_total_limit: int = option(3, min=1, help="keep the last N checkpoints")
    validate_every: int = option(1000, min=1)
    log_every: int = option(10, min=1)
    gradient_accumulation_steps: int = option(1, min=1)
    mixed_precision: str = option("no", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = option(False)
    log_with: str = option("tensorboard", choices=("tensorboard", "wandb", "none"))


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
    disc_timestep_range: list[int] = option(default_factory=lambda: [20, 980], help="noise level range of the GAN")

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


@dataclass(kw_only=True)
class EvalOptions:
    """test.py: evaluate an exported model on image folders through real files."""

    name: str = option("test", help="run name; outputs go to <output_root>/<name>")
    output_root: str = option("runs")
    model_dir: str = required(help="exported model folder (written by train_diff.py or make_model_zoo --export-model)")
    datasets: list[str] = required(help="folders of test images")
    levels: list[int] | None = option(None, help="level indices to evaluate (null = all)")
    metrics: list[str] | None = option(None, help="metric names (null = every metric whose weights are present)")
    skip_missing_metrics: bool = option(False, help="skip a metric whose weights are missing instead of stopping")
    runtime: RuntimeOptions = option(default_factory=RuntimeOptions)
    model_zoo: str | None = option(None, help="SD zoo folder (null = the one the exported model names)")
    latent_norms: str | None = option(None, choices=(None, "transmit", "none", "oracle"), help="override the model's")
    fast_inference: bool = option(True, help="merged LoRA, SDPA, channels_last; runtime.precision for UNet/VAE decoder")
    anchors: str | None = option("options/anchors_published.json", help="published RD points to draw (or null)")
    bd_anchor: str | None = option(None, help="method name in the anchors file to compute BD-rates against")

    def check(self) -> tuple[str, str] | None:
        if not self.datasets:
            return "datasets", "expected at least one folder"
        return None
