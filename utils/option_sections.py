"""Option sections every method's entry points share: runtime, training data, optimizer and training loop.

A method's schema (``models/<method>/options.py``) nests these next to its own sections, so ``--set
runtime.device=cpu`` or ``--set train.max_steps=100`` mean the same thing for every method.
"""

from __future__ import annotations

from dataclasses import dataclass

from utils.options import option, required

PRECISION_CHOICES = ("fp32", "fp16", "bf16")
SEED_MAX = 2**32 - 1  # numpy.random.seed (which accelerate's set_seed calls) takes no larger seed


@dataclass(kw_only=True)
class RuntimeOptions:
    device: str = option("auto", help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N")
    precision: str = option("fp32", choices=PRECISION_CHOICES, help="weights and activations of frozen parts")
    seed: int = option(0, min=0, max=SEED_MAX, help="seed of every random number generator (0..2^32-1, numpy's range)")


@dataclass(kw_only=True)
class DataOptions:
    train_roots: list[str] = required(help="folders of training images (searched recursively)")
    val_root: str | None = option(None, help="folder of validation images (whole images), or null")
    max_val_images: int = option(8, min=1, help="validate on at most this many images")
    patch_size: int = option(256, min=64, help="training crop size in pixels (multiple of 64)")
    batch_size: int = option(64, min=1, help="images per step and process")
    num_workers: int = option(4, min=0, help="data-loading worker processes")
    small_images: str = option("pad", choices=("pad", "skip"), help="images smaller than patch_size + 8")
    crop_fallback: str = option(
        "centre",
        choices=("centre", "reference"),
        help="offset of the inner crop when it is not random (half the time): the centre, or reference: (0, 0)",
    )

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
